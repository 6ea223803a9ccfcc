"""Gin-importable helpers for the subprocess training tests (no tests in this module).

`slow_copy_task` paces the synthetic data so a test can signal or kill a training process
between two checkpoints; pacing changes no values, so runs stay comparable.
"""
import time
from typing import Any, Mapping

from kard_jax.training import data_iterator


class SlowIterator:
    """A BatchIterator that sleeps `delay_s` before each batch."""

    def __init__(self, inner: data_iterator.InMemoryBatchIterator, delay_s: float):
        self.inner = inner
        self.delay_s = delay_s

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(self.delay_s)
        return next(self.inner)

    def get_state(self) -> dict[str, Any]:
        return self.inner.get_state()

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.inner.set_state(state)


def slow_copy_task(*, delay_s: float = 0.3, **kwargs) -> SlowIterator:
    return SlowIterator(data_iterator.synthetic_copy_task(**kwargs), delay_s)
