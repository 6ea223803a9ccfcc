"""Student prompt formatting and answer parsing: the ONE place that builds student inputs/targets.

seqio tasks (training) and the inference pipeline both call `build_student_input`, so train and
test prompts cannot drift (the KARD release joined passages with a tab at training time and a
space at test time). Layout, as in the paper::

    {instruction}
    Question: {question} A. {option} B. {option} ...
    Knowledge: {passage 1}{separator}{passage 2} ...
    Explanation:

The Knowledge line is omitted when there are no passages (reasoning distillation, "RD").
Whitespace inside the question, the options and the passages is collapsed to single spaces, so the
four lines above are always exactly four (or three) lines. Targets are
`rationale + "\\nAnswer: X"` (fine-tuning without rationales: `"Answer: X"`).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

from kard_jax.data.example import Example, option_letter
from kard_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """Wording of the student prompt for one dataset family."""

    instruction: str
    knowledge_prefix: str = "Knowledge: "
    cue: str = "Explanation:"
    passage_separator: str = " "


TEMPLATES: dict[str, PromptTemplate] = {
    # The paper's wording, verbatim (including "a step-by-step explanations").
    "medical": PromptTemplate(
        instruction=(
            "The following are multiple-choice questions about medical knowledge. Generate a "
            "step-by-step explanations for each question with given medical knowledge."
        )
    ),
    "commonsense": PromptTemplate(
        instruction=(
            "The following are multiple-choice questions about commonsense knowledge, answered with "
            "A (yes) or B (no). Generate a step-by-step explanation for each question with given "
            "knowledge."
        )
    ),
    "science": PromptTemplate(
        instruction=(
            "The following are multiple-choice questions about elementary science knowledge. "
            "Generate a step-by-step explanation for each question with given knowledge."
        )
    ),
}

DATASET_FAMILIES: dict[str, str] = {
    "medqa": "medical",
    "medqa_usmle": "medical",
    "medmcqa": "medical",
    "strategyqa": "commonsense",
    "obqa": "science",
    "openbookqa": "science",
    "arc": "science",
}

ANSWER_PREFIX = "Answer: "


def template_for(dataset: str) -> PromptTemplate:
    """The template for a dataset name ("medqa", "strategyqa", "obqa", ...) or a family name."""
    key = dataset.lower()
    family = DATASET_FAMILIES.get(key, key)
    if family not in TEMPLATES:
        known = sorted(set(DATASET_FAMILIES) | set(TEMPLATES))
        raise ValueError(f"no prompt template for dataset {dataset!r}; known: {known}")
    return TEMPLATES[family]


def _squash(text: str) -> str:
    return " ".join(text.split())


def format_question(example: Example, template: PromptTemplate | None = None) -> str:
    """`"Question: {q} A. {o1} B. {o2} ..."`; yes/no questions list "A. yes B. no" as well."""
    del template  # identical across families; kept so callers pass one template everywhere
    parts = [f"Question: {_squash(example.question)}"]
    parts += [f"{option_letter(i)}. {_squash(o)}" for i, o in enumerate(example.options)]
    return " ".join(parts)


def format_passage(title: str, text: str) -> str:
    """A knowledge passage as `"{title}. {text}"` (the paper's "Title . paragraph" without the
    stray space); no period is added after a title that already ends in . ? ! or :, and an empty
    title gives just the text."""
    title, text = _squash(title), _squash(text)
    if not title:
        return text
    if not text:
        return title
    joiner = " " if title[-1] in ".?!:" else ". "
    return title + joiner + text


def _assemble(instruction: str, question: str, passages: Sequence[str], template: PromptTemplate) -> str:
    lines = [instruction, question]
    if passages:
        lines.append(template.knowledge_prefix + template.passage_separator.join(passages))
    lines.append(template.cue)
    return "\n".join(lines)


def build_student_input(
    example: Example,
    passages: Sequence[str],
    template: PromptTemplate,
    *,
    max_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> str:
    """The student's input text; with `max_tokens` and `count_tokens`, fit it into the budget.

    Truncation keeps the instruction, the question and the cue; it shortens the knowledge first:
    the last passage is cut word by word, and dropped when no word of it fits, then the one
    before it, and so on. Only when the prompt without any knowledge is still too long is an
    `InputError` raised (it names the example id). `count_tokens` must be monotone in the text.
    """
    if (max_tokens is None) != (count_tokens is None):
        raise ValueError("pass both max_tokens and count_tokens, or neither")
    question = format_question(example, template)
    kept = [p for p in (_squash(p) for p in passages) if p]
    full = _assemble(template.instruction, question, kept, template)
    if max_tokens is None or count_tokens(full) <= max_tokens:
        return full

    def fits(candidate: list[str]) -> bool:
        return count_tokens(_assemble(template.instruction, question, candidate, template)) <= max_tokens

    if not fits([]):
        raise InputError(
            f"example {example.id!r}: instruction + question + cue need "
            f"{count_tokens(_assemble(template.instruction, question, [], template))} tokens, "
            f"more than max_tokens={max_tokens}",
            field="question",
        )
    # Largest number of whole passages that fits (binary search; fits() is monotone).
    lo, hi = 0, len(kept)  # fits(kept[:lo]) is True, fits(kept[:hi]) is False
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(kept[:mid]) else (lo, mid)
    whole = kept[:lo]
    # Longest word prefix of the next passage that still fits.
    words = kept[lo].split(" ")
    w_lo, w_hi = 0, len(words)
    while w_hi - w_lo > 1:
        mid = (w_lo + w_hi) // 2
        w_lo, w_hi = (mid, w_hi) if fits(whole + [" ".join(words[:mid])]) else (w_lo, mid)
    if w_lo > 0:
        whole = whole + [" ".join(words[:w_lo])]
    return _assemble(template.instruction, question, whole, template)


def build_student_target(rationale: str | None, example: Example) -> str:
    """`rationale + "\\nAnswer: X"`; with an empty rationale (fine-tuning) just `"Answer: X"`."""
    answer = ANSWER_PREFIX + example.answer_letter()
    rationale = (rationale or "").strip()
    return f"{rationale}\n{answer}" if rationale else answer


# ---------------------------------------------------------------------------------------------
# Answer parsing
# ---------------------------------------------------------------------------------------------

_LETTER = r"(?:\(\s*(?P<pl>[A-Za-z])\s*\)|\[(?P<bl>[A-Za-z])\]|(?P<ul>[A-Z])(?![A-Za-z0-9'\-]))"
# "Answer: X" (the student's own format).
_ANSWER_COLON = re.compile(r"\banswer\s*:\s*", re.IGNORECASE)
# "the (correct) answer [to this question] [, therefore,] is|would be[:] [option] X", "the correct
# option is X", "answer the question with/as X".
_ANSWER_IS = re.compile(
    r"\b(?:answer|option|choice)s?"
    r"(?:\s+to\s+(?:this|the)\s+question(?:\s*(?:\"[^\"\n]{0,300}\"|\u201c[^\u201d\n]{0,300}\u201d))?)?"
    r"(?:[^.?!\n]{0,60}?)\s*\b(?:is|would\s+be|should\s+be|will\s+be)\s*(?:therefore\s*,?\s*)?:?\s*"
    r"(?:(?:option|choice|letter)\s+)?"
    r"|\banswer\s+(?:the|this)\s+question\s+(?:with|as)\s+(?:(?:option|choice)\s+)?",
    re.IGNORECASE,
)
# "(X) is the correct answer", "option X is correct", "making option (B) correct".
_LETTER_IS_CORRECT = re.compile(
    r"(?:\b(?:[Oo]ption|[Cc]hoice|[Aa]nswer)\s+)?" + _LETTER
    + r"\s*(?:(?:is|would\s+be)\s+)?(?:the\s+)?(?:correct|right|best|most\s+appropriate)\b(?!\s+incorrect)"
)
# "making answer (B) the correct one", "we choose answer B", "select answer choice (A) - yes -"
# (not "answer (A) is incorrect").
_ANSWER_LETTER = re.compile(
    r"\b[Aa]nswers?\s+(?:(?:[Cc]hoice|[Oo]ption)\s+)?" + _LETTER
    + r"(?!\s*(?:is|was)\s+(?:incorrect|wrong|not))"
)
_LEADING_LETTER = re.compile(r"\(\s*([A-Za-z])\s*\)\s")  # "(B) no, because ..."
_BARE_LETTER = re.compile(r"\(?\s*([A-Za-z])\s*\)?")
_MARKDOWN = re.compile(r"[*_`]+")


def _letter_from(match: re.Match) -> str:
    return (match.group("pl") or match.group("bl") or match.group("ul")).upper()


def _option_key(text: str) -> str:
    return _squash(text).lower().rstrip(".")


def _letter_or_option_at(text: str, pos: int, num_options: int, options: Sequence[str] | None) -> int | None:
    """The answer stated at text[pos:]: a letter ("B", "(B)", "[b]") or an option's text."""
    rest = text[pos:pos + 400].lstrip().lstrip("\"'\u201c\u2018").lstrip()  # 'is "yes."'
    m = re.match(_LETTER, rest)
    if m:
        index = ord(_letter_from(m)) - ord("A")
        if index < num_options:
            return index
    if options:
        lowered = rest.lower()
        # Longest option first so a short option does not shadow a longer one it prefixes.
        for index in sorted(range(len(options)), key=lambda i: -len(options[i])):
            opt = _option_key(options[index])
            if opt and re.match(re.escape(opt) + r"(?![a-z0-9])", lowered):
                return index
    return None


def parse_answer(text: str, num_options: int, options: Sequence[str] | None = None) -> int | None:
    """The option index a rationale or a student output commits to, or None.

    Tried in order, each preferring the LAST occurrence in the text: "Answer: X" (letter or
    option text); "the answer is (X)" / "the correct option is X" / "the answer is yes";
    "(X) is the correct answer" / "option X is correct"; "answer (X)"; a bare letter ("B",
    "B.", "(B)") or an exact option text as the whole text; finally a text that starts with
    "(X) ". A letter merely mentioned ("Option (D) is incorrect") is not an answer. Letters beyond
    `num_options` are ignored; option texts are matched only when `options` is given.
    """
    if not text or not text.strip():
        return None
    text = _MARKDOWN.sub("", text)
    for pattern in (_ANSWER_COLON, _ANSWER_IS):
        for m in reversed(list(pattern.finditer(text))):
            index = _letter_or_option_at(text, m.end(), num_options, options)
            if index is not None:
                return index
    for pattern in (_LETTER_IS_CORRECT, _ANSWER_LETTER):
        for m in reversed(list(pattern.finditer(text))):
            index = ord(_letter_from(m)) - ord("A")
            if index < num_options:
                return index
    whole = text.strip().rstrip(".").strip()
    m = _BARE_LETTER.fullmatch(whole)
    if m and ord(m.group(1).upper()) - ord("A") < num_options:
        return ord(m.group(1).upper()) - ord("A")
    if options:
        keys = [_option_key(o) for o in options]
        if keys.count(whole.lower()) == 1:
            return keys.index(whole.lower())
    m = _LEADING_LETTER.match(whole)
    if m and ord(m.group(1).upper()) - ord("A") < num_options:
        return ord(m.group(1).upper()) - ord("A")
    return None
