"""Evaluation of student outputs in seqio's style: a postprocess_fn and metric_fns.

`postprocess_answer` turns a decoded output into the option index it commits to
(`kard_jax.data.prompts.parse_answer`, the parser inference uses) or -1 when none can be parsed;
for targets it returns the gold index stored in the example. `answer_accuracy` reports accuracy
in percent plus how many outputs gave no parsable answer.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from kard_jax.data import prompts

UNPARSED = -1


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def postprocess_answer(output, example: Mapping | None = None, is_target: bool = False) -> int:
    """Option index of a decoded output (UNPARSED if none); the gold answer for targets."""
    if example is None:
        raise ValueError("postprocess_answer needs the example (its options)")
    if is_target:
        return int(example["answer"])
    options = [_text(o) for o in example["options"]]
    index = prompts.parse_answer(_text(output), len(options), options)
    return UNPARSED if index is None else int(index)


def answer_accuracy(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    """accuracy (%), count and fraction of predictions with no parsable answer, example count."""
    targets, predictions = np.asarray(targets), np.asarray(predictions)
    if targets.shape != predictions.shape:
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
    n = len(targets)
    unparsed = int(np.sum(predictions == UNPARSED))
    return {
        "accuracy": 100.0 * float(np.mean(targets == predictions)) if n else 0.0,
        "num_unparsed": float(unparsed),
        "unparsed_rate": float(unparsed) / n if n else 0.0,
        "num_examples": float(n),
    }
