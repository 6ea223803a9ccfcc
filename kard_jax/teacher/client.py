"""Rationale generation against any OpenAI-compatible chat-completions endpoint.

Every question gets exactly `n` samples. A request asks for all the samples a question still
misses at once (`n=k`); servers that return fewer choices (or reject `n>1`) are topped up with
further requests. Each sample is appended to a persistent JSONL cache as soon as it arrives, keyed
by hash(model, temperature, question id, prompt text, sample index), so an interrupted run resumes
without paying twice. The openai client runs with `max_retries=0`: retries (429, 408/409, 5xx,
timeouts, connection errors, malformed bodies) are ours, with exponential backoff and jitter.

`timeout_s` bounds a whole request: the connection, the wait for the answer and the body (a server
that drips its body is cut off once `timeout_s` has passed; a silent one after at most the time
left). A failure for good (a refusal such as 401/403/404, or `max_attempts` failures in a row)
raises `TeacherError`, an `InputError`: one line naming the HTTP status, and every worker stops
(no new question and no new retry starts). The summary counts retries, timeouts and unusable
responses (2xx bodies without a usable chat completion).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import random
import re
import threading
import time
from typing import Callable, Sequence

import openai
from tqdm.auto import tqdm

from kard_jax.data.example import Example
from kard_jax.errors import InputError

try:  # the HTTP library the installed openai client is built on
    import httpx2 as httpx
except ImportError:  # pragma: no cover - stock openai
    import httpx


class TeacherError(InputError):
    """The teacher endpoint failed for good (non-retryable status, or retries exhausted)."""

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


class MalformedResponse(Exception):
    """A 2xx response whose body is not a usable chat completion."""


class _Stopped(Exception):
    """Another worker failed for good: this one stops without starting anything new."""


class _DeadlineStream(httpx.SyncByteStream):
    def __init__(self, inner, deadline: float, timeout_s: float, request):
        self._inner, self._deadline, self._timeout_s, self._request = inner, deadline, timeout_s, request

    def __iter__(self):
        for chunk in self._inner:
            if time.monotonic() > self._deadline:
                raise httpx.ReadTimeout(f"response not complete within timeout_s={self._timeout_s}",
                                        request=self._request)
            yield chunk

    def close(self) -> None:
        self._inner.close()


class _DeadlineTransport(httpx.HTTPTransport):
    """HTTP transport whose requests (headers and body together) end by `timeout_s`."""

    def __init__(self, timeout_s: float, **kwargs):
        super().__init__(**kwargs)
        self._timeout_s = timeout_s

    def handle_request(self, request):
        deadline = time.monotonic() + self._timeout_s
        timeouts = request.extensions.get("timeout")
        response = super().handle_request(request)
        if isinstance(timeouts, dict):  # body reads: at most the time left
            timeouts["read"] = max(deadline - time.monotonic(), 0.001)
        response.stream = _DeadlineStream(response.stream, deadline, self._timeout_s, request)
        return response


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
            raise InputError("TeacherConfig.model is required (teacher.gin: --gin.TEACHER_MODEL=...)",
                             field="TEACHER_MODEL")
        if self.n < 1 or self.max_samples_per_request < 1 or self.concurrency < 1 or self.max_attempts < 1:
            raise InputError("n, max_samples_per_request, concurrency and max_attempts must be >= 1",
                             field="TeacherConfig")
        if not self.timeout_s > 0:
            raise InputError(f"timeout_s must be > 0, got {self.timeout_s}", field="TeacherConfig.timeout_s")


def cache_key(*, model: str, temperature: float, question_id: str, prompt: str, sample: int) -> str:
    payload = json.dumps([model, temperature, question_id, prompt, sample], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class SampleCache:
    """Append-only JSONL cache of teacher samples: one line {key, id, sample, text, ...} each.

    A line cut short by a killed process is ignored on load (and the file is re-terminated with a
    newline so later appends stay parseable). The file is created by the first `put`, so a run
    that gets no sample writes nothing. Safe to use from several threads.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
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
        self._needs_newline = needs_newline
        self._lock = threading.Lock()
        self._file = None

    def __contains__(self, key: str) -> bool:
        return key in self._texts

    def __len__(self) -> int:
        return len(self._texts)

    def get(self, key: str) -> str | None:
        return self._texts.get(key)

    def put(self, key: str, text: str, **meta) -> None:
        line = json.dumps({"key": key, "text": text, **meta}, ensure_ascii=False)
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
                if self._needs_newline:
                    self._file.write("\n")
            self._file.write(line + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
            self._texts[key] = text

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> "SampleCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclasses.dataclass
class UsageTally:
    """Requests, retries, tokens and samples of one run (thread-safe via `add`)."""

    requests: int = 0
    retries: int = 0
    timeouts: int = 0
    unusable_responses: int = 0
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
                raise InputError("no API key: pass api_key or set OPENAI_API_KEY (any value for local servers)",
                                 field="api_key")
            client = openai.OpenAI(
                api_key=api_key,
                base_url=config.base_url or os.environ.get("OPENAI_BASE_URL") or None,
                timeout=config.timeout_s,
                max_retries=0,
                http_client=openai.DefaultHttpxClient(transport=_DeadlineTransport(config.timeout_s),
                                                      timeout=config.timeout_s),
            )
        self._client = client
        # The HTTP library logs every request at INFO (absl shows INFO on stderr): one line per
        # request would bury our own. Left alone when a user set a level.
        for name in (httpx.__name__, "httpcore", "httpcore2", "openai"):
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._n_supported = config.max_samples_per_request > 1
        self._stop = threading.Event()
        self.usage = UsageTally()

    @property
    def endpoint(self) -> str:
        """The base URL, without any user:password part."""
        return re.sub(r"//[^/@]*@", "//", str(getattr(self._client, "base_url", "") or "the endpoint"))

    def _describe(self, error: Exception) -> str:
        if isinstance(error, openai.APIStatusError):
            body = error.body
            detail = None
            if isinstance(body, dict):
                inner = body.get("error") if isinstance(body.get("error"), dict) else body
                detail = inner.get("message") if isinstance(inner.get("message"), str) else None
            detail = " ".join((detail or "").split())[:200]
            return f"HTTP {error.status_code}" + (f" ({detail})" if detail else "")
        if isinstance(error, openai.APITimeoutError):
            return f"no complete answer within timeout_s={self.config.timeout_s}"
        if isinstance(error, openai.APIConnectionError):
            cause = error.__cause__ or error
            return f"connection failed ({' '.join(str(cause).split())[:200] or type(cause).__name__})"
        if isinstance(error, MalformedResponse):
            return f"unusable response ({error})"
        return f"{type(error).__name__}: {error}"

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
            if self._stop.is_set():
                raise _Stopped()
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
            except openai.APITimeoutError as e:  # (a subclass of APIConnectionError)
                last = e
                self.usage.add(timeouts=1)
            except openai.APIConnectionError as e:
                last = e
            except MalformedResponse as e:
                last = e
                self.usage.add(unusable_responses=1)
            except openai.APIStatusError as e:
                last = e
                if e.status_code == 400 and k > 1:
                    # Server rejects n > 1: ask for one sample per request from now on.
                    self._n_supported = False
                    k = 1
                    attempt -= 1
                    continue
                if not (e.status_code in (408, 409, 429) or e.status_code >= 500):
                    hint = {401: "; check OPENAI_API_KEY / TeacherConfig.api_key",
                            403: "; check the API key's permissions",
                            404: "; check base_url and the model name"}.get(e.status_code, "")
                    raise TeacherError(f"teacher endpoint {self.endpoint} refused the request: "
                                       f"{self._describe(e)}{hint}", status=e.status_code) from None
                try:
                    retry_after = float(e.response.headers.get("retry-after"))
                except (TypeError, ValueError):
                    retry_after = None
            if attempt < cfg.max_attempts:
                self.usage.add(retries=1)
                if self._stop.wait(self._backoff(attempt, retry_after)):
                    raise _Stopped()
        status = last.status_code if isinstance(last, openai.APIStatusError) else None
        raise TeacherError(f"teacher endpoint {self.endpoint} failed for good: giving up after {cfg.max_attempts} "
                           f"attempts (last: {self._describe(last)})", status=status) from None

    def sample_question(self, example: Example, prompt: str, messages: list[dict], cache: SampleCache) -> list[str]:
        """Exactly `n` samples for one question, from the cache first, then from the server."""
        cfg = self.config
        keys = [cache_key(model=cfg.model, temperature=cfg.temperature, question_id=example.id, prompt=prompt,
                          sample=i) for i in range(cfg.n)]
        missing = [i for i, key in enumerate(keys) if key not in cache]
        self.usage.add(cached_samples=cfg.n - len(missing))
        while missing:
            if self._stop.is_set():
                raise _Stopped()
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
        """{question id: n rationales} for every example, `concurrency` questions at a time.

        The first failure for good stops every worker (see the module doc) and is raised."""
        results: dict[str, list[str]] = {}
        self._stop.clear()

        def work(ex: Example) -> list[str]:
            if self._stop.is_set():
                raise _Stopped()
            try:
                return self.sample_question(ex, build_prompt(ex), build_messages(ex), cache)
            except _Stopped:
                raise
            except BaseException:
                self._stop.set()  # before any other worker picks up a new question
                raise

        with concurrent.futures.ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            futures = {pool.submit(work, ex): ex.id for ex in examples}
            try:
                # disable=None: a bar on a terminal only, never in logs (nor in one-line error output)
                bar = tqdm(concurrent.futures.as_completed(futures), total=len(futures),
                           disable=None if progress else True, desc=f"teacher {self.config.model}", unit="q")
                for future in bar:
                    results[futures[future]] = future.result()
                    bar.set_postfix(new=self.usage.new_samples, tok=self.usage.prompt_tokens
                                    + self.usage.completion_tokens, refresh=False)
            except BaseException as error:
                self._stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                if isinstance(error, _Stopped):  # raise the failure that stopped this one instead
                    for future in futures:
                        if future.done() and not future.cancelled():
                            first = future.exception()
                            if first is not None and not isinstance(first, _Stopped):
                                raise first from None
                raise
        return {ex.id: results[ex.id] for ex in examples}

    def summary(self) -> str:
        u, cfg = self.usage, self.config
        return (f"teacher {cfg.model}: {u.new_samples} new samples, {u.cached_samples} from cache, "
                f"{u.requests} requests ({u.retries} retries, {u.timeouts} timeouts, {u.unusable_responses} "
                f"unusable responses), {u.prompt_tokens} prompt + {u.completion_tokens} completion tokens, "
                f"cost {u.cost(cfg):.4f}")
