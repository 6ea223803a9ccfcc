"""Inference: question -> candidate passages -> top n_docs -> student decodes -> answer -> score.

The prompt comes from `kard_jax.data.prompts.build_student_input`, the same function the seqio
tasks use for training, so the two cannot drift. Decoding is greedy, or `num_samples` samples
(top-k / top-p) with a majority vote over the parsed answers (self-consistency, as in the paper).
Outputs `predictions.jsonl` and `metrics.json`, written atomically.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import time
from typing import Any, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from kard_jax.data import prompts
from kard_jax.data.example import Example, option_letter
from kard_jax.inference.passages import PassageFn
from kard_jax.knowledge import atomic
from kard_jax.models import decoding, t5
from kard_jax.tokenizer import Tokenizer



@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Greedy when num_samples == 1 and temperature == 0; else sampling + majority vote."""

    max_decode_len: int = 128
    num_samples: int = 1
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Prediction:
    id: str
    gold: int | None  # None: unlabeled examples (predictions without accuracy)
    predicted: int | None
    texts: tuple[str, ...]
    votes: dict[str, int]
    passages: tuple[str, ...]

    @property
    def correct(self) -> bool | None:
        return None if self.gold is None else self.predicted == self.gold


def majority_vote(answers: Sequence[int | None]) -> tuple[int | None, dict[str, int]]:
    """Most common parsed answer (ties: the one reached first); None only when nothing parsed."""
    counts = collections.Counter(a for a in answers if a is not None)
    if not counts:
        return None, {}
    best = max(counts.values())
    winner = next(a for a in answers if a is not None and counts[a] == best)
    return winner, {option_letter(a): n for a, n in sorted(counts.items())}


def student_inputs(
    examples: Sequence[Example],
    passages: Sequence[Sequence[str]],
    *,
    tokenizer: Tokenizer,
    input_length: int,
    template: prompts.PromptTemplate | None = None,
) -> list[str]:
    """The student's input texts at evaluation (the seqio tasks build theirs with the same
    `prompts.build_student_input` and the same budget: `input_length` tokens with EOS)."""
    return [
        prompts.build_student_input(
            e, p, template or prompts.template_for(e.dataset),
            max_tokens=input_length - 1, count_tokens=tokenizer.count_tokens,  # -1: EOS
        )
        for e, p in zip(examples, passages)
    ]


def predict(
    examples: Sequence[Example],
    *,
    model: t5.T5,
    params: Any,
    tokenizer: Tokenizer,
    passages_for: PassageFn,
    input_length: int,
    decode: DecodeConfig = DecodeConfig(),
    batch_size: int = 8,
    template: prompts.PromptTemplate | None = None,
) -> list[Prediction]:
    """Runs the student over `examples`; batches are padded to a fixed shape (one compilation)."""
    rng = jax.random.PRNGKey(decode.seed)
    greedy = decode.num_samples == 1 and decode.temperature == 0.0
    out: list[Prediction] = []
    for start in tqdm(range(0, len(examples), batch_size), desc="inference", unit="batch"):
        batch = list(examples[start : start + batch_size])
        passages = passages_for(batch)
        texts = student_inputs(batch, passages, tokenizer=tokenizer, input_length=input_length, template=template)
        tokens = tokenizer.batch_encode(texts + [""] * (batch_size - len(texts)), input_length)
        if greedy:
            decoded = np.asarray(decoding.greedy_decode(model, params, tokens, max_decode_len=decode.max_decode_len))[:, None]
        else:
            rng, step_rng = jax.random.split(rng)
            decoded, _ = decoding.sample_decode(
                model, params, tokens, step_rng, max_decode_len=decode.max_decode_len,
                num_decodes=decode.num_samples, temperature=decode.temperature,
                top_k=decode.top_k, top_p=decode.top_p,
            )
            decoded = np.asarray(decoded)
        for i, e in enumerate(batch):
            outputs = tuple(tokenizer.decode(seq) for seq in decoded[i])
            answers = [prompts.parse_answer(o, len(e.options), e.options) for o in outputs]
            winner, votes = majority_vote(answers)
            out.append(Prediction(e.id, e.answer, winner, outputs, votes, tuple(passages[i])))
    return out


def score(predictions: Sequence[Prediction]) -> dict[str, float | int | None]:
    """Accuracy and unparsed rate; for unlabeled examples (gold None, e.g. an official test set
    without answers) `accuracy` is None: predictions only."""
    n = len(predictions)
    unparsed = sum(p.predicted is None for p in predictions)
    labeled = all(p.gold is not None for p in predictions)
    return {
        "num_examples": n,
        "accuracy": (sum(p.predicted == p.gold for p in predictions) / n if n else 0.0) if labeled else None,
        "num_unparsed": unparsed,
        "unparsed_rate": unparsed / n if n else 0.0,
    }


def write_predictions(out_dir: str | os.PathLike, predictions: Sequence[Prediction], metrics: dict) -> pathlib.Path:
    """predictions.jsonl + metrics.json in out_dir, each written to a temp file then renamed."""
    out = pathlib.Path(out_dir)
    rows = []
    for p in predictions:
        row = dataclasses.asdict(p)
        row["predicted"] = None if p.predicted is None else option_letter(p.predicted)
        row["gold"] = None if p.gold is None else option_letter(p.gold)
        row["correct"] = p.correct
        rows.append(json.dumps(row))
    atomic.write_text(out / "predictions.jsonl", "\n".join(rows) + "\n")
    atomic.write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return out


def evaluate(
    examples: Sequence[Example],
    *,
    out_dir: str | os.PathLike,
    decode: DecodeConfig = DecodeConfig(),
    seeds: Sequence[int] | None = None,
    info: dict | None = None,
    **predict_kwargs,
) -> dict:
    """`predict` + `score` + `write_predictions` for each decoding seed; prints a summary line.

    With sampling and several `seeds`, metrics.json holds the mean accuracy, its standard
    deviation over seeds and each seed's accuracy (predictions.jsonl: the first seed's).
    Greedy decoding does not depend on the seed, so it runs once. `info` (knowledge source,
    student checkpoint, ...) is recorded in metrics.json as is.
    """
    t0 = time.time()
    greedy = decode.num_samples == 1 and decode.temperature == 0.0
    seeds = [decode.seed] if (not seeds or greedy) else [int(s) for s in seeds]
    passages_for, memo = predict_kwargs.pop("passages_for"), {}

    def cached_passages(batch: Sequence[Example]) -> list[list[str]]:  # retrieve once for all seeds
        missing = [e for e in batch if e.id not in memo]
        if missing:
            memo.update(zip((e.id for e in missing), passages_for(missing)))
        return [memo[e.id] for e in batch]

    per_seed, first = [], None
    for seed in seeds:
        predictions = predict(examples, decode=dataclasses.replace(decode, seed=seed), passages_for=cached_passages,
                              **predict_kwargs)
        per_seed.append(score(predictions))
        first = first or (predictions, per_seed[-1])
    predictions, metrics = first
    metrics = dict(metrics)
    if metrics.get("accuracy") is not None:
        accuracies = [m["accuracy"] for m in per_seed]
        metrics["accuracy"] = float(np.mean(accuracies))
        metrics["accuracy_std"] = float(np.std(accuracies))
        metrics["accuracy_per_seed"] = accuracies
    metrics["seeds"] = seeds
    metrics["decode"] = dataclasses.asdict(decode) | {"greedy": greedy}
    metrics.update(info or {})
    metrics["seconds"] = round(time.time() - t0, 2)
    write_predictions(out_dir, predictions, metrics)
    accuracy = metrics.get("accuracy")
    shown = "n/a (unlabeled examples)" if accuracy is None else (
        f"{accuracy:.4f}" + (f" +- {metrics['accuracy_std']:.4f} over {len(seeds)} seeds" if len(seeds) > 1 else ""))
    print(f"kard_jax inference: accuracy {shown} on {metrics['num_examples']} examples "
          f"({metrics['num_unparsed']} unparsed) -> {out_dir}", flush=True)
    return metrics
