"""Import rationales produced elsewhere.

Two layouts:
* a JSONL file (optionally `.gz`) of `{"id", "teacher", "rationales": [...]}` lines, as in
  ../shared/data/{ds}/rationales.train.jsonl.gz (also our own `rationales.jsonl`);
* a directory of chat-completion responses, one JSON file per question (KARD release style): the
  file name without `.json` is the question id, the rationales are `choices[i].message.content`.
"""
from __future__ import annotations

import json
import os
import pathlib

from kard_jax.data.readers import iter_json_records
from kard_jax.errors import InputError


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
            raise InputError(f"malformed JSON ({e.msg})", path=path, line=e.lineno) from None
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
    """Either layout, chosen by whether `path` is a directory."""
    path = pathlib.Path(path)
    return import_chat_completion_dir(path) if path.is_dir() else import_jsonl(path)
