"""Benchmark readers: KARD release files, native MedQA / StrategyQA / OpenBookQA, any mapped JSON.

Every reader returns `list[Example]`. Files are JSON lines (optionally gzip-compressed, by the
`.gz` suffix); a file whose first non-blank character is `[` is read as one JSON array (the
native StrategyQA release), with line numbers still reported. Bad input raises `InputError`
naming the file, the 1-based line and the field.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
import pathlib
from typing import Any, Iterator, Literal, Sequence

from kard_jax.data.example import Example
from kard_jax.errors import InputError

Format = Literal["kard", "medqa", "strategyqa", "obqa", "mapped"]
_MISSING = object()
# Path components that name a dataset, for files whose format does not (the KARD release).
_DATASET_DIRS = {"medqa": "medqa", "medqa_usmle": "medqa", "strategyqa": "strategyqa", "obqa": "obqa",
                 "openbookqa": "obqa"}


def open_text(path: str | os.PathLike):
    """Open a text file for reading; `.gz` files are decompressed."""
    path = pathlib.Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_json_records(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line, object) for each record of a JSON-lines file or a JSON array file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise InputError("file not found", path=path)
    with open_text(path) as f:
        first = ""
        lines = iter(f)
        head: list[str] = []
        for line in lines:
            head.append(line)
            if line.strip():
                first = line.lstrip()[0]
                break
        if first == "[":
            yield from _iter_json_array(path, "".join(head) + "".join(lines))
            return
        for lineno, line in enumerate(_chain(head, lines), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"malformed JSON ({e.msg} at column {e.colno})", path=path, line=lineno) from None
            if not isinstance(obj, dict):
                raise InputError(f"expected a JSON object, got {type(obj).__name__}", path=path, line=lineno)
            yield lineno, obj


def _chain(head: list[str], rest) -> Iterator[str]:
    yield from head
    yield from rest


def _iter_json_array(path: pathlib.Path, text: str) -> Iterator[tuple[int, dict]]:
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1

    def skip(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    def line_of(p: int) -> int:
        return text.count("\n", 0, p) + 1

    pos = skip(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise InputError(f"malformed JSON ({e.msg})", path=path, line=line_of(e.pos)) from None
        if not isinstance(obj, dict):
            raise InputError(f"expected a JSON object, got {type(obj).__name__}", path=path, line=line_of(pos))
        yield line_of(pos), obj
        pos = skip(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            return
        raise InputError("malformed JSON array (expected ',' or ']')", path=path, line=line_of(pos))


class _Record:
    """Field access on one record with errors that name file, line and field."""

    def __init__(self, path: pathlib.Path, line: int, obj: dict):
        self.path, self.line, self.obj = path, line, obj

    def error(self, message: str, field: str | None) -> InputError:
        return InputError(message, path=self.path, line=self.line, field=field)

    def get(self, field: str, default: Any = _MISSING) -> Any:
        """Field value; dotted names ("question.stem") walk nested objects."""
        value: Any = self.obj
        for part in field.split("."):
            if not isinstance(value, dict) or part not in value:
                if default is not _MISSING:
                    return default
                raise self.error("missing field", field)
            value = value[part]
        return value

    def text(self, field: str, *, allow_empty: bool = False) -> str:
        value = self.get(field)
        if not isinstance(value, str):
            raise self.error(f"expected a string, got {type(value).__name__}", field)
        if not allow_empty and not value.strip():
            raise self.error("empty text", field)
        return value.strip()

    def ident(self, field: str | None, fallback_prefix: str) -> str:
        if field is None or self.get(field, None) is None:
            return f"{fallback_prefix}-{self.line:06d}"
        value = self.get(field)
        if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
            raise self.error(f"expected a non-empty string or integer id, got {value!r}", field)
        return str(value).strip()


def _index(record: _Record, field: str, value: Any, num_options: int) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise record.error(f"expected an integer option index, got {value!r}", field)
    if not 0 <= value < num_options:
        raise record.error(f"label {value} out of range 0..{num_options - 1}", field)
    return value


def _letter_index(record: _Record, field: str, letters: Sequence[str]) -> int:
    value = record.get(field)
    key = str(value).strip().upper() if isinstance(value, (str, int)) else None
    if key not in [str(x).upper() for x in letters]:
        raise record.error(f"answer {value!r} is not one of the option labels {list(letters)}", field)
    return [str(x).upper() for x in letters].index(key)


def _make(record: _Record, ident: str, question: str, options: Sequence[str], answer: int, dataset: str,
          answer_field: str) -> Example:
    if len(options) < 2:
        raise record.error(f"need at least 2 non-empty options, got {len(options)}", answer_field)
    return Example(id=ident, question=question, options=tuple(options), answer=answer, dataset=dataset)


def _read_kard(record: _Record, dataset: str, prefix: str) -> Example:
    question = record.text("sent1")
    sent2 = record.get("sent2", "")
    if isinstance(sent2, str) and sent2.strip():
        question = f"{question} {sent2.strip()}"
    endings: list[tuple[int, str]] = []
    i = 0
    while f"ending{i}" in record.obj:
        endings.append((i, record.text(f"ending{i}", allow_empty=True)))
        i += 1
    if not endings:
        raise record.error("missing field", "ending0")
    label = _index(record, "label", record.get("label"), len(endings))
    kept = [(i, t) for i, t in endings if t]  # StrategyQA: "yes", "no", "", ""
    if not endings[label][1]:
        raise record.error(f"label {label} points to an empty option", "label")
    answer = [i for i, _ in kept].index(label)
    return _make(record, record.ident("id", prefix), question, [t for _, t in kept], answer, dataset, "label")


def _read_medqa(record: _Record, dataset: str, prefix: str) -> Example:
    options = record.get("options")
    if not isinstance(options, dict) or not options:
        raise record.error("expected an object {letter: text}", "options")
    letters = sorted(options)
    texts = []
    for letter in letters:
        value = options[letter]
        if not isinstance(value, str) or not value.strip():
            raise record.error(f"option {letter!r} is empty or not a string", "options")
        texts.append(value.strip())
    answer = _letter_index(record, "answer_idx", letters)
    return _make(record, record.ident("id", prefix), record.text("question"), texts, answer, dataset, "answer_idx")


def _read_strategyqa(record: _Record, dataset: str, prefix: str) -> Example:
    answer = record.get("answer")
    if not isinstance(answer, bool):
        raise record.error(f"expected true/false, got {answer!r}", "answer")
    return _make(record, record.ident("qid", prefix), record.text("question"), ("yes", "no"),
                 0 if answer else 1, dataset, "answer")


def _read_obqa(record: _Record, dataset: str, prefix: str) -> Example:
    choices = record.get("question.choices")
    if not isinstance(choices, list) or not choices:
        raise record.error("expected a non-empty list of {label, text}", "question.choices")
    labels, texts = [], []
    for j, choice in enumerate(choices):
        if not isinstance(choice, dict) or not isinstance(choice.get("text"), str) or "label" not in choice:
            raise record.error(f"choice {j} is not an object with 'label' and 'text'", "question.choices")
        labels.append(str(choice["label"]))
        texts.append(choice["text"].strip())
    answer = _letter_index(record, "answerKey", labels)
    return _make(record, record.ident("id", prefix), record.text("question.stem"), texts, answer, dataset,
                 "answerKey")


@dataclasses.dataclass(frozen=True)
class FieldMapping:
    """Where the parts of an example live in an arbitrary JSON record (dotted names nest).

    Give `options` (a list of fields, one per option) or `options_field` (one field holding a
    list of strings, a {letter: text} object or a list of {label, text}). `answer_format`:
    "index" (0-based int), "letter" ("A".. or the option's label), "text" (the option text) or
    "bool" (true -> "yes", false -> "no"; no option fields needed). `id=None` numbers examples
    by line.
    """

    question: str = "question"
    answer: str = "answer"
    answer_format: Literal["index", "letter", "text", "bool"] = "index"
    id: str | None = "id"
    options: tuple[str, ...] | None = None
    options_field: str | None = None

    def __post_init__(self):
        if self.answer_format not in ("index", "letter", "text", "bool"):
            raise ValueError(f"answer_format must be index|letter|text|bool, got {self.answer_format!r}")
        if self.options is not None and not isinstance(self.options, tuple):
            object.__setattr__(self, "options", tuple(self.options))
        if self.answer_format != "bool" and (self.options is None) == (self.options_field is None):
            raise ValueError("give exactly one of options (field list) or options_field")


def _mapped_options(record: _Record, mapping: FieldMapping) -> tuple[list[str], list[str]]:
    """(labels, texts) of the options a mapping points to."""
    if mapping.answer_format == "bool" and mapping.options is None and mapping.options_field is None:
        return ["A", "B"], ["yes", "no"]
    if mapping.options is not None:
        texts = [record.text(f) for f in mapping.options]
        return [chr(ord("A") + i) for i in range(len(texts))], texts
    field = mapping.options_field
    value = record.get(field)
    if isinstance(value, dict):
        labels = sorted(value)
        texts = [value[k] for k in labels]
    elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
        if not all("label" in v and "text" in v for v in value):
            raise record.error("expected a list of {label, text}", field)
        labels = [str(v["label"]) for v in value]
        texts = [v["text"] for v in value]
    elif isinstance(value, list):
        labels = [chr(ord("A") + i) for i in range(len(value))]
        texts = value
    else:
        raise record.error("expected a list or an object of options", field)
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise record.error("every option must be a non-empty string", field)
    return [str(x) for x in labels], [t.strip() for t in texts]


def _read_mapped(record: _Record, dataset: str, prefix: str, mapping: FieldMapping) -> Example:
    labels, texts = _mapped_options(record, mapping)
    fmt, field = mapping.answer_format, mapping.answer
    if fmt == "index":
        answer = _index(record, field, record.get(field), len(texts))
    elif fmt == "letter":
        answer = _letter_index(record, field, labels)
    elif fmt == "text":
        value = record.get(field)
        keys = [t.lower() for t in texts]
        if not isinstance(value, str) or value.strip().lower() not in keys:
            raise record.error(f"answer {value!r} is not one of the options", field)
        answer = keys.index(value.strip().lower())
    else:
        value = record.get(field)
        if not isinstance(value, bool):
            raise record.error(f"expected true/false, got {value!r}", field)
        keys = [t.lower() for t in texts]
        if "yes" not in keys or "no" not in keys:
            raise record.error("answer_format 'bool' needs options 'yes' and 'no'", field)
        answer = keys.index("yes" if value else "no")
    return _make(record, record.ident(mapping.id, prefix), record.text(mapping.question), texts, answer, dataset,
                 field)


_READERS = {"kard": _read_kard, "medqa": _read_medqa, "strategyqa": _read_strategyqa, "obqa": _read_obqa}


def infer_dataset(path: str | os.PathLike) -> str:
    """A dataset name from the path ("../medqa_usmle/dev.jsonl" -> "medqa"), or ""."""
    for part in reversed(pathlib.Path(path).parts[:-1]):
        if part.lower() in _DATASET_DIRS:
            return _DATASET_DIRS[part.lower()]
    return ""


def read_examples(
    path: str | os.PathLike,
    *,
    format: Format = "kard",
    dataset: str | None = None,
    mapping: FieldMapping | None = None,
) -> list[Example]:
    """Read a benchmark file into Examples.

    `format`: "kard" (`sent1`, `ending0..`, `label`; empty endings dropped), "medqa" (native
    MedQA-USMLE), "strategyqa" (native, `answer` bool), "obqa" (native OpenBookQA) or "mapped"
    (needs `mapping`). `dataset` defaults to the native format's name, or for "kard"/"mapped"
    to a dataset named by a directory in the path. Ids must be unique within a file.
    """
    path = pathlib.Path(path)
    if format == "mapped":
        if mapping is None:
            raise ValueError("format='mapped' needs a FieldMapping")
        reader = lambda rec, ds, prefix: _read_mapped(rec, ds, prefix, mapping)  # noqa: E731
    elif format in _READERS:
        if mapping is not None:
            raise ValueError(f"mapping is only used with format='mapped', not {format!r}")
        reader = _READERS[format]
    else:
        raise ValueError(f"unknown format {format!r}; expected kard|medqa|strategyqa|obqa|mapped")
    if dataset is None:
        dataset = format if format in ("medqa", "strategyqa", "obqa") else infer_dataset(path)
    prefix = path.name.split(".")[0]
    id_field = mapping.id if format == "mapped" else ("qid" if format == "strategyqa" else "id")
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for line, obj in iter_json_records(path):
        record = _Record(path, line, obj)
        example = reader(record, dataset, prefix)
        if example.id in seen:
            raise record.error(f"duplicate id {example.id!r} (first on line {seen[example.id]})", id_field)
        seen[example.id] = line
        examples.append(example)
    return examples
