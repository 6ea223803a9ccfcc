"""Reranker evaluation (gin_configs/runs/eval_reranker.gin): how well a passage ranking made with
the question alone finds the passages rationale-based retrieval finds (KARD Fig. 4c).

Definitions (one place):
  silver passages of a question   the union, over its kept teacher rationales, of the top
                                  `silver_top_k` passages by BM25 with the rationale as the query
                                  (what the student is trained with, `kard` task, n_passages=1)
  Hits@k                          share of questions whose ranking has a silver passage among its
                                  first k
  MRR                             mean of 1 / (rank of the first silver passage), 0 when the list
                                  (of `n_candidates`) holds none

Rankings compared on the same questions: BM25 by the question query, dense by the question query
(when the KB has a dense index and an embedder is given), the trained reranker over the BM25
candidates, the same reranker untrained (its initialisation), and the BM25 candidates in random
order. Questions can be restricted to the held-out ones of reranker training
(`kard_jax.data.splits.is_held_out`, the same fraction and start as `registry.register_kard_tasks`).
Writes metrics.json, results.md, first_silver_ranks.jsonl (each question's first silver rank per
ranking) and TensorBoard scalars to `out_dir`. `pool_evaluations` (runs/pool_reranker_evals.gin)
pools the evaluations of K cross-validation folds into one table over every question, each judged
by the reranker that did not train on it.
"""
from __future__ import annotations

import math
import os
import pathlib
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from kard_jax.data.example import Example
from kard_jax.data.query import DEFAULT_QUERY_FORM, check_query_form
from kard_jax.data.splits import is_held_out
from kard_jax.errors import InputError
from kard_jax.inference import passages as passages_lib
from kard_jax.knowledge import atomic

DEFAULT_KS = (1, 3, 5, 10)


def silver_sets(kb: passages_lib.KnowledgeBase, rationales: Mapping[str, Sequence[str]],
                question_ids: Sequence[str], silver_top_k: int = 1) -> dict[str, set[int]]:
    """question id -> store positions of its silver passages (see the module docstring)."""
    flat = [(qid, " ".join(r.split())) for qid in question_ids for r in rationales.get(qid, ()) if r.strip()]
    out: dict[str, set[int]] = {qid: set() for qid in question_ids}
    if flat:
        indices, _ = kb.bm25.search([text for _, text in flat], k=silver_top_k)
        for (qid, _), row in zip(flat, indices):
            out[qid].update(int(i) for i in row)
    return out


def first_silver_ranks(rankings: Sequence[Sequence[int]], silver: Sequence[set[int]]) -> list[int | None]:
    """Per question, the 1-based rank of its first silver passage in its ranking (None: none ranked)."""
    if len(rankings) != len(silver):
        raise ValueError("one ranking per silver set")
    return [next((i + 1 for i, p in enumerate(ranking) if p in gold), None) for ranking, gold in zip(rankings, silver)]


def ranking_metrics(rankings: Sequence[Sequence[int]], silver: Sequence[set[int]],
                    ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Hits@k and MRR of `rankings` (store positions, best first) against the silver sets."""
    return metrics_from_first_ranks(first_silver_ranks(rankings, silver), ks)


def metrics_from_first_ranks(first: Sequence[int | None], ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Hits@k and MRR from each question's `first_silver_ranks`."""
    if not first:
        return {**{f"hits@{k}": 0.0 for k in ks}, "mrr": 0.0, "num_questions": 0}
    out = {f"hits@{k}": float(np.mean([r is not None and r <= k for r in first])) for k in ks}
    out["mrr"] = float(np.mean([0.0 if r is None else 1.0 / r for r in first]))
    out["num_questions"] = len(first)
    return out


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign test (McNemar's exact test) of `wins` vs `losses` discordant pairs:
    the probability under "either ranking is as likely to win a discordant question" of a split
    at least this uneven. 1.0 with no discordant question."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / (1 << n))  # exact integers: 2.0**n overflows past 1,023 pairs


def paired_comparison(first: Sequence[int | None], reference: Sequence[int | None],
                      ks: Sequence[int] = DEFAULT_KS) -> dict[str, dict[str, float]]:
    """Per k, on the same questions: `wins` (this ranking has a silver passage in its first k, the
    reference does not), `losses` (the reverse) and the exact sign test's two-sided `p_value`.
    The difference of the two Hits@k is (wins - losses) / questions; p says whether it is noise."""
    if len(first) != len(reference):
        raise ValueError("paired comparison needs both rankings of the same questions")
    out = {}
    for k in ks:
        hit = [r is not None and r <= k for r in first]
        ref = [r is not None and r <= k for r in reference]
        wins = sum(a and not b for a, b in zip(hit, ref))
        losses = sum(b and not a for a, b in zip(hit, ref))
        out[f"hits@{k}"] = {"wins": wins, "losses": losses, "p_value": sign_test_p(wins, losses)}
    return out


def random_order_ranker(candidates: passages_lib.Ranker, seed: int = 0) -> passages_lib.Ranker:
    """The candidates' list in a random order (the floor a reranker must beat)."""
    rng = np.random.default_rng(seed)

    def rank(examples: Sequence[Example]) -> list[list[int]]:
        return [list(rng.permutation(row)) for row in candidates(examples)]

    return rank


def judged_examples(examples: Sequence[Example], silver: Mapping[str, set[int]]) -> list[Example]:
    """The examples with at least one silver passage (the only ones a ranking can be judged on)."""
    judged = [e for e in examples if silver.get(e.id)]
    if not judged:
        raise InputError("no evaluated question has a silver passage (no kept rationale for any of them): "
                         "nothing to judge the rankings against", field="rationales_path")
    return judged


def rankers_first_ranks(judged: Sequence[Example], rankers: Mapping[str, passages_lib.Ranker],
                        silver: Mapping[str, set[int]], batch_size: int = 64) -> dict[str, list[int | None]]:
    """Per ranker name, each judged question's `first_silver_ranks` (in `judged` order)."""
    gold = [silver[e.id] for e in judged]
    firsts = {}
    for name, ranker in rankers.items():
        rankings: list[list[int]] = []
        for start in tqdm(range(0, len(judged), batch_size), desc=f"rank:{name}", unit="batch", mininterval=2.0):
            rankings.extend(ranker(judged[start:start + batch_size]))
        firsts[name] = first_silver_ranks(rankings, gold)
    return firsts


def results_from_first_ranks(firsts: Mapping[str, Sequence[int | None]], ks: Sequence[int] = DEFAULT_KS,
                             reference: str | None = None) -> dict[str, dict[str, Any]]:
    """metrics per ranker name from its questions' first silver ranks; with `reference` (a ranker
    name), every other ranker's metrics also hold `vs_<reference>`, its `paired_comparison` with
    that ranker on the same questions."""
    out = {name: metrics_from_first_ranks(first, ks) for name, first in firsts.items()}
    if reference is not None:
        for name in out:
            if name != reference:
                out[name][f"vs_{reference}"] = paired_comparison(firsts[name], firsts[reference], ks)
    return out


def evaluate_rankers(examples: Sequence[Example], rankers: Mapping[str, passages_lib.Ranker],
                     silver: Mapping[str, set[int]], *, ks: Sequence[int] = DEFAULT_KS,
                     batch_size: int = 64, reference: str | None = None) -> dict[str, dict[str, Any]]:
    """metrics per ranker name, over the examples that have at least one silver passage (see
    `results_from_first_ranks`)."""
    judged = judged_examples(examples, silver)
    return results_from_first_ranks(rankers_first_ranks(judged, rankers, silver, batch_size), ks, reference)


def format_table(results: Mapping[str, Mapping[str, float]], ks: Sequence[int] = DEFAULT_KS) -> str:
    header = "| ranking | " + " | ".join(f"Hits@{k}" for k in ks) + " | MRR | questions |"
    lines = [header, "|" + "---|" * (len(ks) + 3)]
    for name, m in results.items():
        cells = " | ".join(f"{100 * m[f'hits@{k}']:.1f}" for k in ks)
        lines.append(f"| {name} | {cells} | {m['mrr']:.3f} | {m['num_questions']} |")
    paired = [(name, key[3:], m[key]) for name, m in results.items() for key in m if key.startswith("vs_")]
    if paired:
        lines += ["", "Paired with the reference on the same questions: wins / losses (questions only one of the "
                  "two has a silver passage in its first k), exact two-sided sign-test p.", "",
                  "| ranking | vs | " + " | ".join(f"Hits@{k}" for k in ks) + " |", "|" + "---|" * (len(ks) + 2)]
        for name, ref, comparison in paired:
            cells = " | ".join(f"+{c['wins']} / -{c['losses']}, p={c['p_value']:.3f}"
                               for c in (comparison[f"hits@{k}"] for k in ks))
            lines.append(f"| {name} | {ref} | {cells} |")
    return "\n".join(lines)


def eval_reranker(
    *,
    examples_path: str,
    rationales_path: str,
    kb_dir: str,
    out_dir: str,
    query_form: str = DEFAULT_QUERY_FORM,
    n_candidates: int = 100,
    silver_top_k: int = 1,
    holdout_fraction: float | None = None,
    holdout_start: float = 0.0,
    limit: int | None = None,
    examples_format: Any = "kard",
    dataset: str | None = None,
    reranker: Any = None,
    reranker_checkpoint: str | None = None,
    vocab_path: str | None = None,
    query_length: int = 128,
    candidate_length: int = 256,
    include_untrained: bool = True,
    initial_checkpoint: Callable[[], Any] | None = None,
    embedder: Any = None,
    batch_size: int = 16,
    seed: int = 0,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict:
    """Hits@k / MRR of bm25, dense, reranked, untrained and random rankings against the silver
    passages; writes `out_dir`/metrics.json + results.md + TensorBoard scalars and returns the metrics.

    `vocab_path`: the reranker's vocabulary (a SentencePiece directory, or a Hugging Face
    BERT-family directory such as MiniLM's). `holdout_fraction`, `holdout_start`: evaluate only
    the questions held out of reranker training (the training gin's RERANKER_HOLDOUT and
    RERANKER_HOLDOUT_START); None evaluates every question of the file. `initial_checkpoint`: the
    training's INITIAL_CHECKPOINT callable (e.g. a pretrained encoder), what the "untrained
    reranker" row scores with; None: the model's random initialisation.
    """
    from kard_jax.data.readers import read_examples
    from kard_jax.teacher.store import read_rationales

    check_query_form(query_form)
    start = time.time()
    examples = read_examples(examples_path, format=examples_format, dataset=dataset)
    if holdout_fraction:
        examples = [e for e in examples if is_held_out(e.id, holdout_fraction, holdout_start)]
    examples = examples[:limit]
    if not examples:
        raise InputError("no examples to evaluate (after the held-out selection)", path=examples_path)
    rationales = read_rationales(rationales_path)
    kb = passages_lib.KnowledgeBase(kb_dir)
    silver = silver_sets(kb, rationales, [e.id for e in examples], silver_top_k)
    bm25 = passages_lib.bm25_ranker(kb, n_candidates, query_form)
    rankers: dict[str, passages_lib.Ranker] = {"bm25": bm25}
    if embedder is not None:
        rankers["dense"] = passages_lib.dense_ranker(kb, n_candidates, query_form, embedder)
    if reranker_checkpoint is not None:
        if reranker is None or vocab_path is None:
            raise InputError("reranker_checkpoint needs reranker (its model config) and vocab_path", field="reranker")
        import jax

        from kard_jax.inference import rerank, run as run_lib

        tokenizer = rerank.reranker_tokenizer(vocab_path)
        common = dict(tokenizer=tokenizer, query_form=query_form, query_length=query_length,
                      candidate_length=candidate_length, batch_size=batch_size)
        trained = run_lib.load_reranker_params(reranker_checkpoint, reranker, query_length, candidate_length)
        rankers["reranked"] = rerank.reranked_ranker(kb, bm25, model=reranker, params=trained, **common)
        if include_untrained:
            if initial_checkpoint is not None:  # the training's starting point (e.g. the MiniLM encoder)
                untrained = initial_checkpoint()
                if set(untrained) == {"base", "lora"}:  # LoRA adapters start at zero: the base is the model
                    untrained = untrained["base"]
            else:
                shapes = {"query_tokens": (1, query_length), "candidate_tokens": (1, 1, candidate_length)}
                untrained = reranker.get_initial_variables(jax.random.PRNGKey(seed), shapes)["params"]
            rankers["untrained reranker"] = rerank.reranked_ranker(kb, bm25, model=reranker, params=untrained,
                                                                   **common)
    rankers["random order"] = random_order_ranker(bm25, seed)
    judged = judged_examples(examples, silver)
    firsts = rankers_first_ranks(judged, rankers, silver)
    results = results_from_first_ranks(firsts, ks, reference="bm25")
    metrics = {
        "rankings": results,
        "definition": "Hits@k: share of questions with a silver passage (BM25 top-"
                      f"{silver_top_k} by any kept rationale) among the first k; MRR over {n_candidates} candidates",
        "examples": os.path.abspath(examples_path), "kb_dir": os.path.abspath(kb_dir), "query_form": query_form,
        "n_candidates": n_candidates, "holdout_fraction": holdout_fraction,
        "holdout_start": holdout_start if holdout_fraction else None, "silver_top_k": silver_top_k,
        "reranker": None if reranker_checkpoint is None else os.path.abspath(reranker_checkpoint),
        "seconds": round(time.time() - start, 2),
    }
    _write_outputs(pathlib.Path(out_dir), metrics, {e.id: {name: firsts[name][i] for name in firsts}
                                                     for i, e in enumerate(judged)}, ks)
    print(f"kard_jax eval_reranker: {len(examples)} questions, {metrics['seconds']} s -> {out_dir}", flush=True)
    return metrics


FIRST_RANKS_FILE = "first_silver_ranks.jsonl"
# metrics.json fields that must agree between the folds `pool_evaluations` pools.
_POOLED_SETTINGS = ("definition", "examples", "kb_dir", "query_form", "n_candidates", "silver_top_k")


def _write_outputs(out: pathlib.Path, metrics: Mapping[str, Any], first_ranks: Mapping[str, Mapping[str, Any]] | None,
                   ks: Sequence[int]) -> None:
    """results.md, metrics.json, TensorBoard scalars [and first_silver_ranks.jsonl], each atomic."""
    import json

    table = format_table(metrics["rankings"], ks)
    atomic.write_text(out / "results.md", table + "\n")
    if first_ranks is not None:
        atomic.write_text(out / FIRST_RANKS_FILE, "".join(json.dumps({"question_id": qid, "first_silver_rank": ranks})
                                                          + "\n" for qid, ranks in first_ranks.items()))
    atomic.write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    _write_scalars(out, metrics["rankings"])
    print(table, flush=True)


def pool_evaluations(*, eval_dirs: Sequence[str], out_dir: str, ks: Sequence[int] = DEFAULT_KS) -> dict:
    """One table over the questions of several `eval_reranker` outputs (K cross-validation folds:
    each fold's reranker judged on the questions it did not train on): Hits@k, MRR and the paired
    comparison with BM25 recomputed over all questions. The folds must hold disjoint questions,
    the same rankings and the same settings (`_POOLED_SETTINGS`)."""
    import json

    if len(eval_dirs) < 2:
        raise InputError(f"pooling needs at least two evaluation directories, got {len(eval_dirs)}", field="eval_dirs")
    firsts: dict[str, list[int | None]] = {}
    owner: dict[str, str] = {}
    counts: dict[str, int] = {}
    reference_settings: dict[str, Any] | None = None
    for directory in eval_dirs:
        path = pathlib.Path(directory)
        for name in ("metrics.json", FIRST_RANKS_FILE):
            if not (path / name).is_file():
                raise InputError(f"no {name}: not an eval_reranker output (or one written before per-question "
                                 "ranks were kept; rerun it)", path=path / name, field="eval_dirs")
        metrics = json.loads((path / "metrics.json").read_text())
        settings = {key: metrics.get(key) for key in _POOLED_SETTINGS}
        if reference_settings is None:
            reference_settings, names = settings, list(metrics["rankings"])
            firsts = {name: [] for name in names}
        for key in _POOLED_SETTINGS:
            if settings[key] != reference_settings[key]:
                raise InputError(f"{key} is {settings[key]!r} here but {reference_settings[key]!r} in {eval_dirs[0]}: "
                                 "pool evaluations of the same setup", path=path / "metrics.json", field=key)
        if list(metrics["rankings"]) != list(firsts):
            raise InputError(f"rankings {list(metrics['rankings'])} differ from {list(firsts)} in {eval_dirs[0]}",
                             path=path / "metrics.json", field="rankings")
        for line_number, line in enumerate((path / FIRST_RANKS_FILE).read_text().splitlines(), 1):
            row = json.loads(line)
            qid = str(row["question_id"])
            if qid in owner:
                raise InputError(f"question {qid!r} is also in {owner[qid]}: the folds overlap (give each fold its "
                                 "own RERANKER_HOLDOUT_START)", path=path / FIRST_RANKS_FILE, line=line_number,
                                 field="question_id")
            owner[qid] = str(path)
            counts[os.path.abspath(path)] = counts.get(os.path.abspath(path), 0) + 1
            for name in firsts:
                firsts[name].append(row["first_silver_rank"][name])
    results = results_from_first_ranks(firsts, ks, reference="bm25" if "bm25" in firsts else None)
    pooled = {"rankings": results, **reference_settings, "folds": [os.path.abspath(d) for d in eval_dirs],
              "questions_per_fold": counts}
    _write_outputs(pathlib.Path(out_dir), pooled, None, ks)
    print(f"kard_jax pool_reranker_evals: {len(owner)} questions from {len(eval_dirs)} folds -> {out_dir}", flush=True)
    return pooled


def _write_scalars(out: pathlib.Path, results: Mapping[str, Mapping[str, float]]) -> None:
    from kard_jax.training import metrics as metrics_lib

    writer = metrics_lib.MetricsWriter(out / "tensorboard", enabled=True)
    for name, m in results.items():
        writer.write_scalars(0, {f"{name.replace(' ', '_')}/{k}": v for k, v in m.items()
                                 if k != "num_questions" and not k.startswith("vs_")})
    writer.close()
