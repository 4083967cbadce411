"""Judging through any OpenAI-compatible chat-completions endpoint (`POST {base_url}/chat/completions`).

One request per response: a system message with the rubric (and the reference answer when the case has one) and a
user message with the case's images as `data:` URLs and the case and answer as text. Standard library HTTP
(`urllib`), so no client library is needed.

- The API key comes from the caller (the environment variable `OPENAI_API_KEY`); it is sent only in the
  Authorization header and never printed, logged, cached or written.
- Timeouts per request; retries with exponential backoff and jitter (`backoff_s * 2**attempt * U(0.5, 1.5)`,
  at most `max_backoff_s`) on connection errors, timeouts, HTTP 408, 409, 429 and 5xx, waiting `Retry-After`
  (seconds or an HTTP date) when the server sends it. A 200 reply whose body is not a chat completion
  (`bad_body`) or whose text is not the rubric's JSON object (`malformed_scores`) is retried too; after
  `max_retries` retries the response counts as a failure of that kind, never a made-up score. 401/403 (`auth`)
  stops all further requests; other 4xx are failures without retry.
- At most `concurrency` requests in flight (a thread pool of that size, one response per worker at a time).
- `max_requests` > 0: a budget of HTTP requests (retries included); past it, responses fail as `budget`.
- Results are cached in a `JsonlCache` keyed by (judge model, rubric version, messages with images as their
  SHA-256, sampling parameters): successes and `malformed_scores` failures are kept, so rerunning with the same
  workdir sends no request twice; transient failures (auth, budget, connection, timeout, HTTP) are retried then.
"""

from __future__ import annotations

import base64
import dataclasses
import email.utils
import http.client
import json
import mimetypes
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from medee_jax.evaluation.cache import JsonlCache, cache_key
from medee_jax.evaluation.items import LETTERS, file_sha256

from .candidates import Case
from .rubric import RUBRIC_VERSION, MalformedReply, case_text, parse_scores, rubric_text

RETRY_STATUS = {408, 409, 429}
CACHED_FAILURES = {"malformed_scores"}


@dataclasses.dataclass(frozen=True)
class HttpJudgeSettings:
    base_url: str
    model: str
    concurrency: int = 4
    timeout_s: float = 60.0
    max_retries: int = 4
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    max_requests: int = 0  # 0: no budget
    temperature: float = 0.0
    max_tokens: int = 512


class _Retry(Exception):
    def __init__(self, kind: str, detail: str, wait_s: float | None = None):
        super().__init__(detail)
        self.kind, self.detail, self.wait_s = kind, detail, wait_s


class _Fail(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


def reference_text(case: Case) -> str | None:
    if case.answer is None:
        return None
    if case.options and len(case.answer) == 1 and case.answer in LETTERS[: len(case.options)]:
        return f"{case.answer}. {case.options[LETTERS.index(case.answer)]}"
    return case.answer


def judge_messages(case: Case, response: str, *, inline_images: bool) -> list[dict]:
    """The chat messages for one response; images as data URLs (inline_images) or as their SHA-256 (cache key)."""
    parts = []
    for path in case.images:
        if inline_images:
            mime = mimetypes.guess_type(path)[0] or "image/png"
            with open(path, "rb") as f:
                url = f"data:{mime};base64,{base64.b64encode(f.read()).decode('ascii')}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            parts.append({"type": "image", "sha256": file_sha256(path)})
    parts.append({"type": "text", "text": case_text(case.prompt_turns, response)})
    return [{"role": "system", "content": rubric_text(reference_text(case))}, {"role": "user", "content": parts}]


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class OpenAIJudge:
    """`judge(jobs)` -> one result per (case, response): {"scores", "rationale"} or {"failure", "detail"}."""

    def __init__(self, settings: HttpJudgeSettings, api_key: str, cache: JsonlCache, *, seed: int = 0,
                 sleep=time.sleep):
        if not settings.base_url or not settings.model:
            raise ValueError("judge.kind=openai needs judge.base_url and judge.model")
        if not api_key:
            raise ValueError("judge.kind=openai needs the API key in the environment variable OPENAI_API_KEY")
        if settings.concurrency < 1:
            raise ValueError("judge.concurrency must be at least 1")
        self.settings = settings
        self._key = api_key
        self.cache = cache
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._unauthorized = False
        self.stats = Counter()  # requests_sent, cache_hits, retries

    def _params(self) -> dict:
        return {"temperature": self.settings.temperature, "max_tokens": self.settings.max_tokens}

    def key(self, case: Case, response: str) -> str:
        return cache_key({"judge_model": self.settings.model, "rubric": RUBRIC_VERSION, "params": self._params(),
                          "messages": judge_messages(case, response, inline_images=False)})

    def judge(self, jobs: list[tuple[Case, str]]) -> list[dict]:
        keys = [self.key(case, response) for case, response in jobs]
        results: list[dict | None] = [None] * len(jobs)
        todo = []
        for i, key in enumerate(keys):
            if key in self.cache:
                results[i] = self.cache.get(key)
                self.stats["cache_hits"] += 1
            else:
                todo.append(i)
        with ThreadPoolExecutor(max_workers=self.settings.concurrency) as pool:
            for i, result in zip(todo, pool.map(lambda i: self._judge_one(*jobs[i]), todo)):
                results[i] = result
                if "scores" in result or result.get("failure") in CACHED_FAILURES:
                    self.cache.put(keys[i], result)
        return results

    def _judge_one(self, case: Case, response: str) -> dict:
        body = json.dumps({"model": self.settings.model, **self._params(),
                           "messages": judge_messages(case, response, inline_images=True)}).encode("utf-8")
        last = _Retry("connection", "not sent")
        for attempt in range(self.settings.max_retries + 1):
            try:
                return parse_scores(self._post(body))
            except _Fail as fail:
                return {"failure": fail.kind, "detail": fail.detail}
            except MalformedReply as e:
                last = _Retry("malformed_scores", str(e))
            except _Retry as retry:
                last = retry
            if attempt == self.settings.max_retries:
                break
            with self._lock:
                self.stats["retries"] += 1
                jitter = self._rng.uniform(0.5, 1.5)
            delay = min(self.settings.max_backoff_s, self.settings.backoff_s * 2**attempt * jitter)
            if last.wait_s is not None:
                delay = min(self.settings.max_backoff_s, last.wait_s)
            self._sleep(delay)
        return {"failure": last.kind, "detail": last.detail}

    def _post(self, body: bytes) -> str:
        """The reply text of one request; raises _Retry (retryable) or _Fail (final)."""
        with self._lock:
            if self._unauthorized:
                raise _Fail("auth", "the endpoint refused the API key earlier in this run")
            if self.settings.max_requests and self.stats["requests_sent"] >= self.settings.max_requests:
                raise _Fail("budget", f"judge.max_requests={self.settings.max_requests} requests already sent")
            self.stats["requests_sent"] += 1
        request = urllib.request.Request(
            self.settings.base_url.rstrip("/") + "/chat/completions", data=body, method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self._key}"})
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout_s) as reply:
                raw = reply.read()
        except urllib.error.HTTPError as e:
            status = e.code
            e.close()
            if status in (401, 403):
                with self._lock:
                    self._unauthorized = True
                raise _Fail("auth", f"HTTP {status}: the endpoint refused the API key") from None
            if status in RETRY_STATUS or status >= 500:
                raise _Retry(f"http_{status}", f"HTTP {status}", _retry_after(e.headers)) from None
            raise _Fail(f"http_{status}", f"HTTP {status}") from None
        except (TimeoutError, socket.timeout) as e:
            raise _Retry("timeout", f"no reply within {self.settings.timeout_s} s") from e
        except urllib.error.URLError as e:
            kind = "timeout" if isinstance(e.reason, (TimeoutError, socket.timeout)) else "connection"
            raise _Retry(kind, f"{kind}: {e.reason}") from None
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            raise _Retry("connection", f"connection: {type(e).__name__}") from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retry("bad_body", f"the reply is not a chat completion: {raw[:80]!r}") from None
        return content
