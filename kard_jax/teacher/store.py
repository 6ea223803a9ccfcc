"""The teacher stage's output: a directory with `rationales.jsonl` and `manifest.json`.

`rationales.jsonl` has one line `{"id": question id, "rationales": [str, ...]}` per question (an
empty list when every sample was filtered out). The directory is written atomically: a temp
directory next to it is filled, then renamed into place, so readers never see half of it.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Mapping, Sequence

from kard_jax.teacher.importers import import_jsonl

RATIONALES_FILE = "rationales.jsonl"
MANIFEST_FILE = "manifest.json"


def write_rationales(
    out_dir: str | os.PathLike, records: Mapping[str, Sequence[str]], manifest: Mapping[str, Any]
) -> pathlib.Path:
    """Write {id: rationales} and the manifest (plus counts and a `created` time) to out_dir,
    replacing any previous contents atomically."""
    out_dir = pathlib.Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    manifest = dict(manifest)
    manifest.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    counts = dict(manifest.get("counts", {}))
    counts.update(questions=len(records), rationales=sum(len(r) for r in records.values()))
    manifest["counts"] = counts
    tmp = pathlib.Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary directory
        with open(tmp / RATIONALES_FILE, "w", encoding="utf-8") as f:
            for qid, rationales in records.items():
                f.write(json.dumps({"id": qid, "rationales": list(rationales)}, ensure_ascii=False) + "\n")
        with open(tmp / MANIFEST_FILE, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, ensure_ascii=False, default=str)
            f.write("\n")
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_rationales(path: str | os.PathLike) -> dict[str, list[str]]:
    """{id: rationales} from an output directory or a rationales JSONL file (`.gz` too; extra
    fields such as "teacher" are ignored)."""
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / RATIONALES_FILE
    return import_jsonl(path)[0]


def read_manifest(out_dir: str | os.PathLike) -> dict:
    with open(pathlib.Path(out_dir) / MANIFEST_FILE, encoding="utf-8") as f:
        return json.load(f)
