"""The question query: the ONE function that turns an example into the text used to retrieve or
rerank passages with the question (no rationale).

Every stage that queries with the question calls `question_query`: the retrieval cache (the
reranker's training candidates and the `kard_eval` task's passages), the reranker's query at
training and at inference, BM25 / dense retrieval at evaluation, and the reranker evaluation.
So the question query at test time is the one the reranker was trained with.

Forms (`query_form`, a per-dataset gin setting: `gin_configs/datasets/*.gin`, QUERY_FORM):
  "question"          the bare question text. Measured on StrategyQA (150 held-out questions,
                      BM25 over kb/wikipedia_paragraphs_strategyqa): Hits@1 against the silver
                      (rationale-retrieved) passage 0.79, vs 0.49 with the formatted prompt, whose
                      "A. yes B. no" pulls passages that contain "yes" to the top.
  "question_options"  the question followed by the option texts (no letters): for datasets whose
                      options carry the content words (OpenBookQA, MedQA).
  "formatted"         the student's prompt line, "Question: ... A. ... B. ..." (what the KARD
                      release queried with).
"""
from __future__ import annotations

from kard_jax.data.example import Example
from kard_jax.errors import InputError

QUERY_FORMS = ("question", "question_options", "formatted")
DEFAULT_QUERY_FORM = "question"


def check_query_form(query_form: str) -> str:
    if query_form not in QUERY_FORMS:
        raise InputError(f"query_form must be one of {QUERY_FORMS}, got {query_form!r}", field="query_form")
    return query_form


def question_query(example: Example, query_form: str = DEFAULT_QUERY_FORM) -> str:
    """The text that retrieves (and the reranker scores) passages for `example`'s question."""
    check_query_form(query_form)
    question = " ".join(example.question.split())
    if query_form == "question":
        return question
    if query_form == "question_options":
        return " ".join([question, *(" ".join(o.split()) for o in example.options)])
    from kard_jax.data import prompts

    return prompts.format_question(example)
