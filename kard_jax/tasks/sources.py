"""KARD records for each task variant, built in pure Python (no TensorFlow in this module).

Small pure functions in the spirit of seqio preprocessors: Examples + kept rationales + the retrieval
cache + the passage store in, flat string/number records out. Every student input is built by
`kard_jax.data.prompts.build_student_input` (the function inference calls), so training and
inference prompts cannot drift; passages are rendered by `prompts.format_passage`.

Student record (ft / rd / kard / kard_eval), one per kept rationale for rd and kard, one per
question for ft and the eval variants::

    {"id", "question_id", "rationale_index" (-1: none), "inputs", "targets", "answer",
     "options": [str], "passage_ids": [str]}

Reranker record, one per kept rationale::

    {"id", "question_id", "rationale_index", "query", "candidates": [str],
     "candidate_ids": [str], "labels": [float]}

Budgets are in tokens of the student vocabulary, EOS excluded: inputs are truncated by the prompt
builder (knowledge first, the question and the "Explanation:" cue always kept); targets keep
"Answer: X" and cut the rationale word by word.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Callable, Iterable, Iterator, Mapping, Protocol, Sequence

from kard_jax.data import prompts
from kard_jax.data.example import Example
from kard_jax.data.query import question_query
from kard_jax.data.readers import iter_json_records
from kard_jax.errors import InputError

NO_RATIONALE = -1


class PassageLike(Protocol):
    id: str
    title: str
    text: str


@dataclasses.dataclass(frozen=True)
class Budget:
    """How to render student prompts: the dataset's template and optional token budgets."""

    template: prompts.PromptTemplate
    input_tokens: int | None = None  # max tokens of the input text, EOS excluded
    target_tokens: int | None = None  # max tokens of the target text, EOS excluded
    count_tokens: Callable[[str], int] | None = None

    def __post_init__(self):
        if (self.input_tokens is not None or self.target_tokens is not None) and self.count_tokens is None:
            raise ValueError("token budgets need count_tokens")


def student_input(example: Example, passages: Sequence[PassageLike], budget: Budget) -> str:
    """The student's input text (the same call inference makes)."""
    texts = [prompts.format_passage(p.title, p.text) for p in passages]
    if budget.input_tokens is None:
        return prompts.build_student_input(example, texts, budget.template)
    return prompts.build_student_input(
        example, texts, budget.template, max_tokens=budget.input_tokens, count_tokens=budget.count_tokens
    )


def student_target(rationale: str | None, example: Example, budget: Budget) -> str:
    """`rationale + "\\nAnswer: X"` within `budget.target_tokens`: the rationale is cut word by
    word (from the end) so that the answer line always survives truncation."""
    full = prompts.build_student_target(rationale, example)
    if budget.target_tokens is None or budget.count_tokens(full) <= budget.target_tokens:
        return full
    answer_only = prompts.build_student_target(None, example)
    if budget.count_tokens(answer_only) > budget.target_tokens:
        raise InputError(
            f"example {example.id!r}: target {answer_only!r} needs {budget.count_tokens(answer_only)} tokens, "
            f"more than the target budget {budget.target_tokens}",
            field="targets",
        )
    words = (rationale or "").split()
    lo, hi = 0, len(words)  # target with words[:lo] fits, with words[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if budget.count_tokens(prompts.build_student_target(" ".join(words[:mid]), example)) <= budget.target_tokens:
            lo = mid
        else:
            hi = mid
    return prompts.build_student_target(" ".join(words[:lo]), example)


def student_record(
    example: Example,
    *,
    rationale: str | None,
    rationale_index: int,
    passages: Sequence[PassageLike],
    budget: Budget,
    target_rationale: bool = True,
) -> dict:
    """One student example; `target_rationale=False` gives an answer-only target (evaluation)."""
    suffix = "" if rationale_index == NO_RATIONALE else f"#r{rationale_index}"
    return {
        "id": f"{example.id}{suffix}",
        "question_id": example.id,
        "rationale_index": rationale_index,
        "inputs": student_input(example, passages, budget),
        "targets": student_target(rationale if target_rationale else None, example, budget),
        "answer": example.answer,
        "options": list(example.options),
        "passage_ids": [p.id for p in passages],
    }


def kept_rationales(example: Example, rationales: Mapping[str, Sequence[str]]) -> list[tuple[int, str]]:
    """(index, text) of the example's non-empty rationales; the index is the position in the
    rationale file's list (what the retrieval cache calls `rationale_index`)."""
    return [(i, r.strip()) for i, r in enumerate(rationales.get(example.id, ())) if r.strip()]


def ft_records(examples: Iterable[Example], budget: Budget) -> Iterator[dict]:
    """Fine-tuning: question -> "Answer: X" (no rationale, no knowledge)."""
    for ex in examples:
        yield student_record(ex, rationale=None, rationale_index=NO_RATIONALE, passages=(), budget=budget)


def rd_records(examples: Iterable[Example], rationales: Mapping[str, Sequence[str]], budget: Budget) -> Iterator[dict]:
    """Reasoning distillation: question -> rationale + answer, one record per kept rationale."""
    for ex in examples:
        for index, rationale in kept_rationales(ex, rationales):
            yield student_record(ex, rationale=rationale, rationale_index=index, passages=(), budget=budget)


def kard_records(
    examples: Iterable[Example],
    rationales: Mapping[str, Sequence[str]],
    rationale_passages: Callable[[str, int, str], Sequence[PassageLike]],
    budget: Budget,
) -> Iterator[dict]:
    """KARD: question + passages retrieved with the rationale -> rationale + answer.

    `rationale_passages(question_id, rationale_index, rationale)` returns the top passages.
    """
    for ex in examples:
        for index, rationale in kept_rationales(ex, rationales):
            passages = rationale_passages(ex.id, index, rationale)
            yield student_record(ex, rationale=rationale, rationale_index=index, passages=passages, budget=budget)


def eval_records(
    examples: Iterable[Example],
    question_passages: Callable[[str], Sequence[PassageLike]] | None,
    budget: Budget,
) -> Iterator[dict]:
    """Evaluation: question (+ passages chosen as at inference) -> "Answer: X", one per question."""
    for ex in examples:
        passages = question_passages(ex.id) if question_passages is not None else ()
        yield student_record(
            ex, rationale=None, rationale_index=NO_RATIONALE, passages=passages, budget=budget, target_rationale=False
        )


def select_candidates(labels: Sequence[float], max_candidates: int | None) -> list[int]:
    """Positions of the candidates a reranker record keeps, at most `max_candidates`.

    The retrieval cache lists a question's candidates in question-retrieval order (then the
    rationales' extras). Half the budget (rounded up) goes to the best candidates by label (what
    the rationale retrieves), the rest to the question's own top candidates not already kept, so
    training sees both the positives and the hard negatives inference will rerank (the KARD
    release samples 4 by rationale + 4 by question). Returned in cache order.
    """
    n = len(labels)
    if max_candidates is None or n <= max_candidates:
        return list(range(n))
    if max_candidates < 1:
        raise ValueError(f"max_candidates must be >= 1, got {max_candidates}")
    by_label = sorted(range(n), key=lambda i: -float(labels[i]))
    kept = set(by_label[: (max_candidates + 1) // 2])
    for i in range(n):
        if len(kept) >= max_candidates:
            break
        kept.add(i)
    return sorted(kept)


def reranker_records(
    examples: Iterable[Example],
    rationales: Mapping[str, Sequence[str]],
    candidates: Callable[[str, int], tuple[Sequence[PassageLike], Sequence[float]]],
    query_form: str,
    max_candidates: int | None = None,
    lexical_features: Callable[[str, str], Sequence[float]] | None = None,
) -> Iterator[dict]:
    """Reranker: (question, candidates from rationale and question retrieval, labels) per kept
    rationale; `candidates(question_id, rationale_index)` gives passages and their labels (BM25
    score of each candidate against the rationale). The query is the question query;
    `lexical_features(query, question_id)` gives the hybrid reranker's feature of every candidate
    (`reranker.lexical_features`, in `candidates`' order, before the selection; zeros without it).

    Candidates are ordered by descending label (stable), so a converter that keeps only the first
    n keeps the rationale-relevant ones (the rationale-retrieved extras of the union come last in
    the retrieval cache). The reranker scores each candidate on its own, so order is not a signal.
    """
    for ex in examples:
        for index, _ in kept_rationales(ex, rationales):
            passages, labels = candidates(ex.id, index)
            query = question_query(ex, query_form)
            lexical = lexical_features(query, ex.id) if lexical_features is not None else [0.0] * len(passages)
            if len(lexical) != len(passages):
                raise ValueError(f"{ex.id}: {len(lexical)} lexical features for {len(passages)} candidates")
            keep = select_candidates(labels, max_candidates)
            keep = sorted(keep, key=lambda i: -float(labels[i]))  # by descending label (stable)
            passages, labels, lexical = ([xs[i] for i in keep] for xs in (passages, labels, lexical))
            yield {
                "id": f"{ex.id}#r{index}",
                "question_id": ex.id,
                "rationale_index": index,
                "query": query,
                "candidates": [prompts.format_passage(p.title, p.text) for p in passages],
                "candidate_ids": [p.id for p in passages],
                "labels": [float(x) for x in labels],
                "lexical_scores": [float(x) for x in lexical],
            }


# ---------------------------------------------------------------------------------------------
# Joining the retrieval cache to the rationales
# ---------------------------------------------------------------------------------------------


def index_rationale_retrieval(
    rows: Iterable[Mapping], *, source: str | os.PathLike | None = None
) -> dict[tuple[str, int], Mapping]:
    """(question_id, rationale_index) -> rationale_retrieval row."""
    out = {}
    for row in rows:
        key = (str(row["question_id"]), int(row["rationale_index"]))
        if key in out:
            raise InputError(f"duplicate rationale row {key}", path=source, field="rationale_index")
        out[key] = row
    return out


def rationale_row(
    index: Mapping[tuple[str, int], Mapping],
    question_id: str,
    rationale_index: int,
    rationale: str,
    *,
    source: str | os.PathLike | None = None,
) -> Mapping:
    """The cache row of one kept rationale; a missing row or a different rationale text means
    the cache was built from another rationale file (stale) and raises InputError."""
    row = index.get((question_id, rationale_index))
    if row is None:
        raise InputError(
            f"no retrieval for question {question_id!r} rationale {rationale_index}; rebuild the retrieval "
            "cache from the same rationale file",
            path=source,
            field="rationale_index",
        )
    if " ".join(str(row.get("rationale", rationale)).split()) != " ".join(rationale.split()):
        raise InputError(
            f"question {question_id!r} rationale {rationale_index}: cached rationale text differs from the "
            "rationale file (stale retrieval cache)",
            path=source,
            field="rationale",
        )
    return row


def read_rankings(path: str | os.PathLike) -> dict[str, list[str]]:
    """Passages chosen at inference (dense / reranked): JSON lines {"question_id", "passage_ids"}."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise InputError("rankings file not found", path=path)
    out: dict[str, list[str]] = {}
    for line_no, row in iter_json_records(path):
        for field in ("question_id", "passage_ids"):
            if field not in row:
                raise InputError("missing field", path=path, line=line_no, field=field)
        if not isinstance(row["passage_ids"], list):
            raise InputError("expected a list of passage ids", path=path, line=line_no, field="passage_ids")
        out[str(row["question_id"])] = [str(p) for p in row["passage_ids"]]
    return out
