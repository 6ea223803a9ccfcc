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
    manifest.{split}.json                 ours: counts per shard, lengths, time, versions
    COMPLETED                             seqio's "this task is cached" marker

A split is written into a temp directory and moved into place (info file last), so a reader never
sees a half-written split.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import seqio
import tensorflow as tf
from tqdm.auto import tqdm

from kard_jax.errors import InputError
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
    provider = get_task_or_mixture(task)
    provider._cache_dir = str(directory)  # seqio 0.0.20 Task.cache_dir memo (no public setter)
