"""A failing teacher endpoint, against a local fake HTTP server on 127.0.0.1: a refusal (401) and an
endpoint that keeps failing (500) end with ONE line naming the HTTP status (also through
`python -m kard_jax.main`, exit code 2, nothing written); the first failure for good stops every
worker (no question is started after it); `timeout_s` bounds a whole request, a server dripping
its body included; retries, timeouts and unusable responses are counted in the summary.

Time is bounded by the subprocess/`join` timeouts and by counting requests, never by timed asserts.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kard_jax.data.example import Example
from kard_jax.errors import InputError
from kard_jax.teacher import prompts
from kard_jax.teacher.client import SampleCache, TeacherClient, TeacherConfig, TeacherError

REPO = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = [Example(id=f"q{i}", question=f"Question number {i}?", options=("yes", "no"), answer=0,
                    dataset="strategyqa") for i in range(6)]
PROMPT = prompts.teacher_prompt_for("strategyqa")
GOOD_TEXT = "Everything in the question points one way here. So the answer is (A)."


class FakeEndpoint:
    """POST /v1/chat/completions answered by `script(request_number)`: "401", "500", "malformed",
    "drip" (headers now, then the body one byte every `drip_s`) or "ok". Serves at most
    `max_requests` requests (later ones get 503) so a runaway client cannot loop for long."""

    def __init__(self, script, *, drip_s=0.05, max_requests=50):
        self.script, self.drip_s, self.max_requests = script, drip_s, max_requests
        self.requests = 0
        self.questions: list[str] = []
        self.lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status, body: bytes, drip=False):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    if not drip:
                        self.wfile.write(body)
                        return
                    for i in range(len(body)):
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                        time.sleep(endpoint.drip_s)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                question = request["messages"][-1]["content"].split("Question: ")[-1].split("\n")[0]
                with endpoint.lock:
                    endpoint.requests += 1
                    number = endpoint.requests
                    endpoint.questions.append(question)
                if number > endpoint.max_requests:
                    return self._send(503, b'{"error": {"message": "request budget of the fake endpoint spent"}}')
                action = endpoint.script(number)
                if action == "401":
                    return self._send(401, b'{"error": {"message": "Incorrect API key provided"}}')
                if action == "500":
                    return self._send(500, b'{"error": {"message": "boom"}}')
                if action == "malformed":
                    return self._send(200, b'{"choices": [{"index": 0, "mess')
                n = int(request.get("n", 1))
                body = json.dumps({"model": request["model"], "choices": [
                    {"index": i, "message": {"role": "assistant", "content": GOOD_TEXT}, "finish_reason": "stop"}
                    for i in range(n)], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()
                return self._send(200, body, drip=action == "drip")

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


def _config(endpoint, **overrides):
    cfg = dict(model="fake-teacher", base_url=endpoint.base_url, api_key="sk-secret-test-key", n=2, concurrency=2,
               timeout_s=5.0, max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.02)
    return TeacherConfig(**(cfg | overrides))


def _generate(client, cache_path, examples=EXAMPLES):
    """client.generate in a thread, joined with a generous bound; returns (result, error)."""
    outcome = {}

    def target():
        try:
            with SampleCache(cache_path) as cache:
                outcome["result"] = client.generate(
                    examples, cache, build_prompt=lambda e: prompts.build_teacher_prompt(e, PROMPT),
                    build_messages=lambda e: prompts.build_teacher_messages(e, PROMPT), progress=False)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "generate() did not end"
    return outcome.get("result"), outcome.get("error")


def test_refusal_401_is_one_line_and_nothing_new_starts(tmp_path):
    with FakeEndpoint(lambda number: "401") as endpoint:
        client = TeacherClient(_config(endpoint, concurrency=3), seed=0)
        _, error = _generate(client, tmp_path / "cache.jsonl")
    assert isinstance(error, TeacherError) and isinstance(error, InputError) and error.status == 401
    message = str(error)
    assert "\n" not in message and "HTTP 401 (Incorrect API key provided)" in message
    assert "OPENAI_API_KEY" in message and "sk-secret" not in message
    # Not retried; at most the questions already in flight were asked, no new one started.
    assert endpoint.requests <= 3 and len(set(endpoint.questions)) == endpoint.requests
    assert not (tmp_path / "cache.jsonl").exists()  # no sample, nothing written


def test_always_500_gives_up_and_stops_every_worker(tmp_path):
    with FakeEndpoint(lambda number: "500") as endpoint:
        client = TeacherClient(_config(endpoint, concurrency=2, max_attempts=3), seed=0)
        _, error = _generate(client, tmp_path / "cache.jsonl")
    assert isinstance(error, TeacherError) and error.status == 500
    assert "giving up after 3 attempts (last: HTTP 500 (boom))" in str(error) and "\n" not in str(error)
    # Only the questions the two workers held when the first gave up were ever asked; the other
    # worker stopped at its next retry, so no more than 2 x 3 requests.
    assert len(set(endpoint.questions)) <= 2 and endpoint.requests <= 6
    assert client.usage.retries >= 2 and "retries" in client.summary()


def test_timeout_bounds_a_dripping_body(tmp_path):
    # The body takes ~40 bytes x 0.05 s >> timeout_s = 0.5 s, though every byte arrives well within it.
    with FakeEndpoint(lambda number: "drip", drip_s=0.05) as endpoint:
        client = TeacherClient(_config(endpoint, concurrency=1, max_attempts=2, timeout_s=0.5), seed=0)
        _, error = _generate(client, tmp_path / "cache.jsonl", EXAMPLES[:1])
    assert isinstance(error, TeacherError)
    assert "no complete answer within timeout_s=0.5" in str(error)
    assert client.usage.timeouts == 2 and endpoint.requests == 2


def test_retries_and_unusable_responses_are_counted(tmp_path):
    script = {1: "malformed", 2: "500"}
    with FakeEndpoint(lambda number: script.get(number, "ok")) as endpoint:
        client = TeacherClient(_config(endpoint, concurrency=1, n=2), seed=0)
        result, error = _generate(client, tmp_path / "cache.jsonl", EXAMPLES[:2])
    assert error is None and result == {"q0": [GOOD_TEXT] * 2, "q1": [GOOD_TEXT] * 2}
    u = client.usage
    assert (u.requests, u.retries, u.unusable_responses, u.timeouts) == (4, 2, 1, 0)
    assert endpoint.requests == 4
    assert "4 requests (2 retries, 0 timeouts, 1 unusable responses)" in client.summary()


def _main(endpoint, out, *args):
    examples = out.parent / "strategyqa" / "train.jsonl"
    examples.parent.mkdir(exist_ok=True)
    examples.write_text("".join(json.dumps({"id": e.id, "sent1": e.question, "ending0": "yes", "ending1": "no",
                                            "label": 0}) + "\n" for e in EXAMPLES))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENAI_API_KEY": "sk-secret-test-key",
           "OPENAI_BASE_URL": endpoint.base_url}
    return subprocess.run(
        [sys.executable, "-m", "kard_jax.main", "--gin_file=gin_configs/runs/teacher.gin",
         "--gin.JOB=@kard_jax.teacher.run.generate_rationales", "--gin.TEACHER_MODEL='fake-teacher'",
         f"--gin.EXAMPLES='{examples}'", f"--gin.OUT_DIR='{out}'", "--gin.N_SAMPLES=2",
         "--gin.kard_jax.teacher.client.TeacherConfig.backoff_initial_s=0.01",
         "--gin.kard_jax.teacher.client.TeacherConfig.backoff_max_s=0.02", *args],
        cwd=REPO, capture_output=True, text=True, timeout=240, env=env)


@pytest.mark.parametrize("status,expected", [
    ("401", "refused the request: HTTP 401 (Incorrect API key provided)"),
    ("500", "giving up after 2 attempts (last: HTTP 500 (boom))"),
])
def test_failing_endpoint_through_main_is_one_line(tmp_path, status, expected):
    out = tmp_path / "teacher"
    with FakeEndpoint(lambda number: status) as endpoint:
        done = _main(endpoint, out, "--gin.kard_jax.teacher.client.TeacherConfig.max_attempts=2")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], done.stderr
    assert "sk-secret" not in done.stderr + done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["strategyqa"]  # no output dir, no cache file
    assert endpoint.requests <= 8 * 2  # at most concurrency (8) questions x max_attempts (2)
