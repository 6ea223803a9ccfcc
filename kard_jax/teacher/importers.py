"""Import rationales produced elsewhere.

Layouts:
* a JSON file (lines, array or keyed object; gzip or not) described by a `RationaleMapping`:
  one row per question with a list of rationales (the default: `{"id", "teacher",
  "rationales": [...]}` lines, as in ../shared/data/{ds}/rationales.train.jsonl.gz and our own
  `rationales.jsonl`), or one row per rationale; rows joined to the questions by id or by the
  question's text; optionally each rationale's own predicted answer (used by the wrong-answer
  filter instead of parsing the text);
* a directory of chat-completion responses, one JSON file per question (KARD release style): the
  file name without `.json` is the question id, the rationales are `choices[i].message.content`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Sequence

from kard_jax.data.example import Example
from kard_jax.data.prompts import parse_answer
from kard_jax.data.readers import ANSWER_FORMATS, answer_index, iter_json_records, json_error_message
from kard_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class RationaleMapping:
    """Where rationales live in the rows of a JSON file (dotted names nest).

    Rows per question: `rationales` names a list field; its items are strings, or objects whose
    text is under `rationale` (and predicted answer under `answer`). Rows per rationale:
    `rationales=None` and `rationale` names the text field.
    Join: by `id` (the question id field), or by `question` (the question's text, compared with
    whitespace collapsed and case ignored) -- rows without the id field fall back to the text
    when both are given.
    `answer`: the predicted-answer field of each rationale (per-question rows with string items:
    a list field parallel to `rationales`), read like an examples file's answer (`answer_format`,
    see `FieldMapping`); a value that is not an answer is parsed as text ("The answer is B").
    None/missing values leave that rationale to the text parser.
    `teacher`: the field naming the model, recorded in the manifest.
    """

    id: str | None = "id"
    question: str | None = None
    rationales: str | None = "rationales"
    rationale: str | None = None
    answer: str | None = None
    answer_format: str = "auto"
    teacher: str | None = "teacher"

    def __post_init__(self):
        if self.rationales is None and self.rationale is None:
            raise InputError("name the rationales (list per question) or rationale (one per row) field",
                             field="RationaleMapping")
        if self.id is None and self.question is None:
            raise InputError("name the id or the question field to join rationales to questions",
                             field="RationaleMapping")
        if self.answer_format not in ANSWER_FORMATS:
            raise InputError(f"must be one of {'|'.join(ANSWER_FORMATS)}, got {self.answer_format!r}",
                             field="RationaleMapping.answer_format")

    @property
    def per_rationale(self) -> bool:
        return self.rationales is None


@dataclasses.dataclass
class ImportedRationales:
    """{question id: rationales}, and when an answer field is mapped {question id: predicted
    option index or None per rationale}; `unknown` lists (line, id or question text) of rows
    whose question is not among the examples."""

    texts: dict[str, list[str]]
    answers: dict[str, list[int | None]] | None
    teachers: list[str]
    unknown: list[tuple[int | None, str]] = dataclasses.field(default_factory=list)

    @property
    def answers_given(self) -> int:
        return sum(a is not None for v in (self.answers or {}).values() for a in v)


def _get(obj: Any, field: str, default: Any = None) -> Any:
    for part in field.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return default
        obj = obj[part]
    return obj


def _norm_question(text: str) -> str:
    return " ".join(text.split()).lower()


def resolve_predicted_answer(value: Any, example: Example, answer_format: str = "auto") -> int | None:
    """A rationale's predicted answer field as an option index; None for a missing/empty value.
    Raises ValueError when the value names no option."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    labels = [chr(ord("A") + i) for i in range(len(example.options))]
    try:
        return answer_index(value, labels, example.options, answer_format)
    except ValueError as first:
        if isinstance(value, str):
            parsed = parse_answer(value, len(example.options), example.options)
            if parsed is not None:
                return parsed
        raise first


def import_mapped(
    path: str | os.PathLike,
    mapping: RationaleMapping,
    examples: Sequence[Example],
) -> ImportedRationales:
    """Rationales from a JSON file described by `mapping`, joined to `examples`."""
    path = pathlib.Path(path)
    by_id = {ex.id: ex for ex in examples}
    by_text: dict[str, str | None] = {}
    for ex in examples:
        key = _norm_question(ex.question)
        by_text[key] = None if key in by_text else ex.id  # None: two examples share the text
    texts: dict[str, list[str]] = {}
    answers: dict[str, list[int | None]] | None = {} if mapping.answer else None
    first_line: dict[str, int] = {}
    teachers: set[str] = set()
    unknown: list[tuple[int | None, str]] = []

    def error(message: str, line: int, field: str | None) -> InputError:
        return InputError(message, path=path, line=line, field=field)

    for line, obj in iter_json_records(path):
        # Which question?
        qid = None
        if mapping.id is not None:
            raw = _get(obj, mapping.id)
            if raw is not None:
                if isinstance(raw, bool) or not isinstance(raw, (str, int)) or str(raw).strip() == "":
                    raise error(f"expected a non-empty string or integer id, got {raw!r}", line, mapping.id)
                qid = str(raw).strip()
            elif mapping.question is None:
                raise error("missing field", line, mapping.id)
        if qid is None:
            text = _get(obj, mapping.question)
            if not isinstance(text, str) or not text.strip():
                raise error("missing or empty question text", line, mapping.question)
            key = _norm_question(text)
            if key not in by_text:
                unknown.append((line, text.strip()[:80]))
                continue
            if by_text[key] is None:
                raise error("this question text belongs to more than one example; join by id instead", line,
                            mapping.question)
            qid = by_text[key]
        elif qid not in by_id:
            unknown.append((line, qid))
            continue
        example = by_id[qid]
        # Which rationales, with which answers?
        rows: list[tuple[str, Any, str]] = []  # (text, raw answer, answer field for errors)
        if mapping.per_rationale:
            text = _get(obj, mapping.rationale)
            if not isinstance(text, str):
                raise error("expected the rationale text (a string)", line, mapping.rationale)
            rows.append((text, _get(obj, mapping.answer) if mapping.answer else None, mapping.answer))
        else:
            items = _get(obj, mapping.rationales)
            if not isinstance(items, list):
                raise error("expected a list of rationales", line, mapping.rationales)
            if qid in first_line:
                raise error(f"duplicate id {qid!r} (first on line {first_line[qid]})", line, mapping.id or
                            mapping.question)
            parallel = None
            if mapping.answer and mapping.rationale is None:
                parallel = _get(obj, mapping.answer)
                if parallel is not None and (not isinstance(parallel, list) or len(parallel) != len(items)):
                    raise error(f"expected a list of {len(items)} answers, one per rationale", line, mapping.answer)
            for i, item in enumerate(items):
                if isinstance(item, str) and mapping.rationale is None:
                    rows.append((item, parallel[i] if parallel else None, f"{mapping.answer}[{i}]"))
                elif isinstance(item, dict) and mapping.rationale is not None:
                    text = _get(item, mapping.rationale)
                    if not isinstance(text, str):
                        raise error("expected the rationale text (a string)", line,
                                    f"{mapping.rationales}[{i}].{mapping.rationale}")
                    rows.append((text, _get(item, mapping.answer) if mapping.answer else None,
                                 f"{mapping.rationales}[{i}].{mapping.answer}"))
                else:
                    want = "strings" if mapping.rationale is None else f"objects with {mapping.rationale!r}"
                    raise error(f"expected a list of {want}", line, f"{mapping.rationales}[{i}]")
        first_line.setdefault(qid, line)
        bucket = texts.setdefault(qid, [])
        for text, raw_answer, field in rows:
            bucket.append(text)
            if answers is not None:
                try:
                    predicted = resolve_predicted_answer(raw_answer, example, mapping.answer_format)
                except ValueError as e:
                    raise error(f"predicted answer: {e}", line, field) from None
                answers.setdefault(qid, []).append(predicted)
        if mapping.teacher and isinstance(_get(obj, mapping.teacher), str):
            teachers.add(_get(obj, mapping.teacher))
    return ImportedRationales(texts, answers, sorted(teachers), unknown)


def import_jsonl(path: str | os.PathLike) -> tuple[dict[str, list[str]], list[str]]:
    """({id: rationales}, sorted teacher names seen) from a rationales JSONL file."""
    path = pathlib.Path(path)
    records: dict[str, list[str]] = {}
    teachers: set[str] = set()
    for line, obj in iter_json_records(path):
        qid = obj.get("id")
        if not isinstance(qid, (str, int)) or isinstance(qid, bool) or str(qid) == "":
            raise InputError("missing or invalid question id", path=path, line=line, field="id")
        rationales = obj.get("rationales")
        if not isinstance(rationales, list) or not all(isinstance(r, str) for r in rationales):
            raise InputError("expected a list of strings", path=path, line=line, field="rationales")
        if str(qid) in records:
            raise InputError(f"duplicate id {qid!r}", path=path, line=line, field="id")
        if isinstance(obj.get("teacher"), str):
            teachers.add(obj["teacher"])
        records[str(qid)] = rationales
    return records, sorted(teachers)


def import_chat_completion_dir(directory: str | os.PathLike) -> tuple[dict[str, list[str]], list[str]]:
    """({id: rationales}, sorted model names) from one chat-completion JSON file per question."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise InputError("not a directory", path=directory)
    records: dict[str, list[str]] = {}
    models: set[str] = set()
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix == ".json")
    if not files:
        raise InputError("no *.json chat-completion files", path=directory)
    for path in files:
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputError(json_error_message(e), path=path, line=e.lineno) from None
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list):
            raise InputError("missing field", path=path, field="choices")
        texts = []
        for i, choice in enumerate(choices):
            message = choice.get("message") if isinstance(choice, dict) else None
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, str):
                raise InputError("missing or non-string content", path=path, field=f"choices[{i}].message.content")
            texts.append(content)
        if isinstance(body.get("model"), str):
            models.add(body["model"])
        records[path.stem] = texts
    return records, sorted(models)


def import_rationales_from(path: str | os.PathLike) -> tuple[dict[str, list[str]], list[str]]:
    """Either default layout, chosen by whether `path` is a directory."""
    path = pathlib.Path(path)
    return import_chat_completion_dir(path) if path.is_dir() else import_jsonl(path)


def import_for_examples(
    path: str | os.PathLike, examples: Sequence[Example], mapping: RationaleMapping | None = None
) -> ImportedRationales:
    """Rationales for `examples` from a chat-completion directory or a (mapped) JSON file."""
    path = pathlib.Path(path)
    if not path.exists():
        raise InputError("rationales file or directory not found", path=path)
    if path.is_dir():
        records, models = import_chat_completion_dir(path)
        ids = {ex.id for ex in examples}
        unknown = [(None, qid) for qid in records if qid not in ids]
        return ImportedRationales({k: v for k, v in records.items() if k in ids}, None, models, unknown)
    return import_mapped(path, mapping or RationaleMapping(), examples)
