"""Batch iterators the trainer consumes (TensorFlow-free), with checkpointable positions.

`BatchIterator` is the protocol: numpy batches (this host's share of each global batch) and a
JSON-able position. `InMemoryBatchIterator` is a deterministic in-memory source (tests, demos);
the seqio TFRecord reader in `kard_jax.tasks` implements the same protocol.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from kard_jax.errors import InputError

Batch = dict[str, np.ndarray]


@runtime_checkable
class BatchIterator(Protocol):
    """Yields dict[str, np.ndarray] batches; `get_state()`/`set_state()` save and restore the position."""

    def __iter__(self) -> Iterator[Batch]: ...

    def __next__(self) -> Batch: ...

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: Mapping[str, Any]) -> None: ...


class InMemoryBatchIterator:
    """Seed-shuffled epochs over a list of feature dicts; the position is (epoch, index).

    `batch_size` is the global batch; with `num_shards` > 1 (one per host) each shard yields
    its contiguous `batch_size // num_shards` rows of every global batch, so the global batch
    is the same whatever the host count. Batches never straddle epochs (the tail of an epoch
    that does not fill a batch is dropped). `num_epochs=None` repeats forever.
    """

    def __init__(
        self,
        examples: Sequence[Mapping[str, Any]],
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        shard_index: int = 0,
        num_shards: int = 1,
        vocab_size: int | None = None,
    ):
        """`vocab_size`: the size of the vocabulary the token features come from, if known (the
        trainer refuses a model whose `vocab_size` is smaller)."""
        if not examples:
            raise InputError("no examples", field="examples")
        if batch_size <= 0 or batch_size > len(examples):
            raise InputError(f"batch_size must be in [1, {len(examples)}], got {batch_size}", field="batch_size")
        if batch_size % num_shards:
            raise InputError(f"batch_size {batch_size} is not divisible by {num_shards} shards", field="batch_size")
        keys = set(examples[0])
        self._features: dict[str, np.ndarray] = {}
        for key in sorted(keys):
            try:
                self._features[key] = np.stack([np.asarray(ex[key]) for ex in examples])
            except (KeyError, ValueError) as e:
                bad = next(i for i, ex in enumerate(examples)
                           if key not in ex or np.shape(ex[key]) != np.shape(examples[0][key]))
                raise InputError(f"feature missing or shaped differently from example 1 ({e})",
                                 path="<in-memory examples>", line=bad + 1, field=key) from None
        self.num_examples = len(examples)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.shard_index = shard_index
        self.num_shards = num_shards
        self.vocab_size = vocab_size
        self.batches_per_epoch = self.num_examples // batch_size
        self._epoch = 0
        self._index = 0  # batch index within the epoch

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def __iter__(self) -> "InMemoryBatchIterator":
        return self

    def __next__(self) -> Batch:
        if self._index >= self.batches_per_epoch:
            self._epoch, self._index = self._epoch + 1, 0
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        local = self.batch_size // self.num_shards
        start = self._index * self.batch_size + self.shard_index * local
        rows = self._order(self._epoch)[start:start + local]
        self._index += 1
        return {k: v[rows] for k, v in self._features.items()}

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "index": self._index, "seed": self.seed, "num_examples": self.num_examples}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("num_examples", self.num_examples) != self.num_examples or state.get("seed", self.seed) != self.seed:
            raise InputError(
                f"iterator state {dict(state)} was saved for a different source "
                f"({self.num_examples} examples, seed {self.seed})", field="data_iterator",
            )
        self._epoch, self._index = int(state["epoch"]), int(state["index"])


def _shard_defaults(shard_index: int | None, num_shards: int | None) -> tuple[int, int]:
    if shard_index is not None and num_shards is not None:
        return shard_index, num_shards
    import jax

    return jax.process_index(), jax.process_count()


def synthetic_seq2seq_examples(
    *,
    task: str = "copy",
    num_examples: int = 256,
    min_length: int = 4,
    max_length: int = 12,
    vocab_size: int = 64,
    seed: int = 0,
    pad_id: int = 0,
    eos_id: int = 1,
    decoder_start_token_id: int = 0,
) -> list[dict[str, np.ndarray]]:
    """A toy seq2seq task in EncDec feature-converter form: target = input (copy) or reversed.

    Token ids 2..vocab_size-1 (0 = pad, 1 = EOS); inputs and targets end with EOS and are padded
    to `max_length + 1`. The loss weights are 1 on target tokens (EOS included), 0 on padding.
    """
    if task not in ("copy", "reverse"):
        raise InputError(f"unknown synthetic task {task!r} (copy | reverse)", field="task")
    if not 1 <= min_length <= max_length or vocab_size < 3:
        raise InputError("need 1 <= min_length <= max_length and vocab_size >= 3", field="synthetic_seq2seq_examples")
    rng = np.random.default_rng(seed)
    width = max_length + 1
    examples = []
    for _ in range(num_examples):
        n = int(rng.integers(min_length, max_length + 1))
        tokens = rng.integers(2, vocab_size, size=n)
        target = tokens if task == "copy" else tokens[::-1]
        enc = np.full(width, pad_id, np.int32)
        enc[:n], enc[n] = tokens, eos_id
        tgt = np.full(width, pad_id, np.int32)
        tgt[:n], tgt[n] = target, eos_id
        dec_in = np.concatenate([[decoder_start_token_id], tgt[:-1]]).astype(np.int32)
        weights = np.zeros(width, np.float32)
        weights[:n + 1] = 1.0
        examples.append({
            "encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
            "decoder_target_tokens": tgt, "decoder_loss_weights": weights,
        })
    return examples


def synthetic_copy_task(
    *,
    batch_size: int = 32,
    task: str = "copy",
    num_examples: int = 1024,
    min_length: int = 4,
    max_length: int = 12,
    vocab_size: int = 64,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    num_shards: int | None = None,
) -> InMemoryBatchIterator:
    """A seed-shuffled iterator over `synthetic_seq2seq_examples` (the demo's data).

    Endless by default (training); `num_epochs=1, shuffle=False` gives one pass (evaluation).
    """
    shard_index, num_shards = _shard_defaults(shard_index, num_shards)
    examples = synthetic_seq2seq_examples(
        task=task, num_examples=num_examples, min_length=min_length, max_length=max_length,
        vocab_size=vocab_size, seed=seed,
    )
    return InMemoryBatchIterator(examples, batch_size=batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                                 shard_index=shard_index, num_shards=num_shards, vocab_size=vocab_size)
