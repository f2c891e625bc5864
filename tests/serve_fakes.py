"""A FakeEngine (emojax.serve.types.EngineLike without a model), a live uvicorn server and the app over a FakeEngine
with readers of its answers (`make`, `sse`, `tokens_of`, `error_of`) for the serve tests.

FakeEngine's tokens and readings are pure functions of the request (prompt, steering, seed when sampling, token
index), so a request's output is known without serving it, and any mixing of streams shows. Readings: small
values everywhere, the steered concepts raised by 10 x strength, and "desperate" climbing 1.0 per generated token
when the prompt contains the word "desperate" (a rule like desperate>2:2 must fire). `delay_s` sleeps before
each token, so concurrent requests interleave.

    python tests/serve_fakes.py --audit LOG [--delay 0.05] [--rule R ...]   # a server in its own process: prints
                                                                             # its port, drains on SIGTERM
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import threading
import time
import zlib

import numpy as np
import uvicorn

from emojax.errors import InputError
from emojax.serve import ServeConfig, create_app
from emojax.serve.engine import EngineBusy
from emojax.serve.types import EngineStats, GenerationRequest, PromptReadings, TokenEvent
from emojax.tokenizer import ByteTokenizer

NAMES = ("calm", "desperate", "angry", "joyful", "afraid", "proud")
ALPHABET = [ord(c) for c in "abcdefghijklmnopqrstuvwxyz      "]  # byte ids (ByteTokenizer): letters and spaces
TRIGGER = [ord(c) for c in "desperate"]


def _hash(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def transcript_readings(ids) -> np.ndarray:
    """[T, C] readings of tokens (the prompt's, and FakeEngine.score's)."""
    ids = np.asarray(list(ids), np.float32)
    phase = np.arange(len(NAMES), dtype=np.float32)
    return (0.3 * np.sin(ids[:, None] * 0.37 + phase[None, :])).astype(np.float32)


def expected_token(r: GenerationRequest, i: int) -> int:
    return ALPHABET[_hash(r.prompt_ids, r.steering, r.seed if r.temperature > 0 else 0, i) % len(ALPHABET)]


def expected_readings(r: GenerationRequest, i: int) -> np.ndarray:
    h = _hash(r.prompt_ids, r.steering, i)
    out = np.array([((h >> (4 * c)) % 16) / 32.0 - 0.25 for c in range(len(NAMES))], np.float32)
    for concept, strength in r.steering:
        out[NAMES.index(concept)] += 10.0 * strength
    if _contains(r.prompt_ids, TRIGGER):
        out[NAMES.index("desperate")] += 1.0 * i
    return out


def _contains(ids, sub) -> bool:
    ids = list(ids)
    return any(ids[k:k + len(sub)] == sub for k in range(len(ids) - len(sub) + 1))


class FakeEngine:
    names = NAMES

    def __init__(self, delay_s: float = 0.0, max_queue: int = 10_000, max_context: int = 4096,
                 fail_at: int | None = None):
        self.delay_s, self.max_queue, self.max_context, self.fail_at = delay_s, max_queue, max_context, fail_at
        self.requests: list[GenerationRequest] = []
        self.active = self.tokens = self.finished = 0
        self.closing = False
        self.shut_down = False
        self.healthy = True
        self.busy = False  # True: every submit raises EngineBusy (a full queue)

    def submit(self, request: GenerationRequest):
        if self.closing:
            raise EngineBusy("shutting down")
        if self.busy or self.active >= self.max_queue:
            raise EngineBusy("queue full")
        if len(request.prompt_ids) + request.max_new_tokens > self.max_context:
            raise InputError(f"max_new_tokens {request.max_new_tokens} with a prompt of {len(request.prompt_ids)} "
                             f"tokens passes the context of {self.max_context} tokens")
        self.requests.append(request)
        return self._events(request)

    async def _events(self, r: GenerationRequest):
        self.active += 1
        try:
            yield PromptReadings(r.request_id, transcript_readings(r.prompt_ids))
            for i in range(r.max_new_tokens):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                if self.fail_at is not None and i == self.fail_at:
                    yield TokenEvent(r.request_id, i, 0, np.zeros(len(NAMES), np.float32), "error", "device lost")
                    return
                token = expected_token(r, i)
                finished = "stop" if token in r.stop_ids else "length" if i == r.max_new_tokens - 1 else None
                self.tokens += 1
                self.finished += finished is not None
                yield TokenEvent(r.request_id, i, token, expected_readings(r, i), finished)
                if finished:
                    return
        finally:
            self.active -= 1

    def score(self, token_ids) -> np.ndarray:
        if len(token_ids) > self.max_context:
            raise InputError(f"token_ids has {len(token_ids)} tokens; at most {self.max_context}")
        return transcript_readings(token_ids)

    def stats(self) -> EngineStats:
        return EngineStats(queued=0, active=self.active, slots=8, tokens_generated=self.tokens,
                           requests_finished=self.finished)

    async def shutdown(self, timeout_s: float) -> None:
        self.closing = True
        deadline = time.monotonic() + timeout_s
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self.shut_down = True


def expected_tokens(r: GenerationRequest) -> list[int]:
    """What FakeEngine generates for `r`."""
    out = []
    for i in range(r.max_new_tokens):
        out.append(expected_token(r, i))
        if out[-1] in r.stop_ids:
            break
    return out


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def live_server(app):
    """Serves `app` with uvicorn on 127.0.0.1 (a free port) in a thread; yields its base URL."""
    sock = listening_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)


# ---- the app over a FakeEngine, and reading its answers

TOK = ByteTokenizer()
RULE = "desperate>2:2 critical"  # FakeEngine: "desperate" climbs 1 per token after a prompt saying "desperate"


def make(engine=None, **settings):
    engine = engine or FakeEngine()
    return engine, create_app(engine, TOK, ServeConfig(**settings))


def sse(text: str) -> list:
    """The data payloads of an event stream, JSON-decoded ("[DONE]" kept as is)."""
    out = []
    for event in text.split("\n\n"):
        for line in event.splitlines():
            if line.startswith("data: "):
                out.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
    return out


def tokens_of(chunks: list) -> list[dict]:
    return [t for c in chunks if isinstance(c, dict) for t in c.get("emojax", {}).get("tokens", [])]


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param"}, body
    return body["error"]


def main(argv=None) -> None:
    from emojax.serve.app import create_app
    from emojax.serve.config import ServeConfig
    from emojax.serve.server import run_server
    from emojax.tokenizer import ByteTokenizer

    p = argparse.ArgumentParser()
    p.add_argument("--audit", required=True)
    p.add_argument("--delay", type=float, default=0.05)
    p.add_argument("--rule", action="append", default=[])
    p.add_argument("--shutdown-timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    config = ServeConfig(rules=tuple(args.rule), audit_log=args.audit, shutdown_timeout_s=args.shutdown_timeout)
    app = create_app(FakeEngine(delay_s=args.delay), ByteTokenizer(), config)
    sock = listening_socket()
    print(sock.getsockname()[1], flush=True)
    run_server(app, sockets=[sock], log_level="warning")


if __name__ == "__main__":
    main()
