"""Rationale filtering: keep what agrees with the gold answer and is not junk or repeated.

Checks, in order; a dropped rationale is counted under the FIRST reason that applies:
  empty          only whitespace
  degenerate     refusals and "This question is identical to ..." style junk (regexes)
  too_short      fewer than `min_words` words
  wrong_answer   the rationale's answer is not the gold one: its predicted-answer field when the
                 import maps one (and the value is set), else what `parse_answer` recovers
  no_answer      no answer can be found (only when `keep_unparsable=False`)
  rules_out_gold the text calls the gold option wrong ("Option (C) is incorrect ...")
  duplicate      same text as an earlier kept rationale of the question after lower-casing and
                 removing punctuation/extra whitespace, or word-trigram Jaccard similarity >=
                 `near_duplicate_jaccard`
Default `keep_unparsable=True`: many good rationales never restate the letter (75% of the OBQA
release's teacher outputs just explain, then rule out the other options); the teacher saw the gold
answer, so a rationale without a contrary answer is kept, as in the release. The report counts
the rationales that reached the answer check (`answer_checked`) and those without any answer
(`unjudged`): when most are unjudged the wrong-answer filter is doing nothing, and the teacher
stage (`kard_jax.teacher.run`) refuses to go on unless told to.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import re
from typing import Mapping, Sequence

from kard_jax.data.example import Example
from kard_jax.data.prompts import parse_answer

DEFAULT_DEGENERATE_PATTERNS: tuple[str, ...] = (
    r"\bthis question is (?:identical|a repeat|a repetition|the same|a duplicate)\b",
    r"\b(?:identical|same) (?:to|as) the (?:first|previous|last|above) question\b",
    r"\brefer (?:back )?to the (?:previous|above|first) (?:explanation|answer|question)\b",
    r"\bI'?m sorry\b|\bI apologi[sz]e\b",
    r"\bas an AI(?: language model)?\b",
    r"\bI (?:cannot|can't|am unable to|am not able to) (?:provide|answer|help|determine)\b",
)
REASONS = ("empty", "degenerate", "too_short", "wrong_answer", "no_answer", "rules_out_gold", "duplicate")

_TOKEN = r"\(?[A-Z]\)?(?![A-Za-z0-9])"
_SEP = r"(?:\s*,\s*(?:and\s+|or\s+)?|\s+(?:and|or)\s+)(?:(?:options?|choices?)\s+)?"
_RULED_OUT = re.compile(
    r"\b(?:[Oo]ptions?|[Cc]hoices?|[Aa]nswers?)\s+(?P<letters>" + _TOKEN + r"(?:" + _SEP + _TOKEN + r")*)"
    r"(?:(?!\b(?:is|are|was|were|because|while|but|as)\b)[^.;\n]){0,60}?"
    r"\b(?:is|are|was|were)\s+(?:also\s+|both\s+|all\s+)?"
    r"(?:incorrect|wrong|not\s+correct|not\s+the\s+(?:correct|right|best)|unrelated|not\s+related|irrelevant)\b"
)
_WORD = re.compile(r"[a-z0-9]+")


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    keep_unparsable: bool = True
    min_words: int = 8
    degenerate_patterns: tuple[str, ...] = DEFAULT_DEGENERATE_PATTERNS
    near_duplicate_jaccard: float | None = 0.9
    drop_rules_out_gold: bool = True


@dataclasses.dataclass
class FilterReport:
    """Counts of one filtering pass."""

    questions: int = 0
    rationales_in: int = 0
    kept: int = 0
    kept_unparsable: int = 0
    questions_without_rationales: int = 0
    answer_checked: int = 0  # rationales that reached the wrong-answer check
    unjudged: int = 0  # ... of which no answer could be found (field unset and text unparsable)
    answers_from_field: int = 0  # ... of which the answer came from a predicted-answer field
    dropped: dict[str, int] = dataclasses.field(default_factory=lambda: {r: 0 for r in REASONS})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        dropped = ", ".join(f"{r}={c}" for r, c in self.dropped.items() if c)
        from_field = f", {self.answers_from_field} answers from the answer field" if self.answers_from_field else ""
        return (f"{self.questions} questions, {self.rationales_in} rationales -> kept {self.kept} "
                f"({self.kept_unparsable} without a parsable answer{from_field}); dropped {sum(self.dropped.values())}"
                f" ({dropped or 'none'}); {self.questions_without_rationales} questions left without rationales")


def _normalize(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def _trigrams(normalized: str) -> frozenset:
    words = normalized.split()
    return frozenset(zip(words, words[1:], words[2:])) if len(words) >= 3 else frozenset([tuple(words)])


@functools.lru_cache(maxsize=16)
def _compile_any(patterns: tuple[str, ...]) -> re.Pattern | None:
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE) if patterns else None


def _jaccard_at_least(a: frozenset, b: frozenset, threshold: float) -> bool:
    small, large = sorted((len(a), len(b)))
    if small < threshold * large:  # |A & B| / |A | B| <= small / large
        return False
    inter = len(a & b)
    return inter >= threshold * (len(a) + len(b) - inter)


def rules_out(text: str, letter: str) -> bool:
    """True when the text calls option `letter` incorrect/unrelated ("Options (A) and (C) are wrong")."""
    for m in _RULED_OUT.finditer(text):
        if letter in re.findall(r"[A-Z]", m.group("letters")):
            return True
    return False


def filter_rationales(
    example: Example, rationales: Sequence[str], config: FilterConfig = FilterConfig(),
    answers: Sequence[int | None] | None = None,
) -> tuple[list[str], collections.Counter]:
    """(kept rationales, Counter of drop reasons + "kept_unparsable", "answer_checked", "unjudged",
    "answers_from_field") for one question. `answers`: each rationale's predicted option index
    from the import (None: not given, parse the text)."""
    if answers is not None and len(answers) != len(rationales):
        raise ValueError(f"{len(answers)} answers for {len(rationales)} rationales of {example.id!r}")
    degenerate = _compile_any(config.degenerate_patterns)
    gold = example.answer_letter()  # InputError for an unlabeled example
    kept: list[str] = []
    seen_norm: set[str] = set()
    seen_grams: list[frozenset] = []
    counts: collections.Counter = collections.Counter()
    for position, raw in enumerate(rationales):
        text = raw.strip()
        if not text:
            counts["empty"] += 1
            continue
        if degenerate is not None and degenerate.search(text):
            counts["degenerate"] += 1
            continue
        if len(text.split()) < config.min_words:
            counts["too_short"] += 1
            continue
        counts["answer_checked"] += 1
        given = answers[position] if answers is not None else None
        if given is not None:
            counts["answers_from_field"] += 1
            parsed = given
        else:
            parsed = parse_answer(text, len(example.options), example.options)
        if parsed is None:
            counts["unjudged"] += 1
        if parsed is not None and parsed != example.answer:
            counts["wrong_answer"] += 1
            continue
        if parsed is None and not config.keep_unparsable:
            counts["no_answer"] += 1
            continue
        if config.drop_rules_out_gold and rules_out(text, gold):
            counts["rules_out_gold"] += 1
            continue
        norm = _normalize(text)
        grams = _trigrams(norm)
        if norm in seen_norm or (
            config.near_duplicate_jaccard is not None
            and any(_jaccard_at_least(grams, g, config.near_duplicate_jaccard) for g in seen_grams)
        ):
            counts["duplicate"] += 1
            continue
        seen_norm.add(norm)
        seen_grams.append(grams)
        kept.append(text)
        if parsed is None:
            counts["kept_unparsable"] += 1
    return kept, counts


def filter_all(
    examples: Sequence[Example], rationales: Mapping[str, Sequence[str]], config: FilterConfig = FilterConfig(),
    answers: Mapping[str, Sequence[int | None]] | None = None,
) -> tuple[dict[str, list[str]], FilterReport]:
    """Filter the rationales of every example (in example order; missing ids count as none).
    Rationale ids with no example are ignored: callers check coverage (see `run`). `answers`:
    {id: predicted option index or None per rationale} from an import's answer field."""
    report = FilterReport()
    out: dict[str, list[str]] = {}
    for example in examples:
        given = rationales.get(example.id, [])
        given_answers = answers.get(example.id) if answers is not None else None
        kept, counts = filter_rationales(example, given, config, given_answers)
        out[example.id] = kept
        report.questions += 1
        report.rationales_in += len(given)
        report.kept += len(kept)
        report.kept_unparsable += counts.pop("kept_unparsable", 0)
        report.answer_checked += counts.pop("answer_checked", 0)
        report.unjudged += counts.pop("unjudged", 0)
        report.answers_from_field += counts.pop("answers_from_field", 0)
        report.questions_without_rationales += not kept
        for reason, count in counts.items():
            report.dropped[reason] += count
    return out, report
