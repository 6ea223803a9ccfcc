"""A local teacher LLM for the demo: an OpenAI chat-completions endpoint on 127.0.0.1.

It speaks the protocol the project's teacher client uses against real providers (POST
/v1/chat/completions with `n` samples, JSON choices, usage), so the demo's teacher stage runs the
real client (cache, concurrency, retries) end to end. It knows the generated world's facts: for
the question in the prompt's last block it writes a chain-of-thought rationale that restates the
deciding fact and ends with the letter and the value. With probability `wrong_rate` a sample
cites a wrong value and answers with its letter, so the wrong-answer filter has work to do.
Samples are deterministic in (question, sample position).
"""
from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import random
import re
import threading
from typing import Iterator, Mapping

from kard_jax.demo import world as world_lib

_QUESTION = re.compile(r"Question: (?P<q>[^\n]*)\n[^\n]*\nAnswer: \((?P<letter>[A-Z])\)\nExplanation:\s*$")


class _Teacher:
    def __init__(self, questions: Mapping[str, tuple[str, str]], facts: Mapping[str, Mapping[str, str]],
                 wrong_rate: float, seed: int):
        self.questions, self.facts, self.wrong_rate, self.seed = questions, facts, wrong_rate, seed

    def rationale(self, question: str, sample: int) -> str:
        entity, attribute = self.questions[question]
        values = world_lib.VALUES[attribute]
        rng = random.Random(hashlib.sha256(f"{self.seed}|{question}|{sample}".encode()).digest())
        value = self.facts[entity][attribute]
        if rng.random() < self.wrong_rate:
            value = rng.choice([v for v in values if v != value])
        letter = "ABCD"[values.index(value)]
        fact = world_lib.fact_sentence(entity, attribute, value)
        opening = rng.choice(["", f"We need to recall what is known about the {entity}. ",
                              f"The question asks about the {entity}. "])
        closing = rng.choice(["So the answer is", "Therefore the answer is", "Hence the answer is"])
        return f"{opening}{fact} {closing} ({letter}) {value}."


def _handler(teacher: _Teacher):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet: the client reports progress
            pass

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):  # noqa: N802 (http.server's naming)
            if not self.path.rstrip("/").endswith("/chat/completions"):
                return self._reply(404, {"error": {"message": f"no route {self.path}"}})
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                prompt = request["messages"][-1]["content"]
                n = int(request.get("n") or 1)
            except (ValueError, KeyError, IndexError, TypeError) as e:
                return self._reply(400, {"error": {"message": f"bad request: {e}"}})
            match = _QUESTION.search(prompt)
            if not match or match.group("q") not in teacher.questions:
                return self._reply(400, {"error": {"message": "the prompt's last question is not from this world"}})
            texts = [teacher.rationale(match.group("q"), i) for i in range(n)]
            self._reply(200, {
                "id": "demo", "object": "chat.completion", "model": request.get("model", "demo-teacher"),
                "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                            for i, t in enumerate(texts)],
                "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": sum(len(t.split()) for t in texts),
                          "total_tokens": len(prompt.split()) + sum(len(t.split()) for t in texts)},
            })

    return Handler


@contextlib.contextmanager
def serve(world: dict, *, wrong_rate: float = 0.2, seed: int = 0) -> Iterator[str]:
    """Runs the teacher on 127.0.0.1 (a free port) for the duration; yields its base URL."""
    questions = {q.text: (q.entity, q.attribute) for q in world["train"] + world["test"]}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(_Teacher(questions, world["facts"],
                                                                                 wrong_rate, seed)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
