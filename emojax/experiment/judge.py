"""The external judge: a model behind an OpenAI-compatible chat-completions endpoint scores texts.

    judge = Judge(JudgeSettings(url="http://127.0.0.1:8000/v1", model="judge-model"), cache_dir="out/judge")
    records = judge.score(filled_rubrics, scale=100)      # one JudgeRecord per prompt, in order

One request per prompt, POSTed to {url}/chat/completions: a single user message holding the filled rubric,
temperature 0, `max_tokens`. The score is the first number in choices[0].message.content and must lie in
[0, scale]. Requests run `concurrency` at a time over one HTTP client; connection errors, timeouts, 429 and 5xx
are retried `retries` times, waiting backoff_s * 2**attempt (or the server's Retry-After, capped at
MAX_RETRY_AFTER_S). Any other 4xx is not retried. A request that still fails, a malformed response, or a reply
without a number in range gives a record with `score` None and `error` saying why: the caller records it for that
sample and never counts it as a score. `score` raises only for bad arguments, never for one request's failure.

Cache: the request hash is `digest` (sha256 of canonical JSON) of url, model, messages, temperature and
max_tokens; the API key is not part of it. Each successful reply is written atomically to
<cache_dir>/<hash[:2]>/<hash>.json; failures are not cached, so the next run asks again. A cache file that
cannot be read, or whose reply no longer parses under the current scale, is a miss and is rewritten.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from emojax.digest import digest
from emojax.errors import InputError
from emojax.fileio import write_json
from emojax.progress import progress_bar

TEMPERATURE = 0
MAX_RETRY_AFTER_S = 60.0  # a server asking for longer than this is waited on this long, then retried
EXCERPT_CHARS = 200  # of a response body or reply quoted in an error

# The first number in a reply, sign included so that "-1" reads as out of range rather than as 1.
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


@dataclass(frozen=True)
class JudgeSettings:
    url: str  # base URL, e.g. http://127.0.0.1:8000/v1 ; the client POSTs {url}/chat/completions
    model: str
    api_key_env: str = ""  # name of an env var holding the key (sent as Authorization: Bearer); empty: none
    max_tokens: int = 16
    timeout_s: float = 60.0
    retries: int = 4  # attempts after the first, on connection errors, timeouts, 429 and 5xx (not other 4xx)
    backoff_s: float = 0.5  # exponential: backoff_s * 2**attempt, honouring Retry-After when given
    concurrency: int = 8  # requests in flight (a thread pool over one httpx.Client)


@dataclass(frozen=True)
class JudgeRecord:
    score: float | None  # parsed number, None on failure
    raw: str | None  # the judge's reply text (None when no reply came)
    error: str | None  # why it failed (HTTP status and body excerpt, unparseable reply, ...), None when ok
    request_hash: str
    cached: bool
    attempts: int  # HTTP requests made for it in this call (0 when read from the cache)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class Judge:
    """Scores prompts with the judge model in `settings`, caching successful replies under `cache_dir` (None: no
    cache). Raises InputError for a URL that is not http(s) with a host, an unset `api_key_env` variable, or a
    setting out of range."""

    def __init__(self, settings: JudgeSettings, cache_dir: str | Path | None):
        _check(settings)
        self.settings = settings
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._url = settings.url.rstrip("/")
        self._headers = {}
        if settings.api_key_env:
            key = os.environ.get(settings.api_key_env)
            if not key:
                raise InputError(f"judge api_key_env: the environment variable {settings.api_key_env!r} is not set; "
                                 "export it with the judge's API key, or set api_key_env to '' for a judge "
                                 "that needs none")
            self._headers["Authorization"] = f"Bearer {key}"

    def score(self, prompts: Sequence[str], scale: float, progress: bool = False) -> list[JudgeRecord]:
        """One chat completion per prompt (a single user message with the filled rubric; temperature 0), in order.

        Identical prompts share one request. Each record's score lies in [0, scale], or is None with its error."""
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise InputError(f"judge scale {scale!r}: expected a finite number above 0 (the rubric's top score)")
        bodies: dict[str, dict] = {}
        hashes = []
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise InputError(f"judge prompt {prompt!r}: expected text (the filled rubric)")
            body = {"model": self.settings.model, "messages": [{"role": "user", "content": prompt}],
                    "temperature": TEMPERATURE, "max_tokens": self.settings.max_tokens}
            request_hash = digest({"url": self._url, **body})
            hashes.append(request_hash)
            bodies.setdefault(request_hash, body)

        records: dict[str, JudgeRecord] = {}
        with progress_bar("judge", len(bodies), enabled=progress) as update:
            for request_hash in bodies:
                record = self._read_cache(request_hash, scale)
                if record is not None:
                    records[request_hash] = record
                    update(advance=1)
            todo = [h for h in bodies if h not in records]
            if todo:
                records.update(self._ask_all(todo, bodies, scale, update))
        return [records[h] for h in hashes]

    def _ask_all(self, todo: list[str], bodies: dict[str, dict], scale: float, update) -> dict[str, JudgeRecord]:
        s = self.settings
        limits = httpx.Limits(max_connections=s.concurrency, max_keepalive_connections=s.concurrency)
        records, failed = {}, 0
        with httpx.Client(headers=self._headers, timeout=httpx.Timeout(s.timeout_s), limits=limits) as client:
            pool = ThreadPoolExecutor(max_workers=min(s.concurrency, len(todo)), thread_name_prefix="judge")
            try:
                futures = {pool.submit(self._ask, client, h, bodies[h], scale): h for h in todo}
                for future in as_completed(futures):
                    record = future.result()
                    records[futures[future]] = record
                    failed += record.error is not None
                    update(advance=1, status=f"{failed} failed" if failed else "")
            finally:
                pool.shutdown(cancel_futures=True)
        return records

    def _ask(self, client: httpx.Client, request_hash: str, body: dict, scale: float) -> JudgeRecord:
        raw, error, attempts = self._post(client, body)
        score = None
        if error is None:
            score, error = parse_score(raw, scale)
        if score is not None and self.cache_dir is not None:
            write_json(self._cache_path(request_hash),
                       {"request_hash": request_hash, "request": {"url": self._url, **body}, "raw": raw})
        return JudgeRecord(score=score, raw=raw, error=error, request_hash=request_hash, cached=False,
                           attempts=attempts)

    def _post(self, client: httpx.Client, body: dict) -> tuple[str | None, str | None, int]:
        """The reply text or why there is none, and the number of HTTP requests made."""
        s = self.settings
        for attempt in range(s.retries + 1):
            wait = s.backoff_s * 2**attempt
            try:
                response = client.post(f"{self._url}/chat/completions", json=body)
            except httpx.TimeoutException as e:
                error = f"timed out after {s.timeout_s:g} s ({type(e).__name__})"
            except (httpx.NetworkError, httpx.RemoteProtocolError) as e:
                error = f"connection failed ({type(e).__name__}: {e})"
            except httpx.HTTPError as e:  # not transient (e.g. a redirect loop): asking again would not help
                return None, f"request failed ({type(e).__name__}: {e})", attempt + 1
            else:
                if response.is_success:
                    raw, error = reply_text(response)
                    return raw, error, attempt + 1
                error = f"HTTP {response.status_code}: {_excerpt(response.text)}"
                if response.status_code != 429 and response.status_code < 500:
                    return None, error, attempt + 1
                wait = retry_after(response.headers.get("retry-after"), wait)
            if attempt < s.retries:
                time.sleep(wait)
        return None, error, s.retries + 1

    def _cache_path(self, request_hash: str) -> Path:
        return self.cache_dir / request_hash[:2] / f"{request_hash}.json"

    def _read_cache(self, request_hash: str, scale: float) -> JudgeRecord | None:
        if self.cache_dir is None:
            return None
        try:
            entry = json.loads(self._cache_path(request_hash).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # absent, unreadable or corrupt: a miss, rewritten once answered
            return None
        if not (isinstance(entry, dict) and entry.get("request_hash") == request_hash
                and isinstance(entry.get("raw"), str)):
            return None
        score, _ = parse_score(entry["raw"], scale)
        if score is None:
            return None
        return JudgeRecord(score=score, raw=entry["raw"], error=None, request_hash=request_hash, cached=True,
                           attempts=0)


def parse_score(raw: str, scale: float) -> tuple[float | None, str | None]:
    """The first number in `raw` if it lies in [0, scale], else None and why."""
    match = _NUMBER.search(raw)
    if match is None:
        return None, f"unparseable reply (no number): {_excerpt(raw)!r}"
    value = float(match.group())
    if not 0 <= value <= scale:
        return None, f"out of range: {value:g} is not in [0, {scale:g}] (reply {_excerpt(raw)!r})"
    return value, None


def reply_text(response: httpx.Response) -> tuple[str | None, str | None]:
    """choices[0].message.content of a chat-completions response, or None and why."""
    try:
        payload = response.json()
    except ValueError:
        return None, f"malformed response: not JSON (HTTP {response.status_code}: {_excerpt(response.text)})"
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None, f"malformed response: no choices[0].message.content in {_excerpt(response.text)}"
    if not isinstance(content, str):
        return None, f"malformed response: choices[0].message.content is {type(content).__name__}, not text"
    return content, None


def retry_after(value: str | None, default: float) -> float:
    """Seconds to wait from a Retry-After header (delay-seconds or an HTTP date), capped at MAX_RETRY_AFTER_S;
    `default` when absent or unreadable."""
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return default
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if not math.isfinite(seconds):
        return default
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _excerpt(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "..."


def _check(s: JudgeSettings) -> None:
    parts = urlsplit(s.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"judge url {s.url!r}: expected an http:// or https:// base URL with a host, "
                         "e.g. http://127.0.0.1:8000/v1 (the client POSTs <url>/chat/completions)")
    problems = [f"{name} {value!r}: {expected}" for name, value, ok, expected in [
        ("model", s.model, isinstance(s.model, str) and bool(s.model.strip()), "expected the judge model's name"),
        ("max_tokens", s.max_tokens, isinstance(s.max_tokens, int) and s.max_tokens >= 1, "expected an int >= 1"),
        ("timeout_s", s.timeout_s, s.timeout_s > 0, "expected seconds > 0"),
        ("retries", s.retries, isinstance(s.retries, int) and s.retries >= 0, "expected an int >= 0"),
        ("backoff_s", s.backoff_s, s.backoff_s >= 0, "expected seconds >= 0"),
        ("concurrency", s.concurrency, isinstance(s.concurrency, int) and s.concurrency >= 1,
         "expected an int >= 1"),
    ] if not ok]
    if problems:
        raise InputError("judge settings: " + "; ".join(problems))


__all__ = ["Judge", "JudgeRecord", "JudgeSettings", "parse_score", "reply_text", "retry_after"]
