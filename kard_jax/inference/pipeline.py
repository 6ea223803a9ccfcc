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
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from kard_jax.data import prompts
from kard_jax.data.example import Example, option_letter
from kard_jax.models import decoding, t5
from kard_jax.tokenizer import Tokenizer

# passages_for(examples) -> one list of passage strings (already formatted) per example.
PassageFn = Callable[[Sequence[Example]], list[list[str]]]


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
    gold: int
    predicted: int | None
    texts: tuple[str, ...]
    votes: dict[str, int]
    passages: tuple[str, ...]

    @property
    def correct(self) -> bool:
        return self.predicted == self.gold


def majority_vote(answers: Sequence[int | None]) -> tuple[int | None, dict[str, int]]:
    """Most common parsed answer (ties: the one reached first); None only when nothing parsed."""
    counts = collections.Counter(a for a in answers if a is not None)
    if not counts:
        return None, {}
    best = max(counts.values())
    winner = next(a for a in answers if a is not None and counts[a] == best)
    return winner, {option_letter(a): n for a, n in sorted(counts.items())}


def bm25_question_passages(kb_dir: str | os.PathLike, n_docs: int) -> PassageFn:
    """Top n_docs passages by BM25 with the question (and its options) as the query."""
    from kard_jax.knowledge import run as knowledge_run

    store, bm25 = knowledge_run.load_kb(kb_dir)

    def passages_for(examples: Sequence[Example]) -> list[list[str]]:
        if n_docs == 0:
            return [[] for _ in examples]
        queries = [prompts.format_question(e) for e in examples]
        indices, _ = bm25.search(queries, k=n_docs)
        return [[prompts.format_passage(p.title, p.text) for p in store.get_many(row)] for row in indices]

    return passages_for


def no_passages(examples: Sequence[Example]) -> list[list[str]]:
    """FT / RD students: no knowledge in the prompt."""
    return [[] for _ in examples]


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
        texts = [
            prompts.build_student_input(
                e, p, template or prompts.template_for(e.dataset),
                max_tokens=input_length - 1, count_tokens=tokenizer.count_tokens,  # -1: EOS
            )
            for e, p in zip(batch, passages)
        ]
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


def score(predictions: Sequence[Prediction]) -> dict[str, float | int]:
    n = len(predictions)
    unparsed = sum(p.predicted is None for p in predictions)
    return {
        "num_examples": n,
        "accuracy": sum(p.correct for p in predictions) / n if n else 0.0,
        "num_unparsed": unparsed,
        "unparsed_rate": unparsed / n if n else 0.0,
    }


def write_predictions(out_dir: str | os.PathLike, predictions: Sequence[Prediction], metrics: dict) -> pathlib.Path:
    """predictions.jsonl + metrics.json in out_dir, each written to a temp file then renamed."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def atomic_write(name: str, text: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, out / name)

    rows = []
    for p in predictions:
        row = dataclasses.asdict(p)
        row["predicted"] = None if p.predicted is None else option_letter(p.predicted)
        row["gold"] = option_letter(p.gold)
        row["correct"] = p.correct
        rows.append(json.dumps(row))
    atomic_write("predictions.jsonl", "\n".join(rows) + "\n")
    atomic_write("metrics.json", json.dumps(metrics, indent=2) + "\n")
    return out


def evaluate(examples: Sequence[Example], *, out_dir: str | os.PathLike, **predict_kwargs) -> dict:
    """`predict` + `score` + `write_predictions`; prints a summary line and returns the metrics."""
    t0 = time.time()
    predictions = predict(examples, **predict_kwargs)
    metrics = score(predictions)
    metrics["seconds"] = round(time.time() - t0, 2)
    write_predictions(out_dir, predictions, metrics)
    print(
        f"kard_jax inference: accuracy {metrics['accuracy']:.4f} on {metrics['num_examples']} examples "
        f"({metrics['num_unparsed']} unparsed) -> {out_dir}"
    )
    return metrics
