"""LoRA (Hu et al. 2021) for any model under the BaseModel contract, as a parameter transformation.

`LoraModel(model, LoraConfig(rank, alpha, target_modules, trainable_modules))` wraps e.g. a
`reranker.RerankerModel` (BERT or T5 backbone). Its params are

    {"base": <the wrapped model's params>, "lora": {<path of each target module>: {"lora_a", "lora_b"}}}

where a target is every `kernel` whose module name (the path component before `kernel`) is in
`target_modules` (default: the attention projections "query" and "value"). Before every forward
pass each target kernel W [in..., out...] is replaced by W + (alpha / rank) * A @ B with A
[in..., rank] and B [rank, out...], which equals LoRA's x W + (alpha / rank) (x A) B exactly; B
starts at zero, so the wrapped model starts as the base model. The input dims of a kernel are
read from its logical axes: a kernel whose first axis is `embed` maps 1 input dim (q/k/v, MLP
in), any other kernel maps all but its last dim (attention output [heads, kv, embed], MLP out);
a leading `layers` axis (scanned stacks) is kept as a batch axis of A and B.

Only the adapters (and modules named in `trainable_modules`, e.g. a freshly initialised
"projection" head — peft's `modules_to_save`) are trained: the base is wrapped in
`stop_gradient` (no weight gradients are computed for it) and `lora_optimizer` sends its updates
to `optax.set_to_zero` (no optimizer state is kept for it either). `merge_params` folds the
adapters into plain params of the wrapped model (for export, e.g. `hf_bert_io.export_hf`), and
`adapter_params` / `save_adapters` keep only what was trained.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.core import meta

from kard_jax.models.base import BaseModel

Array = jax.Array
PyTree = Any

BASE, LORA = "base", "lora"
A_NAME, B_NAME = "lora_a", "lora_b"
RANK_AXIS = "lora_rank"  # logical axis of the rank dimension (no rule: replicated)
_LEADING_AXES = ("layers", "stack")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("query", "value")
    trainable_modules: tuple[str, ...] = ()  # fully trained next to the adapters (e.g. "projection")

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha must be positive, got {self.alpha}")
        if not self.target_modules:
            raise ValueError("LoraConfig.target_modules must name at least one module")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        object.__setattr__(self, "trainable_modules", tuple(self.trainable_modules))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _split_axes(axes: tuple[str | None, ...]) -> tuple[int, int]:
    """(leading batch dims, input dims) of a kernel from its logical axis names."""
    lead = 1 if axes and axes[0] in _LEADING_AXES else 0
    rest = axes[lead:]
    n_in = 1 if rest and rest[0] == "embed" else len(rest) - 1
    return lead, max(n_in, 1)


def target_kernels(boxed_params: PyTree, config: LoraConfig) -> dict[tuple[str, ...], tuple[tuple[int, ...], tuple]]:
    """module path -> (kernel shape, logical axes) of every target kernel (from boxed params)."""
    out = {}
    flat = jax.tree_util.tree_flatten_with_path(boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    for path, leaf in flat:
        names = _path_names(path)
        if len(names) >= 2 and names[-1] == "kernel" and names[-2] in config.target_modules:
            axes = tuple(leaf.names) if isinstance(leaf, nn.Partitioned) else (None,) * np.ndim(leaf)
            out[names[:-1]] = (tuple(np.shape(meta.unbox(leaf))), axes)
    if not out:
        raise ValueError(f"LoRA target_modules {config.target_modules} match no kernel of the model")
    return out


def init_adapters(boxed_params: PyTree, config: LoraConfig, rng: Array) -> dict[str, Any]:
    """Fresh adapters (boxed with logical axes): A ~ N(0, 1/fan_in), B = 0."""
    tree: dict[str, Any] = {}
    for i, (module_path, (shape, axes)) in enumerate(sorted(target_kernels(boxed_params, config).items())):
        lead, n_in = _split_axes(axes)
        ins, outs = shape[lead:lead + n_in], shape[lead + n_in:]
        a_shape = shape[:lead] + ins + (config.rank,)
        b_shape = shape[:lead] + (config.rank,) + outs
        a_axes = axes[:lead] + axes[lead:lead + n_in] + (RANK_AXIS,)
        b_axes = axes[:lead] + (RANK_AXIS,) + axes[lead + n_in:]
        a = jax.random.normal(jax.random.fold_in(rng, i), a_shape, jnp.float32) * float(np.prod(ins)) ** -0.5
        node = tree
        for name in module_path:
            node = node.setdefault(name, {})
        node[A_NAME] = nn.Partitioned(a, names=a_axes)
        node[B_NAME] = nn.Partitioned(jnp.zeros(b_shape, jnp.float32), names=b_axes)
    return tree


def _delta(a: Array, b: Array, lead: int) -> Array:
    """A [lead.., in.., r] @ B [lead.., r, out..] -> [lead.., in.., out..]."""
    fn = lambda a, b: jnp.tensordot(a, b, axes=1)  # noqa: E731
    for _ in range(lead):
        fn = jax.vmap(fn)
    return fn(a, b)


def merge_params(params: Mapping[str, Any], config: LoraConfig, *, freeze: bool = False) -> PyTree:
    """{"base", "lora"} params -> the wrapped model's params with W + scaling * A @ B.

    `freeze=True` (training) stops gradients into every base parameter except `trainable_modules`.
    """
    params = meta.unbox(params)
    base, adapters = params[BASE], params[LORA]

    def fold(path, w):
        names = _path_names(path)
        if freeze and not any(n in config.trainable_modules for n in names):
            w = jax.lax.stop_gradient(w)
        if names and names[-1] == "kernel":
            node = adapters
            for n in names[:-1]:
                node = node.get(n) if isinstance(node, Mapping) else None
                if node is None:
                    return w
            if A_NAME in node:
                a, b = node[A_NAME], node[B_NAME]
                delta = _delta(a, b, _lead_of_shapes(w.shape, a.shape, b.shape))
                return w + (config.scaling * delta).astype(w.dtype)
        return w

    return jax.tree_util.tree_map_with_path(fold, base)


def _lead_of_shapes(w_shape, a_shape, b_shape) -> int:
    """Leading batch dims: the smallest `lead` with w = lead + A's inputs + B's outputs."""
    for lead in range(0, len(w_shape)):
        n_in = len(a_shape) - 1 - lead
        if n_in >= 1 and tuple(a_shape[:lead + n_in]) + tuple(b_shape[lead + 1:]) == tuple(w_shape):
            return lead
    raise ValueError(f"LoRA adapter shapes {a_shape} / {b_shape} do not fit kernel {w_shape}")


def trainable_mask(params: Mapping[str, Any], config: LoraConfig) -> PyTree:
    """True on adapters and on base leaves under a `trainable_modules` module."""

    def label(path, _):
        names = _path_names(path)
        return names[0] == LORA or any(n in config.trainable_modules for n in names[1:])

    return jax.tree_util.tree_map_with_path(label, meta.unbox(params))


class LoraModel(BaseModel):
    """A BaseModel whose params are {"base", "lora"}; every call runs the wrapped model on the
    merged weights (so loss, metrics and scores are the wrapped model's)."""

    def __init__(self, model: BaseModel, config: LoraConfig = LoraConfig(), *, seed: int = 0):
        super().__init__(model.module)
        self.model = model
        self.config = config
        self.seed = seed
        self.INPUT_FEATURES = model.INPUT_FEATURES

    def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, tuple[int, ...]]) -> PyTree:
        base_rng, lora_rng = jax.random.split(rng)
        base = self.model.get_initial_variables(base_rng, input_shapes)["params"]
        return {"params": {BASE: base, LORA: init_adapters(base, self.config, lora_rng)}}

    def merge_params(self, params: PyTree) -> PyTree:
        return merge_params(params, self.config)

    def loss_fn(self, params, batch, dropout_rng):
        return self.model.loss_fn(merge_params(params, self.config, freeze=True), batch, dropout_rng)

    def eval_fn(self, params, batch):
        return self.model.eval_fn(merge_params(params, self.config), batch)

    def predict_batch(self, params, batch, **kwargs):
        return self.model.predict_batch(merge_params(params, self.config), batch, **kwargs)

    def score_batch(self, params, batch):
        return self.model.score_batch(merge_params(params, self.config), batch)

    def batch_tokens(self, batch):
        return self.model.batch_tokens(batch)

    def with_base(self, base_params: PyTree, *, input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> PyTree:
        """{"base": base_params, "lora": fresh adapters} (an HF import plus new adapters)."""
        shapes = input_shapes or {k: (1,) * (3 if k == "candidate_tokens" else 2) for k in self.INPUT_FEATURES}
        boxed = jax.eval_shape(lambda r: self.model.get_initial_variables(r, shapes)["params"], jax.random.PRNGKey(0))
        lora = meta.unbox(init_adapters(boxed, self.config, jax.random.PRNGKey(self.seed)))
        return {BASE: meta.unbox(base_params), LORA: lora}


def initializer(model: LoraModel, base_initializer: Callable[[], PyTree]) -> Callable[[], PyTree]:
    """A `trainer.train(initial_checkpoint=...)` callable: the base from `base_initializer` (e.g.
    `reranker.hf_encoder_initializer(...)`) plus fresh adapters."""

    def initial_params() -> PyTree:
        return model.with_base(base_initializer())

    initial_params.__name__ = f"lora.initializer({getattr(base_initializer, '__name__', base_initializer)})"
    return initial_params


def lora_optimizer(optimizer: Any, config: LoraConfig) -> Any:
    """`optimizer` (an `optimizers.Optimizer`) applied to the trainable leaves only; every other
    update is zero and keeps no optimizer state."""
    tx = optax.multi_transform(
        {"train": optimizer.tx, "freeze": optax.set_to_zero()},
        lambda params: jax.tree.map(lambda t: "train" if t else "freeze", trainable_mask(params, config)),
    )
    return dataclasses.replace(optimizer, tx=tx)


def adapter_params(params: Mapping[str, Any], config: LoraConfig) -> dict[str, np.ndarray]:
    """What training changed, flattened 'lora/.../lora_a' -> array: adapters + trainable modules."""
    mask = trainable_mask(params, config)
    flat = jax.tree_util.tree_flatten_with_path(meta.unbox(params))[0]
    keep = jax.tree.leaves(mask)
    return {"/".join(_path_names(p)): np.asarray(jax.device_get(x)) for (p, x), k in zip(flat, keep) if k}


def save_adapters(params: Mapping[str, Any], config: LoraConfig, out_dir: str | os.PathLike) -> pathlib.Path:
    """Write adapters.safetensors + lora_config.json into `out_dir` atomically."""
    from safetensors.numpy import save_file

    from kard_jax.knowledge import atomic

    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in adapter_params(params, config).items()}
    with atomic.atomic_directory(out_dir) as tmp:
        save_file(tensors, tmp / "adapters.safetensors")
        atomic.write_json(tmp / "lora_config.json", dataclasses.asdict(config))
    return pathlib.Path(out_dir)


def load_adapters(params: Mapping[str, Any], directory: str | os.PathLike) -> PyTree:
    """`params` with the leaves saved by `save_adapters` replaced."""
    from safetensors.numpy import load_file

    saved = load_file(str(pathlib.Path(directory) / "adapters.safetensors"))
    json.loads((pathlib.Path(directory) / "lora_config.json").read_text())  # must exist and parse

    def take(path, x):
        key = "/".join(_path_names(path))
        if key in saved:
            if saved[key].shape != np.shape(x):
                raise ValueError(f"adapter {key!r} has shape {saved[key].shape}, the model expects {np.shape(x)}")
            return jnp.asarray(saved[key], x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(take, meta.unbox(params))
