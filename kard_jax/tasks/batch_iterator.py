"""`SeqioBatchIterator`: a seqio task (materialized or on the fly) as numpy batches for the trainer.

Implements `kard_jax.training.data_iterator.BatchIterator`: `__next__` returns this host's rows
of the next global batch as a dict of numpy arrays (after the feature converter), and
`get_state()`/`set_state()` save and restore the position = number of batches this host has
consumed. The pipeline is deterministic for a given seed (seeded file and example shuffles,
deterministic tf.data), so a restore rebuilds it and skips `position * host_batch` examples before
batching (cheap next to training: no model work, only reading). Nothing TensorFlow crosses this
boundary.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import seqio

from kard_jax.errors import InputError
from kard_jax.tasks import cache
from kard_jax.tasks.registry import get_task_or_mixture


class SeqioBatchIterator:
    """Host-sharded, seeded, resumable numpy batches of a seqio task or mixture.

    `batch_size` is the global batch; each of `num_shards` hosts (default: jax processes) gets
    `batch_size // num_shards` rows per batch from its own shard of the data. With `cache_dir`,
    the materialized TFRecords there are read (`use_cached=True`); without it the task is
    processed on the fly. `num_epochs=None` repeats forever.
    """

    def __init__(
        self,
        *,
        task: str,
        split: str,
        task_feature_lengths: Mapping[str, int],
        feature_converter: seqio.FeatureConverter,
        batch_size: int,
        cache_dir: str | None = None,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        shard_index: int | None = None,
        num_shards: int | None = None,
        register: Sequence[Callable[[], Any]] = (),
    ):
        """`register`: callables run first (e.g. gin's `[@registry.register_kard_tasks]`) so the
        task exists before it is looked up, as in `run.materialize`."""
        for fn in register:
            fn()
        if shard_index is None or num_shards is None:
            import jax

            shard_index, num_shards = jax.process_index(), jax.process_count()
        if not 0 <= shard_index < num_shards:
            raise InputError(f"shard_index {shard_index} not in [0, {num_shards})", field="shard_index")
        if batch_size < 1 or batch_size % num_shards:
            raise InputError(f"batch_size {batch_size} must be a positive multiple of {num_shards} hosts",
                             field="batch_size")
        provider = get_task_or_mixture(task)
        if cache_dir is not None:
            for sub in seqio.get_subtasks(provider):
                cache.use_cache_dir(cache_dir, sub.name, split)
        self.task, self.split, self.seed = task, split, seed
        self.shard_index, self.num_shards = shard_index, num_shards
        self.host_batch_size = batch_size // num_shards
        self._kwargs = dict(
            mixture_or_task_name=provider,
            task_feature_lengths=dict(task_feature_lengths),
            feature_converter=feature_converter,
            dataset_split=split,
            use_cached=cache_dir is not None,
            shuffle=shuffle,
            num_epochs=num_epochs,
            shard_info=seqio.ShardInfo(index=shard_index, num_shards=num_shards),
            seed=seed,
        )
        self._position = 0
        self._iterator = self._make(0)

    @property
    def vocab_size(self) -> int:
        """The size of the largest vocabulary of the task's output features (extra ids included):
        every token id is below it (the trainer checks it against the model's `vocab_size`)."""
        features = self._kwargs["mixture_or_task_name"].output_features
        return max(feature.vocabulary.vocab_size for feature in features.values())

    def _make(self, position: int) -> Iterator[dict[str, np.ndarray]]:
        ds = seqio.get_dataset(**self._kwargs, verbose=False)
        ds = ds.skip(position * self.host_batch_size).batch(self.host_batch_size, drop_remainder=True)
        return ds.as_numpy_iterator()

    def __iter__(self) -> "SeqioBatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        self._position += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"position": self._position, "seed": self.seed, "task": self.task, "split": self.split,
                "shard_index": self.shard_index, "num_shards": self.num_shards}

    def set_state(self, state: Mapping[str, Any]) -> None:
        mine = self.get_state()
        for key in ("seed", "task", "split", "num_shards"):
            if key in state and state[key] != mine[key]:
                raise InputError(f"iterator state was saved with {key}={state[key]!r}, this iterator has "
                                 f"{mine[key]!r}", field="data_iterator")
        self._position = int(state["position"])
        self._iterator = self._make(self._position)
