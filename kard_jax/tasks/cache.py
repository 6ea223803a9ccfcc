"""Materialized tasks: sharded TFRecords in seqio's offline-cache layout, written without Beam.

Why an own writer: `seqio.cache_tasks_main` needs apache-beam (not installed, and a heavy
dependency for what is a single-process loop at KARD's scale: ~100k examples per dataset). This
writer runs a task's pre-cache preprocessors (everything before `seqio.CacheDatasetPlaceholder`:
record building + tokenization) and writes exactly the files seqio's cache reader expects, so
the standard `seqio.get_dataset(..., use_cached=True, shard_info=seqio.ShardInfo(i, n))` reads
them back: each host of a pod reads its own files (file-level sharding when there are at least as
many files as hosts, example-level otherwise). Layout of `{cache_dir}/{task}/`::

    {split}.tfrecord-00000-of-00004 ...   tf.train.Example protos (round-robin over shards)
    info.{split}.json                     {"num_shards", "features": {name: {shape, dtype}}, "seqio_version"}
    stats.{split}.json                    {"examples", "{feature}_tokens", "{feature}_max_tokens"}
    manifest.{split}.json                 ours: counts per shard, lengths, time, versions, and
                                          "built_from": the settings and input hashes (below)
    COMPLETED                             seqio's "this task is cached" marker

A split is written into a temp directory and moved into place (info file last), so a reader never
sees a half-written split.

**Stale caches are refused.** A task registered by `registry.register_kard_tasks` records, in its
manifest, what its records were built from (`built_from`): the settings that shape them (passages
per prompt, lengths, example format, prompt template, ...) and a hash of each input's contents
(examples file, rationales, vocabulary, retrieval cache and knowledge-base manifests: see
`task_fingerprint`). Reading the cache back (`use_cache_dir`, what training with `cache_dir` does)
recomputes that record from the run's own registration and raises an InputError naming what
differs, so a cache materialized with N_PASSAGES=1 is never read by a run configured with 2.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any, Mapping

import numpy as np
import seqio
import tensorflow as tf
from tqdm.auto import tqdm

from kard_jax.errors import InputError
from kard_jax.tasks import registry
from kard_jax.tasks.registry import get_task_or_mixture

_RAGGED_PREFIX = "_ragged_rows:"


def task_cache_dir(cache_dir: str | os.PathLike, task: str) -> pathlib.Path:
    return pathlib.Path(cache_dir) / seqio.utils.get_task_dir_from_name(task)


def _flatten_ragged(ex):
    """Replace each ragged [n, None] feature by its flat values plus its row lengths."""
    out = {}
    for k, v in ex.items():
        if isinstance(v, tf.RaggedTensor):
            out[k] = v.flat_values
            out[_RAGGED_PREFIX + k] = v.row_lengths()
        else:
            out[k] = v
    return out


def _to_tf_example(ex: dict[str, Any]) -> bytes:
    features = {}
    for key, value in ex.items():
        if key.startswith(_RAGGED_PREFIX):
            name = key[len(_RAGGED_PREFIX):]
            key = seqio.utils.tfexample_ragged_length_key(name, 0)
        value = np.asarray(value)
        flat = value.reshape(-1)
        if value.dtype.kind in "biu":
            features[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=flat.tolist()))
        elif value.dtype.kind == "f":
            features[key] = tf.train.Feature(float_list=tf.train.FloatList(value=flat.tolist()))
        else:
            features[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[bytes(b) for b in flat]))
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def _feature_info(element_spec) -> dict[str, dict]:
    info = {}
    for k, spec in element_spec.items():
        shape = spec.shape.as_list()
        info[k] = {"shape": ([None] + shape[1:]) if shape else [], "dtype": spec.dtype.name}
    return info


_FINGERPRINT_FORMAT = "kard_jax.task_cache.built_from/1"
# Arguments of register_kard_tasks naming files or directories: compared by contents, not path.
_PATH_ARGUMENTS = ("train_path", "vocab_path", "rationales_path", "retrieval_cache_dir", "kb_dir",
                   "reranker_vocab_path")
_SPLIT_PATH_ARGUMENTS = ("eval_paths", "eval_retrieval_cache_dirs", "eval_rankings")  # {split: path}
_RERANKER_ONLY = {"reranker_vocab_path", "reranker_max_candidates", "reranker_holdout_fraction",
                  "reranker_candidate_pool", "reranker_stored_passages",
                  "reranker_holdout_start"}
_EVAL_ONLY = {"eval_retrieval_cache_dirs", "eval_rankings", "eval_passage_source"}
_RETRIEVAL = {"retrieval_cache_dir", "kb_dir", "n_passages"}
# Arguments that cannot change a variant's records (everything else, new arguments included, counts).
_UNUSED = {  # query_form: the reranker's question query (kard_eval reads it from its caches' builds)
    "ft": {"rationales_path", "query_form", *_RETRIEVAL, *_EVAL_ONLY, *_RERANKER_ONLY},
    "rd": {"query_form", *_RETRIEVAL, *_EVAL_ONLY, *_RERANKER_ONLY},
    "kard": {"query_form", *_EVAL_ONLY, *_RERANKER_ONLY},
    "kard_eval": {"rationales_path", "retrieval_cache_dir", *_RERANKER_ONLY},
    "reranker": {"n_passages", *_EVAL_ONLY},
}
# shuffle_buffer_size: applied when reading, after the cache; prompt_template: compared resolved
# (the "template" entry), so naming a dataset's own template explicitly is no change.
_NEVER = {"shuffle_buffer_size", "prompt_template"}
_FULL_HASH_LIMIT = 1 << 30  # directories up to 1 GiB are hashed in full; larger: manifest + file sizes


def _sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_hash(path: str | os.PathLike | None) -> str | None:
    """sha256 of a file's bytes; of a directory: of every file's relative path and contents (for a
    directory over 1 GiB, e.g. a knowledge base: its manifest.json plus every file's path and
    size); "missing" when the path does not exist."""
    if path is None:
        return None
    path = pathlib.Path(path)
    if path.is_file():
        return _sha256_file(path)
    if not path.is_dir():
        return "missing"
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    full = sum(p.stat().st_size for p in files) <= _FULL_HASH_LIMIT
    digest = hashlib.sha256()
    for p in files:
        rel = p.relative_to(path).as_posix()
        body = _sha256_file(p) if full or rel == "manifest.json" else f"size={p.stat().st_size}"
        digest.update(f"{rel}\0{body}\n".encode())
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=repr))


def task_fingerprint(task: str, split: str) -> dict | None:
    """What `task`:`split`'s records are built from, or None for a task that
    `registry.register_kard_tasks` did not register (nothing to compare):
    {"format", "variant", "settings": {argument: value}, "inputs": {argument: content hash},
    "input_paths": {argument: path} (informational), "template": the prompt template}."""
    entry = registry.TASK_SETTINGS.get(task)
    if entry is None:
        return None
    variant, arguments = entry
    unused = _UNUSED.get(variant, set()) | _NEVER
    if variant == "rd" and split != registry.TRAIN_SPLIT:  # evaluation: answer-only targets, no rationales
        unused |= {"rationales_path"}
    settings, paths = {}, {}
    for name, value in arguments.items():
        if name in unused:
            continue
        if name in _SPLIT_PATH_ARGUMENTS:
            value = dict(value or {}).get(split)
            if value is not None:
                paths[name] = value
        elif name in _PATH_ARGUMENTS:
            if name == "train_path" and split in dict(arguments.get("eval_paths") or {}):
                continue  # an eval split is read from its own file
            if value is not None:
                paths[name] = value
        else:
            settings[name] = value
    from kard_jax.data import prompts

    template = prompts.template_for(arguments.get("prompt_template") or arguments["dataset"])
    return {
        "format": _FINGERPRINT_FORMAT,
        "variant": variant,
        "settings": _jsonable(settings),
        "inputs": {name: content_hash(path) for name, path in sorted(paths.items())},
        "input_paths": {name: os.fspath(path) for name, path in sorted(paths.items())},
        "template": repr(template),
    }


def fingerprint_differences(built: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two `task_fingerprint`s (input paths are not compared)."""
    out = []
    for key in sorted(set(built.get("settings", {})) | set(now.get("settings", {}))):
        old, new = built.get("settings", {}).get(key, "<unset>"), now.get("settings", {}).get(key, "<unset>")
        if old != new:
            out.append(f"{key}: built with {old!r}, now {new!r}")
    for key in sorted(set(built.get("inputs", {})) | set(now.get("inputs", {}))):
        old, new = built.get("inputs", {}).get(key), now.get("inputs", {}).get(key)
        if old != new:
            now_path = now.get("input_paths", {}).get(key, "<none>")
            built_path = built.get("input_paths", {}).get(key, "<none>")
            where = now_path if now_path == built_path else f"{built_path} then, {now_path} now"
            out.append(f"{key}: contents differ ({where})" if old and new else f"{key}: {where}")
    for key in ("variant", "template", "format"):
        if built.get(key) != now.get(key):
            out.append(f"{key}: built with {built.get(key)!r}, now {now.get(key)!r}")
    return out


def write_task_cache(
    task: str,
    split: str,
    cache_dir: str | os.PathLike,
    *,
    num_shards: int,
    show_progress: bool = True,
) -> dict:
    """Materialize `task`:`split` into `cache_dir/task/` in `num_shards` files; returns the manifest."""
    if num_shards < 1:
        raise InputError(f"num_shards must be >= 1, got {num_shards}", field="num_shards")
    provider = get_task_or_mixture(task)
    if not isinstance(provider, seqio.Task) or not provider.supports_caching:
        raise InputError(f"{task!r} is not a cacheable seqio Task (mixtures are cached task by task)", field="task")
    if split not in provider.splits:
        raise InputError(f"task {task!r} has no split {split!r}; splits: {list(provider.splits)}", field="split")
    built_from = task_fingerprint(task, split)  # before the records: inputs hashed as they are read
    start = time.time()
    ds = provider.preprocess_precache(provider.source.get_dataset(split=split, shuffle=False))
    build_s = time.time() - start  # records are built eagerly when the source is created
    spec = ds.element_spec
    ragged = {k for k, s in spec.items() if isinstance(s, tf.RaggedTensorSpec)}
    info = {"num_shards": num_shards, "features": _feature_info(spec), "seqio_version": seqio.__version__}
    token_features = [k for k, s in spec.items() if s.dtype == tf.int32 and (k in provider.output_features or k in ragged)]
    stats: dict[str, Any] = {"examples": 0}
    for k in token_features:
        stats[f"{k}_tokens"] = 0
        stats[f"{k}_max_tokens"] = 0
    out = task_cache_dir(cache_dir, task)
    out.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=out, prefix=f".{split}.tmp-"))
    try:
        names = [f"{split}.tfrecord-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]
        writers = [tf.io.TFRecordWriter(str(tmp / n)) for n in names]
        per_shard = [0] * num_shards
        bar = tqdm(desc=f"materialize {task}:{split}", unit=" ex", disable=not show_progress, mininterval=2.0)
        for i, ex in enumerate(ds.map(_flatten_ragged).as_numpy_iterator()):
            writers[i % num_shards].write(_to_tf_example(ex))
            per_shard[i % num_shards] += 1
            for k in token_features:
                n = int(np.count_nonzero(ex[k]))
                stats[f"{k}_tokens"] += n
                stats[f"{k}_max_tokens"] = max(stats[f"{k}_max_tokens"], int(np.size(ex[k])))
            bar.update(1)
        bar.close()
        for w in writers:
            w.close()
        stats["examples"] = sum(per_shard)
        if not stats["examples"]:
            raise InputError(f"task {task!r} split {split!r} produced no examples", field="split")
        elapsed = time.time() - start
        manifest = {
            "format": "kard_jax.task_cache/1",
            "task": task,
            "split": split,
            "num_shards": num_shards,
            "examples": stats["examples"],
            "examples_per_shard": per_shard,
            "files": names,
            "seconds": round(elapsed, 3),
            "record_build_seconds": round(build_s, 3),
            "examples_per_second": round(stats["examples"] / max(elapsed, 1e-9), 1),
            "versions": {"seqio": seqio.__version__, "tensorflow": tf.__version__},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "built_from": built_from,
        }
        (tmp / f"stats.{split}.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
        (tmp / f"manifest.{split}.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        (tmp / f"info.{split}.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        # Replace the split: drop its old files (any shard count), then move the new ones, info last.
        (out / f"info.{split}.json").unlink(missing_ok=True)
        for old in out.glob(f"{split}.tfrecord-*"):
            old.unlink()
        for name in [*names, f"stats.{split}.json", f"manifest.{split}.json", f"info.{split}.json"]:
            os.replace(tmp / name, out / name)
        (out / "COMPLETED").touch()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def use_cache_dir(cache_dir: str | os.PathLike, task: str, split: str) -> None:
    """Make seqio read `task` from `cache_dir` (`use_cached=True`); `split` must be materialized.

    seqio's cache lookup is process-global (the first of its global cache dirs holding the task
    wins, remembered per Task), so the Task is pointed at this directory explicitly: a second
    cache of the same task elsewhere (another run, another test) can never be read by mistake.
    """
    directory = task_cache_dir(cache_dir, task)
    info = directory / f"info.{split}.json"
    if not info.is_file() or not (directory / "COMPLETED").is_file():
        raise InputError(
            f"task {task!r} split {split!r} is not materialized here (run gin_configs/runs/materialize.gin)",
            path=info,
        )
    check_not_stale(directory, task, split)
    provider = get_task_or_mixture(task)
    provider._cache_dir = str(directory)  # seqio 0.0.20 Task.cache_dir memo (no public setter)


def check_not_stale(directory: str | os.PathLike, task: str, split: str) -> None:
    """InputError naming what differs when the materialized `task`:`split` in `directory` was
    built from other settings or inputs than the task as registered now."""
    now = task_fingerprint(task, split)
    if now is None:  # not a register_kard_tasks task: nothing recorded to compare with
        return
    manifest_path = pathlib.Path(directory) / f"manifest.{split}.json"
    try:
        built = json.loads(manifest_path.read_text()).get("built_from")
    except (OSError, ValueError) as e:
        raise InputError(f"unreadable task cache manifest ({e})", path=manifest_path) from None
    if built is None:
        raise InputError(f"task cache of {task!r} split {split!r} does not record what it was built from (written "
                         "by an older kard_jax): materialize it again", path=manifest_path, field="built_from")
    differences = fingerprint_differences(built, now)
    if differences:
        raise InputError(
            f"stale task cache of {task!r} split {split!r}: built from other settings than this run's ("
            + "; ".join(differences) + "); materialize it again (runs/materialize.gin) with this run's settings "
            "or train with the settings it was built with", path=manifest_path, field="built_from")
