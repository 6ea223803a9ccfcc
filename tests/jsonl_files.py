"""Writing JSON-lines fixtures (plain or gzip) for tests."""
import gzip
import json


def write_jsonl(path, rows, *, gz=False):
    """rows: dicts (dumped as JSON) or raw strings (written as is, for malformed-line tests)."""
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path
