"""Hugging Face checkpoint files, for every architecture's import/export (`hf_io` for T5,
`hf_bert_io` for the BERT family): the file names, reading weights from model.safetensors /
pytorch_model.bin (single or sharded with an index), the per-key layout hooks, and the flat
'a/b/c' view of a parameter tree that the mapping tables use.

Weights are read TensorFlow- and torch-free where possible: safetensors is parsed directly (so
bfloat16 checkpoints load, which `safetensors.numpy` cannot represent); torch is imported only
for legacy .bin files. Integer buffers (e.g. BERT's `embeddings.position_ids`) are not
parameters and are skipped.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import struct
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from kard_jax.errors import InputError

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX_FILE = "pytorch_model.bin.index.json"

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}


@dataclasses.dataclass(frozen=True)
class Hook:
    """Converts one array between the HF layout and ours, and maps our shape to HF's."""

    to_ours: Callable[[np.ndarray, Any], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


# Hooks shared by the mapping tables (torch Linear weights are [out, in]; ours [in, out]).
HOOKS: dict[str, Hook] = {
    "identity": Hook(lambda w, s: w, lambda x: x, lambda s: s),
    "linear": Hook(lambda w, s: w.T, lambda x: x.T, lambda s: s[::-1]),
    # ours [d_model, heads, head_dim] <-> HF [heads*head_dim, d_model]
    "qkv": Hook(lambda w, s: w.T.reshape(s), lambda x: x.reshape(x.shape[0], -1).T, lambda s: (s[1] * s[2], s[0])),
    # ours [heads, head_dim, d_model] <-> HF [d_model, heads*head_dim]
    "attn_out": Hook(lambda w, s: w.T.reshape(s), lambda x: x.reshape(-1, x.shape[-1]).T,
                     lambda s: (s[2], s[0] * s[1])),
}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': x}} -> {'a/b': x}."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b': x} -> {'a': {'b': x}}."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def config_readers(config_json: Mapping[str, Any], path: Any) -> tuple[Callable[..., int], Callable[..., float]]:
    """`integer(name, default)` and `number(name, default)` for one config.json: a missing or null
    field gives the default, a wrong type an InputError naming the file and field; a list of ids
    (e.g. `eos_token_id: [1]`) reads as its first element."""

    def integer(name: str, default: Any = None) -> int:
        value = config_json.get(name, default)
        if isinstance(value, list) and value:
            value = value[0]
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"expected an integer, got {value!r}", path=path, field=name)
        return value

    def number(name: str, default: float) -> float:
        value = config_json.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"expected a number, got {value!r}", path=path, field=name)
        return float(value)

    return integer, number


def make_config(config_class: type, fields: dict[str, Any], overrides: Mapping[str, Any], path: Any) -> Any:
    """`config_class(**fields, **overrides)`; an unknown override or an invalid value is an
    InputError naming the config file."""
    known = {f.name for f in dataclasses.fields(config_class)}
    for name in overrides:
        if name not in known:
            raise InputError(f"unknown {config_class.__name__} field {name!r} in overrides", path=path, field=name)
    try:
        return config_class(**{**fields, **overrides})
    except ValueError as e:
        raise InputError(str(e), path=path) from e


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Float tensors of a .safetensors file as float32 (bfloat16 included); integer and boolean
    buffers are skipped."""
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > os.path.getsize(path) - 8:
                raise ValueError(f"header length {header_len} exceeds the file")
            header = json.loads(f.read(header_len))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    except (OSError, ValueError, struct.error) as e:
        raise InputError(f"not a readable safetensors file ({e})", path=path) from e
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            if str(info["dtype"]).startswith(("I", "U", "BOOL")):
                continue
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            start, end = info["data_offsets"]
            shape = tuple(info["shape"])
            if end > data.size or end - start != int(np.prod(shape)) * dtype.itemsize:
                raise ValueError(f"data offsets {start}..{end} do not fit shape {shape}")
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"bad tensor entry {info!r} ({e})", path=path, field=key) from e
        tensors[key] = np.frombuffer(data[start:end], dtype=dtype).reshape(shape).astype(np.float32)
    return tensors


def read_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Floating-point tensors of a legacy pytorch_model.bin (needs torch) as float32."""
    try:
        import torch  # only for legacy .bin checkpoints
    except ImportError as e:
        raise InputError("reading a PyTorch checkpoint needs torch installed; convert it to model.safetensors "
                         "instead", path=path) from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt file
        raise InputError(f"not a readable PyTorch checkpoint ({e})", path=path) from e
    return {k: v.float().numpy() for k, v in state.items() if v.is_floating_point()}


def read_index(index_path: pathlib.Path) -> list[pathlib.Path]:
    """The shard files a *.index.json lists (each must exist)."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    except json.JSONDecodeError as e:
        raise InputError(f"malformed JSON ({e.msg})", path=index_path, line=e.lineno) from e
    except (KeyError, TypeError, AttributeError) as e:
        raise InputError("expected an object with a 'weight_map' object", path=index_path, field="weight_map") from e
    for name in files:
        if not (index_path.parent / name).is_file():
            raise InputError(f"shard {name!r} listed in the index does not exist", path=index_path, field=name)
    return [index_path.parent / name for name in files]


def read_weights(hf_dir: pathlib.Path, normalise_key: Callable[[str], str] = lambda key: key,
                 ) -> tuple[dict[str, np.ndarray], dict[str, pathlib.Path]]:
    """(HF key -> float32 array, HF key -> file it came from) of a transformers directory."""
    if (hf_dir / SAFETENSORS_FILE).is_file():
        files, reader = [hf_dir / SAFETENSORS_FILE], read_safetensors
    elif (hf_dir / SAFETENSORS_INDEX_FILE).is_file():
        files, reader = read_index(hf_dir / SAFETENSORS_INDEX_FILE), read_safetensors
    elif (hf_dir / TORCH_FILE).is_file():
        files, reader = [hf_dir / TORCH_FILE], read_torch
    elif (hf_dir / TORCH_INDEX_FILE).is_file():
        files, reader = read_index(hf_dir / TORCH_INDEX_FILE), read_torch
    else:
        raise InputError(f"no weights found (expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX_FILE}, {TORCH_FILE} or "
                         f"{TORCH_INDEX_FILE})", path=hf_dir)
    weights: dict[str, np.ndarray] = {}
    sources: dict[str, pathlib.Path] = {}
    for file in files:
        for key, value in reader(file).items():
            key = normalise_key(key)
            if key in weights:
                raise InputError("key appears in more than one shard", path=file, field=key)
            weights[key], sources[key] = value, file
    return weights, sources
