"""The README's real-data block, run as written (bash) from a working directory that holds
`runs/` and `models/` folders: a subset of ../shared/data/strategyqa, a tiny model and a local
OpenAI-compatible teacher for the silver row, through every evaluation row (none, BM25, MiniLM
dense, reranked, silver) and the results table."""
import gzip
import http.server
import json
import os
import pathlib
import re
import subprocess
import threading

import pytest

from tests.test_gin_configs import ROOT

TRAIN, TEST, PASSAGES = 60, 12, 1200
TINY = """
from __gin__ import dynamic_registration
from kard_jax.models import t5
include 'models/t5_1_1_tiny.gin'
t5.preset_config.d_model = 32
t5.preset_config.d_kv = 8
t5.preset_config.d_ff = 64
INPUT_LENGTH = 160
TARGET_LENGTH = 48
BATCH_SIZE = 8
MAX_DECODE_LEN = 12
N_CANDIDATES = 4
"""


def readme_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- real-data:begin -->\n```bash\n(.*?)```\n<!-- real-data:end -->", text, re.S)
    assert block, "the README lost its real-data block markers"
    return block.group(1).splitlines()


def _subset(shared: pathlib.Path, out: pathlib.Path) -> None:
    (out / "strategyqa").mkdir(parents=True)
    (out / "kb").mkdir()
    for name, n in (("train.jsonl", TRAIN), ("test.jsonl", TEST)):
        lines = (shared / "strategyqa" / name).read_text().splitlines()[:n]
        (out / "strategyqa" / name).write_text("\n".join(lines) + "\n")
    with gzip.open(shared / "strategyqa" / "rationales.train.jsonl.gz", "rt") as f:
        rows = [next(f) for _ in range(TRAIN)]
    with gzip.open(out / "strategyqa" / "rationales.train.jsonl.gz", "wt") as f:
        f.writelines(rows)
    with gzip.open(shared / "kb" / "wikipedia_paragraphs_strategyqa.jsonl.gz", "rt") as f:
        rows = [next(f) for _ in range(PASSAGES)]
    with gzip.open(out / "kb" / "wikipedia_paragraphs_strategyqa.jsonl.gz", "wt") as f:
        f.writelines(rows)


class _Teacher(http.server.BaseHTTPRequestHandler):
    """Answers with the gold letter the teacher prompt shows (as the paper's teacher sees it)."""

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        letter = re.findall(r"Answer: \(([A-Z])\)\nExplanation:", prompt)[-1]
        question = re.findall(r"Question: ([^\n]*)", prompt)[-1]
        text = f"To answer '{question}' we recall what is known about it. So the answer is ({letter})."
        data = json.dumps({"choices": [{"index": i, "message": {"role": "assistant", "content": text},
                                        "finish_reason": "stop"} for i in range(int(body.get("n", 1)))],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_readme_real_data_block_runs_as_written(shared_data, tmp_path):
    data = tmp_path / "data"
    _subset(shared_data, data)
    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)  # a folder named like the gin includes' ('runs/...') ...
    (work / "models").mkdir()  # ... must not shadow gin_configs/
    (work / "gin_configs").symlink_to(ROOT / "gin_configs")
    (work / "tiny.gin").write_text(TINY)
    lines = readme_block()
    assert lines[0].startswith("D=../shared/data; O=runs/strategyqa;")
    settings = (f"D={data}; O=runs/strategyqa; DS=gin_configs/datasets/strategyqa.gin; M=tiny.gin; VOCAB=300; "
                "STEPS=2; RSTEPS=2")
    script = "set -euo pipefail\n" + "\n".join([settings] + lines[1:]) + "\n"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Teacher)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = dict(os.environ, OPENAI_BASE_URL=f"http://127.0.0.1:{server.server_address[1]}/v1",
               OPENAI_API_KEY="local")
    try:
        proc = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=1500)
    finally:
        server.shutdown()
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    out = work / "runs" / "strategyqa"
    table = (out / "results.md").read_text()
    for row in ("FT", "RD", "KARD, BM25 by question", "KARD, dense by question", "KARD, reranked", "KARD, silver"):
        assert f"| {row}" in table
    assert (out / "results.png").stat().st_size > 1000
    for row in ("ft", "rd", "kard_bm25", "kard_dense", "kard_reranker", "silver"):
        metrics = json.loads((out / f"eval_{row}" / "metrics.json").read_text())
        assert metrics["method"] == row and metrics["num_examples"] == TEST
    rankings = json.loads((out / "eval_reranker" / "metrics.json").read_text())["rankings"]
    assert set(rankings) >= {"bm25", "dense", "reranked", "untrained reranker", "random order"}
    assert not re.search(r"^E\d{4}|Traceback", proc.stderr, re.M), proc.stderr[-3000:]
