"""Corpus ingestion: JSON lines `{id, title, text}` (optionally .gz) and DPR-style TSV.

Documents can be split into ~`chunk_words`-word passages with a stride; a split document's
passages get ids `docid#k` (k = 0, 1, ...), a document that fits in one window keeps its id.
"""
from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import os
import re
from typing import IO, Iterable, Iterator

from kard_jax.data.readers import iter_json_records
from kard_jax.errors import InputError

_WHITESPACE = re.compile(r"\s+")


@dataclasses.dataclass(frozen=True)
class Passage:
    """One retrievable unit of the knowledge base."""

    id: str
    title: str
    text: str

    @property
    def contents(self) -> str:
        """What BM25 indexes and the student reads: `Title . paragraph` (the paper's format)."""
        return f"{self.title} . {self.text}" if self.title else self.text


@dataclasses.dataclass(frozen=True)
class SourcedPassage:
    """A passage with where it came from (for error messages)."""

    passage: Passage
    path: str
    line: int


def open_text(path: str | os.PathLike) -> IO[str]:
    if str(path).endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def is_tsv(path: str | os.PathLike) -> bool:
    name = str(path)
    return name.endswith(".tsv") or name.endswith(".tsv.gz")


def _field(value, path, line: int, field: str, *, required: bool) -> str:
    if value is None:
        if required:
            raise InputError("missing required field", path=path, line=line, field=field)
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(f"expected a string, got {type(value).__name__}", path=path, line=line, field=field)
    value = str(value).strip()
    if required and not value:
        raise InputError("empty value", path=path, line=line, field=field)
    return value


def _text(value, path, line: int, skip_empty: bool) -> str | None:
    """The required text field; None when it is empty and `skip_empty` (missing is always an error)."""
    if skip_empty and isinstance(value, str) and not value.strip():
        return None
    return _field(value, path, line, "text", required=True)


def read_jsonl_documents(path: str | os.PathLike, *, skip_empty_text: bool = False) -> Iterator[tuple[Passage | None, int]]:
    """Yields (document, 1-based line) from a JSON-lines file; blank lines are skipped.

    With `skip_empty_text`, a present but empty text yields (None, line) instead of raising.
    """
    for line_no, obj in iter_json_records(path):
        pid = _field(obj.get("id"), path, line_no, "id", required=True)
        title = _field(obj.get("title"), path, line_no, "title", required=False)
        text = _text(obj.get("text"), path, line_no, skip_empty_text)
        yield (Passage(id=pid, title=title, text=text) if text is not None else None), line_no


def read_tsv_documents(path: str | os.PathLike, *, skip_empty_text: bool = False) -> Iterator[tuple[Passage | None, int]]:
    """Yields (document, 1-based line) from a DPR-style TSV with a header naming id/text/title."""
    with open_text(path) as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None:
            return
        columns = {name.strip(): i for i, name in enumerate(header)}
        for required in ("id", "text"):
            if required not in columns:
                raise InputError(f"header {header!r} lacks column {required!r}", path=path, line=1, field=required)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise InputError(f"malformed TSV row ({e})", path=path, line=reader.line_num) from None
            line_no = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise InputError(f"expected {len(header)} tab-separated columns, got {len(row)}", path=path, line=line_no)
            pid = _field(row[columns["id"]], path, line_no, "id", required=True)
            title = _field(row[columns["title"]] if "title" in columns else None, path, line_no, "title", required=False)
            text = _text(row[columns["text"]], path, line_no, skip_empty_text)
            yield (Passage(id=pid, title=title, text=text) if text is not None else None), line_no


def read_documents(path: str | os.PathLike, *, skip_empty_text: bool = False) -> Iterator[tuple[Passage | None, int]]:
    """Dispatches on the file name: `*.tsv[.gz]` is DPR TSV, anything else JSON lines."""
    if not os.path.isfile(path):
        raise InputError("file not found", path=path)
    reader = read_tsv_documents if is_tsv(path) else read_jsonl_documents
    return reader(path, skip_empty_text=skip_empty_text)


def chunk_document(doc: Passage, chunk_words: int, stride: int | None = None) -> list[Passage]:
    """Splits `doc.text` into windows of `chunk_words` words starting every `stride` words.

    Windows start at 0, stride, 2*stride, ... up to the first window that reaches the end of the
    text (the last one may be shorter). A text of at most `chunk_words` words is kept whole.
    """
    stride = chunk_words if stride is None else stride
    if chunk_words < 1 or not 1 <= stride <= chunk_words:
        raise ValueError(f"need chunk_words >= 1 and 1 <= stride <= chunk_words, got {chunk_words}, {stride}")
    words = doc.text.split()
    if len(words) <= chunk_words:
        return [doc]
    passages = []
    for k, start in enumerate(range(0, len(words), stride)):
        window = words[start:start + chunk_words]
        passages.append(Passage(id=f"{doc.id}#{k}", title=doc.title, text=" ".join(window)))
        if start + chunk_words >= len(words):
            break
    return passages


def iter_passages(
    paths: Iterable[str | os.PathLike], *, chunk_words: int | None = None, chunk_stride: int | None = None,
    skip_empty_text: bool = False,
) -> Iterator[SourcedPassage | None]:
    """All passages of all files, in order, chunked when `chunk_words` is set.

    Yields None for each skipped empty document (so callers can count them).
    """
    for path in paths:
        for doc, line_no in read_documents(path, skip_empty_text=skip_empty_text):
            if doc is None:
                yield None
                continue
            docs = chunk_document(doc, chunk_words, chunk_stride) if chunk_words else [doc]
            for passage in docs:
                yield SourcedPassage(passage, str(path), line_no)


def normalized_text_hash(text: str) -> int:
    """64-bit hash of the lower-cased, whitespace-collapsed text (the de-duplication key)."""
    normalized = _WHITESPACE.sub(" ", text.lower()).strip()
    return int.from_bytes(hashlib.blake2b(normalized.encode("utf-8"), digest_size=8).digest(), "little")


def id_hash(passage_id: str) -> int:
    """64-bit hash of a passage id (the key of the store's sorted id index)."""
    return int.from_bytes(hashlib.blake2b(passage_id.encode("utf-8"), digest_size=8).digest(), "little")
