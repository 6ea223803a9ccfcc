"""Teacher client against a real local HTTP server speaking the chat-completions protocol."""
import collections
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest

from kard_jax.data.example import Example
from kard_jax.teacher import prompts
from kard_jax.teacher.client import SampleCache, TeacherClient, TeacherConfig, TeacherError
from kard_jax.teacher.run import generate_rationales
from kard_jax.teacher.store import read_manifest, read_rationales

REPO = pathlib.Path(__file__).resolve().parents[1]
PROMPT_TOKENS = 7
COMPLETION_TOKENS = 5


class FakeChatServer:
    """POST /v1/chat/completions. Faults are consumed per question (keyed by the question text of
    the prompt's last block) before normal answers: "429", "500", "timeout", "malformed", "400",
    "401", "nocontent". Only normal answers count as served samples."""

    def __init__(self, *, faults=None, max_n=None, reject_n=False, delay_s=0.0, timeout_sleep_s=1.0):
        self.faults = {q: list(f) for q, f in (faults or {}).items()}
        self.max_n, self.reject_n, self.delay_s, self.timeout_sleep_s = max_n, reject_n, delay_s, timeout_sleep_s
        self.served = collections.Counter()  # question -> samples delivered
        self.served_by_key = collections.Counter()  # (api key, question) -> samples delivered
        self.requests = collections.Counter()  # question -> HTTP requests seen
        self.requested_n = []
        self.in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status, body: bytes, headers=()):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_POST(self):
                with server.lock:
                    server.in_flight += 1
                try:
                    self._handle()
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _handle(self):
                if self.path != "/v1/chat/completions":
                    return self._send(404, b'{"error": {"message": "not found"}}')
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                question = request["messages"][-1]["content"].split("Question: ")[-1].split("\n")[0]
                n = int(request.get("n", 1))
                with server.lock:
                    server.requests[question] += 1
                    server.requested_n.append(n)
                    fault = server.faults.get(question, []).pop(0) if server.faults.get(question) else None
                if server.delay_s:
                    time.sleep(server.delay_s)
                if fault == "429":
                    return self._send(429, b'{"error": {"message": "rate limited"}}', [("Retry-After", "0")])
                if fault == "500":
                    return self._send(500, b'{"error": {"message": "boom"}}')
                if fault == "401":
                    return self._send(401, b'{"error": {"message": "bad key"}}')
                if fault == "timeout":
                    time.sleep(server.timeout_sleep_s)
                    return self._send(500, b'{"error": {"message": "too late"}}')
                if fault == "malformed":
                    return self._send(200, b'{"id": "x", "choices": [{"index": 0, "mess')
                if fault == "nocontent":
                    return self._send(200, json.dumps({"id": "x", "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": None}, "finish_reason": "stop"}]
                    }).encode())
                if server.reject_n and n > 1:
                    return self._send(400, b'{"error": {"message": "n must be 1", "param": "n"}}')
                k = min(n, server.max_n) if server.max_n else n
                with server.lock:
                    start = server.served[question]
                    server.served[question] += k
                    server.served_by_key[self.headers.get("Authorization", ""), question] += k
                choices = [
                    {"index": i, "message": {"role": "assistant",
                                             "content": f"Rationale {start + i} for {question} So the answer is (B)."},
                     "finish_reason": "stop"}
                    for i in range(k)
                ]
                body = {"id": "cmpl", "object": "chat.completion", "model": request["model"], "choices": choices,
                        "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS * k,
                                  "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS * k}}
                return self._send(200, json.dumps(body).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.httpd.server_port}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


EXAMPLES = [Example(id=f"q{i}", question=f"Question number {i}?", options=("yes", "no"), answer=1,
                    dataset="strategyqa") for i in range(6)]
PROMPT = prompts.teacher_prompt_for("strategyqa")


def _config(server, **overrides):
    cfg = dict(model="fake-teacher", base_url=server.base_url, api_key="test-key", n=3, concurrency=3,
               timeout_s=0.3, max_attempts=5, backoff_initial_s=0.01, backoff_max_s=0.05,
               price_prompt_per_1k=1.0, price_completion_per_1k=2.0)
    cfg.update(overrides)
    return TeacherConfig(**cfg)


def _generate(client, cache, examples=EXAMPLES):
    return client.generate(examples, cache, build_prompt=lambda e: prompts.build_teacher_prompt(e, PROMPT),
                           build_messages=lambda e: prompts.build_teacher_messages(e, PROMPT), progress=False)


def test_teacher_prompt_shows_gold_answer():
    text = prompts.build_teacher_prompt(EXAMPLES[0], PROMPT)
    assert text.endswith("Question: Question number 0?\n(A) yes (B) no\nAnswer: (B)\nExplanation:")
    assert text.count("Explanation:") == len(PROMPT.exemplars) + 1
    assert prompts.build_teacher_messages(EXAMPLES[0], PROMPT) == [{"role": "user", "content": text}]


def test_faults_are_retried_and_every_question_gets_exactly_n(tmp_path):
    faults = {
        "Question number 0?": ["429", "500"],
        "Question number 1?": ["timeout"],
        "Question number 2?": ["malformed", "nocontent"],
        "Question number 3?": ["429", "timeout", "malformed"],
    }
    # max_n=2 < n=3: the server ignores part of n, so the client must top up.
    with FakeChatServer(faults=faults, max_n=2, timeout_sleep_s=1.0) as server:
        client = TeacherClient(_config(server), seed=0)
        with SampleCache(tmp_path / "cache.jsonl") as cache:
            out = _generate(client, cache)
    assert list(out) == [e.id for e in EXAMPLES]
    for example in EXAMPLES:
        q = example.question
        assert out[example.id] == [f"Rationale {i} for {q} So the answer is (B)." for i in range(3)]
        assert server.served[q] == 3  # nothing requested twice once answered
        assert server.requests[q] == 2 + len(faults.get(q, []))  # one n=3 request + one top-up + faults
    assert max(server.requested_n) == 3 and 1 in server.requested_n
    usage = client.usage
    assert usage.retries == sum(len(f) for f in faults.values())
    assert usage.new_samples == 18 and usage.cached_samples == 0
    assert usage.prompt_tokens == PROMPT_TOKENS * 12 and usage.completion_tokens == COMPLETION_TOKENS * 18
    assert usage.cost(client.config) == pytest.approx((PROMPT_TOKENS * 12 * 1.0 + COMPLETION_TOKENS * 18 * 2.0) / 1000)
    assert "18 new samples" in client.summary()
    lines = (tmp_path / "cache.jsonl").read_text().splitlines()
    assert len(lines) == 18 and {json.loads(l)["id"] for l in lines} == {e.id for e in EXAMPLES}

    # A second run is served entirely from the cache: no request at all.
    with FakeChatServer() as server2:
        client2 = TeacherClient(_config(server2))
        with SampleCache(tmp_path / "cache.jsonl") as cache:
            assert _generate(client2, cache) == out
    assert sum(server2.requests.values()) == 0 and client2.usage.cached_samples == 18


def test_server_rejecting_n_falls_back_to_single_samples(tmp_path):
    with FakeChatServer(reject_n=True) as server:
        client = TeacherClient(_config(server, n=4), seed=0)
        with SampleCache(tmp_path / "c.jsonl") as cache:
            out = _generate(client, cache, EXAMPLES[:2])
    assert all(len(v) == 4 and len(set(v)) == 4 for v in out.values())
    assert all(server.served[e.question] == 4 for e in EXAMPLES[:2])


def test_one_sample_per_request_mode(tmp_path):
    with FakeChatServer() as server:
        client = TeacherClient(_config(server, n=2, max_samples_per_request=1))
        with SampleCache(tmp_path / "c.jsonl") as cache:
            _generate(client, cache, EXAMPLES[:2])
    assert server.requested_n == [1, 1, 1, 1]


def test_non_retryable_and_exhausted_retries_raise(tmp_path):
    with FakeChatServer(faults={"Question number 0?": ["401"]}) as server:
        client = TeacherClient(_config(server))
        with SampleCache(tmp_path / "a.jsonl") as cache, pytest.raises(TeacherError, match="401"):
            _generate(client, cache, EXAMPLES[:1])
    assert server.requests["Question number 0?"] == 1
    with FakeChatServer(faults={"Question number 0?": ["500"] * 10}) as server:
        client = TeacherClient(_config(server, max_attempts=3))
        with SampleCache(tmp_path / "b.jsonl") as cache, pytest.raises(TeacherError, match="3 attempts"):
            _generate(client, cache, EXAMPLES[:1])
    assert server.requests["Question number 0?"] == 3


def test_cache_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "c.jsonl"
    with SampleCache(path) as cache:
        cache.put("k1", "first", id="q")
    with open(path, "a") as f:
        f.write('{"key": "k2", "text": "half')  # a process killed mid-write
    with SampleCache(path) as cache:
        assert cache.skipped_lines == 1 and "k1" in cache and "k2" not in cache
        cache.put("k3", "third", id="q")
    with SampleCache(path) as cache:
        assert cache.get("k1") == "first" and cache.get("k3") == "third" and len(cache) == 2


_CHILD = r"""
import sys
from kard_jax.data.example import Example
from kard_jax.teacher import prompts
from kard_jax.teacher.client import SampleCache, TeacherClient, TeacherConfig
examples = [Example(id=f"q{i}", question=f"Question number {i}?", options=("yes", "no"), answer=1,
                    dataset="strategyqa") for i in range(6)]
p = prompts.teacher_prompt_for("strategyqa")
client = TeacherClient(TeacherConfig(model="fake-teacher", base_url=sys.argv[1], api_key="child", n=3, concurrency=1,
                                     max_samples_per_request=1, timeout_s=5))
with SampleCache(sys.argv[2]) as cache:
    client.generate(examples, cache, build_prompt=lambda e: prompts.build_teacher_prompt(e, p),
                    build_messages=lambda e: prompts.build_teacher_messages(e, p), progress=False)
"""


def test_killed_run_resumes_from_cache_without_rerequesting(tmp_path):
    cache_path = tmp_path / "c.jsonl"
    with FakeChatServer(delay_s=0.05) as server:
        child = subprocess.Popen([sys.executable, "-c", _CHILD, server.base_url, str(cache_path)], cwd=REPO,
                                 env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            deadline = time.time() + 60
            while time.time() < deadline:
                if cache_path.exists() and len(cache_path.read_text().splitlines()) >= 7:
                    break
                assert child.poll() is None, "child finished before it could be killed"
                time.sleep(0.01)
            child.send_signal(signal.SIGKILL)
        finally:
            child.wait()
        cached_before = [json.loads(l) for l in cache_path.read_text().splitlines() if l.strip()]
        cached_per_question = collections.Counter(rec["id"] for rec in cached_before)
        assert 7 <= len(cached_before) < 18

        out_dir = tmp_path / "out"
        examples_path = tmp_path / "strategyqa" / "train.jsonl"
        examples_path.parent.mkdir()
        examples_path.write_text("".join(json.dumps(
            {"id": e.id, "sent1": e.question, "sent2": "", "ending0": "yes", "ending1": "no", "ending2": "",
             "ending3": "", "label": 1}) + "\n" for e in EXAMPLES))
        report = generate_rationales(
            examples_path=str(examples_path), out_dir=str(out_dir), cache_path=str(cache_path), progress=False,
            teacher=TeacherConfig(model="fake-teacher", base_url=server.base_url, api_key="resume", n=3, concurrency=2,
                                  timeout_s=5),
        )
        while server.in_flight:
            time.sleep(0.01)
    # The resumed run asked only for the samples the cache lacked: none cached was re-requested.
    for e in EXAMPLES:
        assert server.served_by_key["Bearer resume", e.question] == 3 - cached_per_question[e.id]
    # The killed run lost at most the one sample in flight when it died.
    served_child = sum(v for (key, _), v in server.served_by_key.items() if key == "Bearer child")
    assert served_child - len(cached_before) in (0, 1)
    result = read_rationales(out_dir)
    assert set(result) == {e.id for e in EXAMPLES}
    for rec in cached_before:  # samples from the killed run are reused verbatim
        assert rec["text"] in result[rec["id"]]
    assert report.kept == 18 and report.rationales_in == 18
    manifest = read_manifest(out_dir)
    assert manifest["counts"]["usage"]["cached_samples"] == len(cached_before)
    assert manifest["counts"]["usage"]["new_samples"] == 18 - len(cached_before)
    assert "api_key" not in manifest["config"]["teacher"]


def test_openai_client_is_built_without_its_own_retries(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    client = TeacherClient(TeacherConfig(model="m"))
    assert isinstance(client._client, openai.OpenAI)
    assert client._client.max_retries == 0 and client._client.api_key == "from-env"
    assert str(client._client.base_url).startswith("http://127.0.0.1:9/v1")
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        TeacherClient(TeacherConfig(model="m"))
