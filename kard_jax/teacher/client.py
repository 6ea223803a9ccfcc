"""Rationale generation against any OpenAI-compatible chat-completions endpoint.

Every question gets exactly `n` samples. A request asks for all the samples a question still
misses at once (`n=k`); servers that return fewer choices (or reject `n>1`) are topped up with
further requests. Each sample is appended to a persistent JSONL cache as soon as it arrives, keyed
by hash(model, temperature, question id, prompt text, sample index), so an interrupted run resumes
without paying twice. The openai client runs with `max_retries=0`: retries (429, 408/409, 5xx,
timeouts, connection errors, malformed bodies) are ours, with exponential backoff and jitter.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import pathlib
import random
import threading
import time
from typing import Callable, Sequence

import openai
from tqdm.auto import tqdm

from kard_jax.data.example import Example


class TeacherError(RuntimeError):
    """The teacher endpoint failed for good (non-retryable status, or retries exhausted)."""


class MalformedResponse(Exception):
    """A 2xx response whose body is not a usable chat completion."""


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """Endpoint, sampling and retry settings. `api_key`/`base_url` default to OPENAI_API_KEY /
    OPENAI_BASE_URL. `max_samples_per_request=1` sends one request per sample (servers without
    `n`); prices are per 1,000 tokens, for the cost tally only."""

    model: str
    base_url: str | None = None
    api_key: str | None = None
    n: int = 10
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 512
    max_samples_per_request: int = 128
    concurrency: int = 8
    timeout_s: float = 60.0
    max_attempts: int = 8
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    price_prompt_per_1k: float = 0.0
    price_completion_per_1k: float = 0.0

    def __post_init__(self):
        if not self.model:
            raise ValueError("TeacherConfig.model is required (teacher.gin: --gin.TEACHER_MODEL=...)")
        if self.n < 1 or self.max_samples_per_request < 1 or self.concurrency < 1 or self.max_attempts < 1:
            raise ValueError("n, max_samples_per_request, concurrency and max_attempts must be >= 1")


def cache_key(*, model: str, temperature: float, question_id: str, prompt: str, sample: int) -> str:
    payload = json.dumps([model, temperature, question_id, prompt, sample], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class SampleCache:
    """Append-only JSONL cache of teacher samples: one line {key, id, sample, text, ...} each.

    A line cut short by a killed process is ignored on load (and the file is re-terminated with a
    newline so later appends stay parseable). Safe to use from several threads.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._texts: dict[str, str] = {}
        self.skipped_lines = 0
        if self.path.exists():
            with open(self.path, "rb") as f:
                data = f.read()
            for raw in data.splitlines():
                try:
                    rec = json.loads(raw)
                    self._texts[rec["key"]] = rec["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.skipped_lines += 1
            needs_newline = bool(data) and not data.endswith(b"\n")
        else:
            needs_newline = False
        self._lock = threading.Lock()
        self._file = open(self.path, "a", encoding="utf-8")
        if needs_newline:
            self._file.write("\n")
            self._file.flush()

    def __contains__(self, key: str) -> bool:
        return key in self._texts

    def __len__(self) -> int:
        return len(self._texts)

    def get(self, key: str) -> str | None:
        return self._texts.get(key)

    def put(self, key: str, text: str, **meta) -> None:
        line = json.dumps({"key": key, "text": text, **meta}, ensure_ascii=False)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
            self._texts[key] = text

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "SampleCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclasses.dataclass
class UsageTally:
    """Requests, retries, tokens and samples of one run (thread-safe via `add`)."""

    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    new_samples: int = 0
    cached_samples: int = 0
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def cost(self, config: TeacherConfig) -> float:
        return (self.prompt_tokens * config.price_prompt_per_1k
                + self.completion_tokens * config.price_completion_per_1k) / 1000.0

    def as_dict(self, config: TeacherConfig) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        out["cost"] = round(self.cost(config), 6)
        return out


def _parse_completion(text: str) -> tuple[list[tuple[str, str | None]], dict]:
    """(choices [(content, finish_reason)] in index order, usage) from a response body."""
    try:
        body = json.loads(text)
    except (json.JSONDecodeError, TypeError) as e:
        raise MalformedResponse(f"body is not JSON: {e}") from None
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        raise MalformedResponse("body has no 'choices' list")
    choices = []
    for position, choice in enumerate(body["choices"]):
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str):
            continue  # refusals/tool calls/garbage: not a sample; topped up later
        index = choice.get("index", position)
        choices.append((index if isinstance(index, int) else position, content, choice.get("finish_reason")))
    if not choices:
        raise MalformedResponse("no choice carries message.content")
    choices.sort(key=lambda c: c[0])
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    return [(c[1], c[2]) for c in choices], usage


class TeacherClient:
    """Samples rationales for Examples; see the module docstring for the guarantees."""

    def __init__(self, config: TeacherConfig, *, client: openai.OpenAI | None = None, seed: int | None = None):
        self.config = config
        if client is None:
            api_key = config.api_key or os.environ.get("OPENAI_API_KEY")
            if not api_key:
                raise ValueError("no API key: pass api_key or set OPENAI_API_KEY (any value for local servers)")
            client = openai.OpenAI(
                api_key=api_key,
                base_url=config.base_url or os.environ.get("OPENAI_BASE_URL") or None,
                timeout=config.timeout_s,
                max_retries=0,
            )
        self._client = client
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._n_supported = config.max_samples_per_request > 1
        self.usage = UsageTally()

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cfg = self.config
        delay = min(cfg.backoff_max_s, cfg.backoff_initial_s * 2 ** (attempt - 1))
        with self._rng_lock:
            delay *= self._rng.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, min(retry_after, cfg.backoff_max_s))
        return delay

    def request(self, messages: list[dict], k: int) -> list[tuple[str, str | None]]:
        """One chat completion asking for `k` samples, with retries; returns the choices it got
        (possibly fewer than k)."""
        cfg = self.config
        last: Exception | None = None
        attempt = 0
        while attempt < cfg.max_attempts:
            attempt += 1
            retry_after = None
            kwargs = dict(model=cfg.model, messages=messages, temperature=cfg.temperature, top_p=cfg.top_p,
                          max_tokens=cfg.max_tokens)
            if k > 1:
                kwargs["n"] = k
            try:
                self.usage.add(requests=1)
                raw = self._client.chat.completions.with_raw_response.create(**kwargs)
                choices, usage = _parse_completion(raw.text)
                self.usage.add(prompt_tokens=int(usage.get("prompt_tokens") or 0),
                               completion_tokens=int(usage.get("completion_tokens") or 0))
                return choices
            except (openai.APITimeoutError, openai.APIConnectionError, MalformedResponse) as e:
                last = e
            except openai.APIStatusError as e:
                last = e
                if e.status_code == 400 and k > 1:
                    # Server rejects n > 1: ask for one sample per request from now on.
                    self._n_supported = False
                    k = 1
                    attempt -= 1
                    continue
                if not (e.status_code in (408, 409, 429) or e.status_code >= 500):
                    raise TeacherError(f"teacher request failed with HTTP {e.status_code}: {e}") from e
                try:
                    retry_after = float(e.response.headers.get("retry-after"))
                except (TypeError, ValueError):
                    retry_after = None
            if attempt < cfg.max_attempts:
                self.usage.add(retries=1)
                time.sleep(self._backoff(attempt, retry_after))
        raise TeacherError(f"teacher request failed after {cfg.max_attempts} attempts: {last!r}") from last

    def sample_question(self, example: Example, prompt: str, messages: list[dict], cache: SampleCache) -> list[str]:
        """Exactly `n` samples for one question, from the cache first, then from the server."""
        cfg = self.config
        keys = [cache_key(model=cfg.model, temperature=cfg.temperature, question_id=example.id, prompt=prompt,
                          sample=i) for i in range(cfg.n)]
        missing = [i for i, key in enumerate(keys) if key not in cache]
        self.usage.add(cached_samples=cfg.n - len(missing))
        while missing:
            k = min(len(missing), cfg.max_samples_per_request) if self._n_supported else 1
            choices = self.request(messages, k)[:len(missing)]
            for (text, finish_reason), index in zip(choices, missing):
                cache.put(keys[index], text, id=example.id, sample=index, model=cfg.model,
                          finish_reason=finish_reason)
            self.usage.add(new_samples=len(choices))
            missing = missing[len(choices):]
        return [cache.get(key) for key in keys]

    def generate(
        self,
        examples: Sequence[Example],
        cache: SampleCache,
        *,
        build_prompt: Callable[[Example], str],
        build_messages: Callable[[Example], list[dict]],
        progress: bool = True,
    ) -> dict[str, list[str]]:
        """{question id: n rationales} for every example, `concurrency` questions at a time."""
        results: dict[str, list[str]] = {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            futures = {
                pool.submit(self.sample_question, ex, build_prompt(ex), build_messages(ex), cache): ex.id
                for ex in examples
            }
            try:
                bar = tqdm(concurrent.futures.as_completed(futures), total=len(futures), disable=not progress,
                           desc=f"teacher {self.config.model}", unit="q")
                for future in bar:
                    results[futures[future]] = future.result()
                    bar.set_postfix(new=self.usage.new_samples, tok=self.usage.prompt_tokens
                                    + self.usage.completion_tokens, refresh=False)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        return {ex.id: results[ex.id] for ex in examples}

    def summary(self) -> str:
        u, cfg = self.usage, self.config
        return (f"teacher {cfg.model}: {u.new_samples} new samples, {u.cached_samples} from cache, "
                f"{u.requests} requests ({u.retries} retries), {u.prompt_tokens} prompt + "
                f"{u.completion_tokens} completion tokens, cost {u.cost(cfg):.4f}")
