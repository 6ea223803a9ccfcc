"""Benchmark readers: KARD release files, native MedQA / StrategyQA / OpenBookQA, any mapped JSON.

Every reader returns `list[Example]`. Three file layouts are recognised, whatever the format
(see docs/DATA_FORMATS.md):

* JSON lines: one object per line (blank lines skipped); also objects written one after the
  other over several lines (pretty-printed "JSON lines");
* a JSON array of objects (the native StrategyQA release);
* one JSON object keyed by row: `{"0": {...}, "1": {...}}` (pandas `to_json(orient="index")`),
  its keys kept as row keys.

Each may be gzip-compressed; gzip is recognised by its magic bytes, not by the `.gz` suffix. A
UTF-8 byte-order mark is ignored. Bad input raises `InputError` naming the file, the 1-based
line (of the row's first character) and the field; a file in none of the layouts gets an error
that says which layouts were expected.
"""
from __future__ import annotations

import bisect
import dataclasses
import gzip
import json
import os
import pathlib
import re
import zlib
from typing import Any, Iterator, Literal, NamedTuple, Sequence

from kard_jax.data.example import Example
from kard_jax.errors import InputError

Format = Literal["kard", "medqa", "strategyqa", "obqa", "mapped"]
FORMATS: tuple[str, ...] = ("kard", "medqa", "strategyqa", "obqa", "mapped")
AnswerFormat = Literal["auto", "index", "letter", "text", "bool"]
ANSWER_FORMATS: tuple[str, ...] = ("auto", "index", "letter", "text", "bool")
_MISSING = object()
_GZIP_MAGIC = b"\x1f\x8b"
# Path components that name a dataset, for files whose format does not (the KARD release).
_DATASET_DIRS = {"medqa": "medqa", "medqa_usmle": "medqa", "strategyqa": "strategyqa", "obqa": "obqa",
                 "openbookqa": "obqa"}
LAYOUTS_EXPECTED = ("JSON lines (one object per line), a JSON array of objects, or one JSON object keyed by row "
                    "({\"0\": {...}, \"1\": {...}})")


def is_gzip(path: str | os.PathLike) -> bool:
    """True when the file starts with gzip's magic bytes (whatever its name)."""
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def open_text(path: str | os.PathLike):
    """Open a text file for reading (UTF-8, a leading byte-order mark dropped); gzip-compressed
    files, recognised by their magic bytes, are decompressed."""
    path = pathlib.Path(path)
    if is_gzip(path):
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


class JsonRow(NamedTuple):
    """One record of a JSON file: 1-based line of its first character, the object, and its key
    in a keyed-object layout (None otherwise)."""

    line: int
    obj: dict
    key: str | None = None


def iter_json_records(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line, object) for each record of a JSON file in any recognised layout."""
    for row in iter_json_rows(path):
        yield row.line, row.obj


def iter_json_rows(path: str | os.PathLike) -> Iterator[JsonRow]:
    """Yield every record of a JSON-lines / JSON-array / keyed-object file (see the module doc).

    JSON lines are streamed; the other layouts are read whole.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise InputError("file not found", path=path)
    try:
        with open_text(path) as f:
            yield from _iter_rows(path, f)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise InputError(f"corrupt gzip data ({e})", path=path) from None
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 text ({e.reason} at byte {e.start})", path=path) from None


def _iter_rows(path: pathlib.Path, f) -> Iterator[JsonRow]:
    head: list[str] = []
    first_line = ""
    for line in f:
        head.append(line)
        if line.strip():
            first_line = line
            break
    if not first_line:
        return  # empty file: no records (callers decide whether that is an error)
    first = first_line.lstrip()[0]
    offset = len(head)  # 1-based line number of first_line
    if first == "[":
        yield from _iter_json_array(path, "".join(head) + f.read())
        return
    if first != "{":
        raise InputError(f"not a recognised layout: expected {LAYOUTS_EXPECTED}; the file starts with "
                         f"{first_line.strip()[:40]!r}", path=path, line=offset)
    try:
        obj = json.loads(first_line.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        if e.pos < len(first_line.rstrip()):
            raise InputError(json_error_message(e), path=path, line=offset) from None
        # The first object goes on past its line: a pretty-printed object (keyed rows, or records
        # written one after the other).
        yield from _iter_multiline_objects(path, "".join(head) + f.read())
        return
    rest = _chain([], f)
    second = None
    tail: list[str] = []
    for line in rest:
        tail.append(line)
        if line.strip():
            second = line
            break
    if second is None and _is_keyed(obj):
        # One line holding one object whose every value is an object: rows keyed by index/id.
        for key, value in obj.items():
            yield JsonRow(offset, value, str(key))
        return
    yield JsonRow(offset, obj)
    for lineno, line in enumerate(_chain(tail, rest), start=offset + 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as e:
            raise InputError(json_error_message(e), path=path, line=lineno) from None
        if not isinstance(obj, dict):
            raise InputError(f"JSON lines layout: expected an object on every line, got {type(obj).__name__}",
                             path=path, line=lineno)
        yield JsonRow(lineno, obj)


def json_error_message(e: json.JSONDecodeError) -> str:
    """"malformed JSON (Expecting value at column 7)" for a decode error (column within its line)."""
    joiner = " " if e.msg.endswith(" at") else " at "  # "Unterminated string starting at column 5"
    return f"malformed JSON ({e.msg}{joiner}column {e.colno})"


def _is_keyed(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, dict) for v in obj.values())


def _chain(head: list[str], rest) -> Iterator[str]:
    yield from head
    yield from rest


class _Text:
    """Position helpers over a whole file's text."""

    def __init__(self, text: str):
        self.text = text
        self._newlines = [i for i, c in enumerate(text) if c == "\n"]

    def skip(self, p: int) -> int:
        text = self.text
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    def line_of(self, p: int) -> int:
        return bisect.bisect_left(self._newlines, p) + 1


def _iter_json_array(path: pathlib.Path, text: str) -> Iterator[JsonRow]:
    t = _Text(text)
    decoder = json.JSONDecoder()
    pos = t.skip(text.index("[") + 1)
    if pos < len(text) and text[pos] == "]":
        _expect_end(path, t, pos + 1, "JSON array")
        return
    while True:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise InputError(json_error_message(e), path=path, line=e.lineno) from None
        if not isinstance(obj, dict):
            raise InputError(f"JSON array layout: expected an object per element, got {type(obj).__name__}",
                             path=path, line=t.line_of(pos))
        yield JsonRow(t.line_of(pos), obj)
        pos = t.skip(end)
        if pos < len(text) and text[pos] == ",":
            pos = t.skip(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            _expect_end(path, t, pos + 1, "JSON array")
            return
        raise InputError("malformed JSON array (expected ',' or ']')", path=path, line=t.line_of(pos))


def _expect_end(path: pathlib.Path, t: _Text, pos: int, layout: str) -> None:
    pos = t.skip(pos)
    if pos < len(t.text):
        raise InputError(f"unexpected text after the {layout}", path=path, line=t.line_of(pos))


def _iter_multiline_objects(path: pathlib.Path, text: str) -> Iterator[JsonRow]:
    """A pretty-printed keyed object ({"0": {...}, ...}) or pretty-printed records one after another."""
    t = _Text(text)
    decoder = json.JSONDecoder()
    pos = t.skip(0)
    members: list[tuple[str, int, Any]] = []
    start = pos
    # Walk the first object's members to keep each row's line.
    pos = t.skip(pos + 1)
    if pos < len(text) and text[pos] == "}":
        pos += 1
    else:
        while True:
            try:
                key, end = decoder.raw_decode(text, pos)
                if not isinstance(key, str):
                    raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, pos)
                pos = t.skip(end)
                if pos >= len(text) or text[pos] != ":":
                    raise json.JSONDecodeError("Expecting ':' delimiter", text, pos)
                pos = t.skip(pos + 1)
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise InputError(json_error_message(e), path=path, line=e.lineno) from None
            members.append((key, t.line_of(pos), value))
            pos = t.skip(end)
            if pos < len(text) and text[pos] == ",":
                pos = t.skip(pos + 1)
                continue
            if pos < len(text) and text[pos] == "}":
                pos += 1
                break
            raise InputError("malformed JSON object (expected ',' or '}')", path=path, line=t.line_of(pos))
    pos = t.skip(pos)
    if pos >= len(text) and members and all(isinstance(v, dict) for _, _, v in members):
        for key, line, value in members:
            yield JsonRow(line, value, key)
        return
    # Otherwise: records written one after another (the first one included).
    yield JsonRow(t.line_of(start), {k: v for k, _, v in members})
    while pos < len(text):
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise InputError(json_error_message(e), path=path, line=e.lineno) from None
        if not isinstance(obj, dict):
            raise InputError(f"JSON lines layout: expected an object per record, got {type(obj).__name__}",
                             path=path, line=t.line_of(pos))
        yield JsonRow(t.line_of(pos), obj)
        pos = t.skip(end)


class _Record:
    """Field access on one record with errors that name file, line and field."""

    def __init__(self, path: pathlib.Path, row: JsonRow, number: int):
        self.path, self.line, self.obj, self.key, self.number = path, row.line, row.obj, row.key, number

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
        """The id field's value; without one: the row's key (keyed-object layout), else
        "{file stem}-{1-based record number:06d}" -- stable for a given file."""
        if field is None or self.get(field, None) is None:
            if self.key is not None:
                return self.key
            return f"{fallback_prefix}-{self.number:06d}"
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


def _make(record: _Record, ident: str, question: str, options: Sequence[str], answer: int | None, dataset: str,
          answer_field: str | None) -> Example:
    if len(options) < 2:
        raise record.error(f"need at least 2 non-empty options, got {len(options)}", answer_field)
    if len(options) > 26:
        raise record.error(f"at most 26 options are supported, got {len(options)}", answer_field)
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

    Options, exactly one of:
      `options`         a list of fields, one per option ("opa", "opb", ...);
      `options_field`   one field holding a list of strings, a {letter: text} object or a list of
                        {label, text} objects;
      `inline_options`  True: the options are written in the question text, "... (a) x (b) y" or
                        "... A. x B. y" (also "A)" / "A:"); the question is the text before them;
      none of them      only with `answer_format="bool"`: a yes/no question, options ("yes", "no").
    `answer`: the answer field, or None for an unlabeled file (a test set without answers:
    `Example.answer` is None). `answer_format`:
      "auto"   (default) whatever the value is: a boolean or "yes"/"no"/"true"/"false" (yes/no
               options), an integer (0-based index; `index_base=1` for 1-based), a label with or
               without parentheses in either case ("B", "(b)", "b."), or an option's text;
      "index"  an integer (or digit string) index, `index_base` 0 or 1;
      "letter" an option label ("A".., or the labels of a {label, text} list / {letter: text} object);
      "text"   the option's text (case and surrounding space ignored);
      "bool"   true/false or yes/no (options "yes" and "no").
    `id`: the id field; a record without it (or `id=None`) gets its row key (keyed-object files),
    else "{file stem}-{record number:06d}" (1-based, in file order).
    """

    question: str = "question"
    answer: str | None = "answer"
    answer_format: AnswerFormat = "auto"
    id: str | None = "id"
    options: tuple[str, ...] | None = None
    options_field: str | None = None
    inline_options: bool = False
    index_base: int = 0

    def __post_init__(self):
        if self.answer_format not in ANSWER_FORMATS:
            raise InputError(f"must be one of {'|'.join(ANSWER_FORMATS)}, got {self.answer_format!r}",
                             field="FieldMapping.answer_format")
        if self.options is not None:
            if isinstance(self.options, str):
                raise InputError("a list of field names, one per option (got a string)", field="FieldMapping.options")
            object.__setattr__(self, "options", tuple(self.options))
        if self.index_base not in (0, 1):
            raise InputError(f"must be 0 or 1, got {self.index_base!r}", field="FieldMapping.index_base")
        given = [name for name, on in (("options", self.options is not None),
                                       ("options_field", self.options_field is not None),
                                       ("inline_options", bool(self.inline_options))) if on]
        if len(given) > 1:
            raise InputError(f"give one of options, options_field or inline_options, not {' and '.join(given)}",
                             field="FieldMapping")
        if not given and self.answer_format != "bool":
            raise InputError("say where the options are: options (fields), options_field (one field), "
                             "inline_options=True (in the question text), or answer_format='bool' for yes/no "
                             "questions", field="FieldMapping")

    @property
    def yes_no(self) -> bool:
        return self.options is None and self.options_field is None and not self.inline_options


# "(a) x (b) y" and "A. x B. y" / "A) x" / "A: x" option markers inside a question.
_PAREN_MARKER = re.compile(r"\(([A-Za-z])\)\s*")
_DOT_MARKER = re.compile(r"(?<!\S)([A-Z])[.):]\s+")


def split_inline_options(text: str) -> tuple[str, list[str], list[str]] | None:
    """(question, labels, option texts) from a question with its options written inline, or None.

    Markers "(a)".."(z)" (either case, one case throughout) or "A." / "A)" / "A:" (capitals, at
    the start or after a space) that run A, B, C, ... in order; the longest such run wins (the
    latest among equals that leaves no part empty), so a stray "(b)" or "vitamin A." in the
    question is not taken for a marker.
    """
    for pattern in (_PAREN_MARKER, _DOT_MARKER):
        markers = [(m.start(), m.end(), m.group(1)) for m in pattern.finditer(text)]
        chains: list[list[tuple[int, int, str]]] = []
        for i, (_, _, letter) in enumerate(markers):
            if letter not in "Aa":
                continue
            chain = [markers[i]]
            for marker in markers[i + 1:]:
                if marker[2] == chr(ord(chain[-1][2]) + 1):
                    chain.append(marker)
            if len(chain) >= 2:
                chains.append(chain)
        # Longest first; among equals the latest start ("Vitamin A. deficiency? A. ..."), unless
        # that leaves an empty question or option ("Q? A. Vitamin A. B. ...").
        for chain in sorted(chains, key=lambda c: (-len(c), -c[0][0])):
            question = text[:chain[0][0]].strip()
            texts = [text[m[1]:(chain[j + 1][0] if j + 1 < len(chain) else len(text))].strip()
                     for j, m in enumerate(chain)]
            if question and all(texts):
                return question, [m[2].upper() for m in chain], texts
    return None


_LABEL_FORMS = re.compile(r"^(?:(?:option|choice|answer)\s*:?\s*)?[\(\[]?\s*([A-Za-z0-9]{1,3})\s*[\)\]]?\s*[.:]?$",
                          re.IGNORECASE)
_LABELLED_TEXT = re.compile(r"^[\(\[]?\s*([A-Za-z])\s*[\)\].:]\s*(.+)$", re.DOTALL)
_TRUE, _FALSE = ("true", "yes", "y", "t", "1"), ("false", "no", "n", "f", "0")


def _squash_key(text: str) -> str:
    return " ".join(text.split()).lower().rstrip(".")


def answer_index(value: Any, labels: Sequence[str], texts: Sequence[str], answer_format: str = "auto",
                 index_base: int = 0) -> int:
    """The option index an answer value names; raises ValueError saying why it names none.

    See `FieldMapping` for the forms each `answer_format` accepts.
    """
    n = len(texts)
    upper_labels = [str(x).upper() for x in labels]
    keys = [_squash_key(t) for t in texts]

    def as_index(v) -> int | None:
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            v = int(v.strip())
        if isinstance(v, bool) or not isinstance(v, int):
            return None
        i = v - index_base
        if not 0 <= i < n:
            raise ValueError(f"index {v} out of range {index_base}..{n - 1 + index_base}")
        return i

    def as_label(v) -> int | None:
        if not isinstance(v, (str, int)) or isinstance(v, bool):
            return None
        m = _LABEL_FORMS.match(str(v).strip())
        if m and m.group(1).upper() in upper_labels:
            return upper_labels.index(m.group(1).upper())
        return None

    def as_text(v) -> int | None:
        if isinstance(v, str) and keys.count(_squash_key(v)) == 1:
            return keys.index(_squash_key(v))
        return None

    def as_bool(v) -> int | None:
        if isinstance(v, str) and v.strip().lower() in _TRUE + _FALSE:
            v = v.strip().lower() in _TRUE
        if not isinstance(v, bool):
            return None
        if "yes" not in keys or "no" not in keys:
            raise ValueError("a true/false answer needs options 'yes' and 'no'")
        return keys.index("yes" if v else "no")

    if answer_format == "index":
        found = as_index(value)
        if found is None:
            raise ValueError(f"expected an integer option index, got {value!r}")
        return found
    if answer_format == "letter":
        found = as_label(value)
        if found is None:
            raise ValueError(f"answer {value!r} is not one of the option labels {list(labels)}")
        return found
    if answer_format == "text":
        found = as_text(value)
        if found is None:
            raise ValueError(f"answer {value!r} is not one of the options")
        return found
    if answer_format == "bool":
        found = as_bool(value) if not isinstance(value, int) or isinstance(value, bool) else None
        if found is None:
            raise ValueError(f"expected true/false or yes/no, got {value!r}")
        return found
    # auto: booleans, then labels, then option texts, then yes/no words, then indices.
    if isinstance(value, bool):
        return as_bool(value)
    if isinstance(value, str):
        for attempt in (as_label, as_text):
            found = attempt(value)
            if found is not None:
                return found
        m = _LABELLED_TEXT.match(value.strip())  # "(B) Ciprofloxacin", "b. ciprofloxacin"
        if m and m.group(1).upper() in upper_labels:
            i = upper_labels.index(m.group(1).upper())
            if keys[i] == _squash_key(m.group(2)):
                return i
        if value.strip().lower() in ("yes", "no", "true", "false") and "yes" in keys and "no" in keys:
            return as_bool(value)
    found = as_index(value)
    if found is not None:
        return found
    raise ValueError(f"answer {value!r} is neither an option label {list(labels)}, an option's text, an index "
                     "nor true/false")


def _mapped_options(record: _Record, mapping: FieldMapping, question: str) -> tuple[str, list[str], list[str]]:
    """(question, labels, texts) of the options a mapping points to."""
    if mapping.yes_no:
        return question, ["A", "B"], ["yes", "no"]
    if mapping.inline_options:
        split = split_inline_options(question)
        if split is None:
            raise record.error("no inline options found in the question (expected \"(a) ... (b) ...\" or "
                               "\"A. ... B. ...\")", mapping.question)
        return split
    if mapping.options is not None:
        texts = [record.text(f) for f in mapping.options]
        return question, [chr(ord("A") + i) for i in range(len(texts))], texts
    field = mapping.options_field
    value = record.get(field)
    if isinstance(value, dict):
        labels = sorted(value)
        texts = [value[k] for k in labels]
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        if not all("label" in v and "text" in v for v in value):
            raise record.error("expected a list of {label, text}", field)
        labels = [str(v["label"]) for v in value]
        texts = [v["text"] for v in value]
    elif isinstance(value, list):
        labels = [chr(ord("A") + i) for i in range(min(len(value), 26))]
        texts = value
    else:
        raise record.error("expected a list or an object of options", field)
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise record.error("every option must be a non-empty string", field)
    return question, [str(x) for x in labels], [t.strip() for t in texts]


def _read_mapped(record: _Record, dataset: str, prefix: str, mapping: FieldMapping) -> Example:
    question, labels, texts = _mapped_options(record, mapping, record.text(mapping.question))
    answer = None
    if mapping.answer is not None:
        try:
            answer = answer_index(record.get(mapping.answer), labels, texts, mapping.answer_format,
                                  mapping.index_base)
        except ValueError as e:
            raise record.error(str(e), mapping.answer) from None
    return _make(record, record.ident(mapping.id, prefix), question, texts, answer, dataset, mapping.answer)


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
    format: Format | FieldMapping = "kard",
    dataset: str | None = None,
    mapping: FieldMapping | None = None,
    allow_empty: bool = False,
) -> list[Example]:
    """Read a benchmark file (any layout, see the module doc) into Examples.

    `format`: a `FieldMapping` (any field names; see its doc), or a built-in format name: "kard"
    (`sent1`, `ending0..`, `label`; empty endings dropped), "medqa" (native MedQA-USMLE),
    "strategyqa" (native, `answer` bool), "obqa" (native OpenBookQA), or "mapped" (with
    `mapping`). `dataset` defaults to the native format's name, else to a dataset named by a
    directory in the path. Ids must be unique within a file. A file without any record is an
    `InputError` unless `allow_empty`.
    """
    path = pathlib.Path(path)
    if isinstance(format, FieldMapping):
        if mapping is not None and mapping != format:
            raise ValueError("pass the FieldMapping as format= or as mapping=, not two different ones")
        format, mapping = "mapped", format
    if format == "mapped":
        if mapping is None:
            raise InputError("format 'mapped' needs a FieldMapping (pass it as the format itself)", field="format")
        reader = lambda rec, ds, prefix: _read_mapped(rec, ds, prefix, mapping)  # noqa: E731
    elif format in _READERS:
        if mapping is not None:
            raise ValueError(f"mapping is only used with format='mapped', not {format!r}")
        reader = _READERS[format]
    else:
        raise InputError(f"unknown examples format {format!r}; expected one of {'|'.join(FORMATS[:-1])} or a "
                         "FieldMapping", field="format")
    if dataset is None:
        dataset = format if format in ("medqa", "strategyqa", "obqa") else infer_dataset(path)
    prefix = path.name.split(".")[0]
    id_field = mapping.id if format == "mapped" else ("qid" if format == "strategyqa" else "id")
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for number, row in enumerate(iter_json_rows(path), start=1):
        record = _Record(path, row, number)
        example = reader(record, dataset, prefix)
        if example.id in seen:
            raise record.error(f"duplicate id {example.id!r} (first on line {seen[example.id]})", id_field)
        seen[example.id] = record.line
        examples.append(example)
    if not examples and not allow_empty:
        raise InputError("no examples: the file holds no records", path=path)
    return examples
