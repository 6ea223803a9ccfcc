"""Inference: question -> candidate passages -> top n_docs -> student decodes -> answer -> score.

The prompt comes from `kard_jax.data.prompts.build_student_input`, the same function the seqio
tasks use for training, so the two cannot drift. Decoding is greedy, or `num_samples` samples
(top-k / top-p) with a majority vote over the parsed answers (self-consistency, as in the paper).
Outputs `predictions.jsonl` and `metrics.json`, written atomically.
"""
from __future__ import annotations

import collections
import contextlib
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


def example_keys(seed: int, indices: Sequence[int]) -> np.ndarray:
    """[n, 2] raw PRNG keys, one per example: fold_in(PRNGKey(seed), its index in the examples).
    Sampling with them gives each example the same samples whatever its batch, position, padding,
    mesh or process (padding rows: index -1 -> any key, their outputs are dropped)."""
    base = jax.random.PRNGKey(seed)
    idx = np.asarray([max(int(i), 0) for i in indices], np.uint32)
    return np.asarray(jax.vmap(lambda i: jax.random.fold_in(base, i))(idx))


def process_share(num_examples: int, process_index: int | None = None,
                  process_count: int | None = None) -> range:
    """The contiguous block of example indices a process evaluates (blocks of ceil(n / processes),
    in process order; the last ones may be shorter or empty)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    per = -(-num_examples // process_count)
    return range(min(process_index * per, num_examples), min((process_index + 1) * per, num_examples))


def _allgather_json(obj: Any) -> list[Any]:
    """Every process's `obj` (JSON-serialisable), in process order, on every process."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int32))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[: data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    return [json.loads(bytes(gathered[i, : int(n)]).decode("utf-8")) for i, n in enumerate(sizes)]


def _allgather_rows(local: np.ndarray) -> np.ndarray:
    """[local_rows, ...] from every process -> [processes * local_rows, ...] in process order."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local, tiled=False)).reshape((-1,) + local.shape[1:])


def _prediction_from_dict(d: dict) -> Prediction:
    return Prediction(d["id"], d["gold"], d["predicted"], tuple(d["texts"]), dict(d["votes"]), tuple(d["passages"]))


class _Decoder:
    """Decodes a batch of token rows: on one device (`mesh` None), or under `mesh` with the batch
    sharded over its `batch` axes and the params where they are (restored into the mesh's
    shardings). Under the mesh every process passes its own rows (the same count on each);
    the rows of all processes form the global batch and each process gets its own rows back."""

    def __init__(self, model: t5.T5, params: Any, decode: DecodeConfig, mesh: Any, rules: Any):
        from flax import linen as nn

        self.model, self.params, self.decode, self.mesh = model, params, decode, mesh
        self.greedy = decode.num_samples == 1 and decode.temperature == 0.0
        self.ways = 1
        if mesh is not None:
            from kard_jax.training import partitioning

            self.rules = partitioning.rules_for_mesh(
                partitioning.standard_logical_axis_rules() if rules is None else rules, mesh)
            self.ways = partitioning.batch_axis_size(mesh, self.rules)
            self._sharding = lambda ndim: partitioning.batch_sharding(mesh, self.rules, ndim)
            self._contexts = lambda: (jax.set_mesh(mesh), nn.logical_axis_rules(self.rules))

    def local_batch_size(self, batch_size: int) -> int:
        """Rows per process and call: the global batch (`batch_size` rounded up to a multiple of
        the batch axes' size and of the process count) over the processes."""
        if self.mesh is None:
            return batch_size
        import math

        step = math.lcm(self.ways, jax.process_count())
        return -(-batch_size // step) * step // jax.process_count()

    def __call__(self, tokens: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """tokens [rows, L], keys [rows, 2] -> [rows, num_samples, max_decode_len] (this process's rows)."""
        if self.mesh is None:
            return self._run(self.params, tokens, keys)
        rows = tokens.shape[0]
        tokens, keys = _allgather_rows(tokens), _allgather_rows(keys)
        args = [jax.make_array_from_callback(x.shape, self._sharding(x.ndim), lambda idx, x=x: x[idx])
                for x in (tokens, keys)]
        with contextlib.ExitStack() as stack:
            for context in self._contexts():
                stack.enter_context(context)
            out = self._run(self.params, *args)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            out = multihost_utils.process_allgather(out, tiled=True)
        start = jax.process_index() * rows
        return np.asarray(out)[start:start + rows]

    def _run(self, params, tokens, keys):
        d = self.decode
        if self.greedy:
            out = decoding.greedy_decode(self.model, params, tokens, max_decode_len=d.max_decode_len)[:, None]
        else:
            out, _ = decoding.sample_decode(
                self.model, params, tokens, keys, max_decode_len=d.max_decode_len, num_decodes=d.num_samples,
                temperature=d.temperature, top_k=d.top_k, top_p=d.top_p,
            )
        return out if self.mesh is not None else np.asarray(out)


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
    mesh: Any = None,
    logical_axis_rules: Any = None,
) -> list[Prediction]:
    """Runs the student over `examples`; batches are padded to a fixed shape (one compilation).

    Sampling draws each example's samples from its own key (`example_keys`: the seed and the
    example's index), so predictions do not depend on batching, the mesh or the process count.

    With a `mesh` (`jax.sharding.Mesh`; `params` restored into its shardings, e.g. by
    `run.load_student_params(..., mesh=...)`), decoding runs under it with the batch sharded over
    the `batch` logical axis (`logical_axis_rules`, default the standard table); `batch_size` is
    rounded up to a multiple of the batch axes' size. Under several processes (`jax.distributed`)
    each process retrieves passages for and decodes its own block of the examples
    (`process_share`; every process calls this with the same examples), and every process returns
    all predictions, each example once, in input order.
    """
    decoder = _Decoder(model, params, decode, mesh, logical_axis_rules)
    local_bs = decoder.local_batch_size(batch_size)
    share = process_share(len(examples)) if mesh is not None else range(len(examples))
    # Every process makes the same number of calls (the longest share's); shorter shares pad.
    longest = len(process_share(len(examples), 0)) if mesh is not None else len(examples)
    out: list[Prediction] = []
    for start in tqdm(range(0, longest, local_bs), desc="inference", unit="batch", disable=jax.process_index() != 0):
        indices = list(share[start : start + local_bs])
        batch = [examples[i] for i in indices]
        passages = passages_for(batch) if batch else []
        texts = student_inputs(batch, passages, tokenizer=tokenizer, input_length=input_length, template=template)
        tokens = tokenizer.batch_encode(texts + [""] * (local_bs - len(texts)), input_length)
        keys = example_keys(decode.seed, indices + [-1] * (local_bs - len(indices)))
        decoded = decoder(np.asarray(tokens, np.int32), keys)
        for i, e in enumerate(batch):
            outputs = tuple(tokenizer.decode(seq) for seq in decoded[i])
            answers = [prompts.parse_answer(o, len(e.options), e.options) for o in outputs]
            winner, votes = majority_vote(answers)
            out.append(Prediction(e.id, e.answer, winner, outputs, votes, tuple(passages[i])))
    if mesh is not None and jax.process_count() > 1:
        out = [_prediction_from_dict(d) for shard in _allgather_json([dataclasses.asdict(p) for p in out])
               for d in shard]
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
    student checkpoint, ...) is recorded in metrics.json as is. Under several processes (a
    `mesh` in `predict_kwargs`) each evaluates its share and process 0 writes the files.
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
    if jax.process_index() != 0:  # every process holds every prediction; one writes them
        return metrics
    write_predictions(out_dir, predictions, metrics)
    accuracy = metrics.get("accuracy")
    shown = "n/a (unlabeled examples)" if accuracy is None else (
        f"{accuracy:.4f}" + (f" +- {metrics['accuracy_std']:.4f} over {len(seeds)} seeds" if len(seeds) > 1 else ""))
    print(f"kard_jax inference: accuracy {shown} on {metrics['num_examples']} examples "
          f"({metrics['num_unparsed']} unparsed) -> {out_dir}", flush=True)
    return metrics
