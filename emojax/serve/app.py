"""The HTTP side of `emojax serve`: a Starlette app over an engine (emojax.serve.types.EngineLike).

    app = create_app(engine, tokenizer, ServeConfig(...))
    emojax.serve.server.run_server(app)  # uvicorn; SIGTERM drains it (see "Draining" below)

Endpoints: POST /v1/completions and /v1/chat/completions (OpenAI's shapes; `stream: true` answers Server-Sent
Events `data: {...}` ending with `data: [DONE]`), each response or chunk with an `emojax` field (per-token
readings, alerts; see emojax.serve.protocol); POST /v1/monitor (a transcript's readings and alerts, no
generation); GET /v1/models, /healthz (503 when the engine is unhealthy or the server is draining), /metrics
(Prometheus) and / (the monitoring page).

Every error is JSON {"error": {"message", "type", "param"}}, checked in this order: 503 while draining, 401
without the bearer token (when one is configured), 429 beyond serve.limits.max_concurrent, 413 for a body over
max_body_bytes, 400 for malformed JSON or a bad field (param names it), 429 when the engine's queue is full.

Draining (SIGTERM, or the lifespan's end): new requests get 503 while those in flight finish (up to
serve.shutdown_timeout_s), then the engine shuts down, queued webhooks are delivered and the audit log fsynced.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from emojax.errors import InputError
from emojax.serve import protocol
from emojax.serve.alerts import Alerts, AuditLog, RequestAlerts, WebhookSender
from emojax.serve.config import ServeConfig
from emojax.serve.engine import EngineBusy
from emojax.serve.metrics import ServeMetrics
from emojax.serve.protocol import ApiError, Generation, Options, TextStream, token_entry
from emojax.serve.types import EngineLike, PromptReadings, TokenEvent
from emojax.tokenizer import Tokenizer

log = logging.getLogger("emojax.serve")
PAGE = Path(__file__).parent / "static" / "index.html"
DRAIN_POLL_S = 0.05


class EngineFailure(Exception):
    """The engine ended a request with finished="error"."""


class ServeState:
    """What the endpoints share: the engine, the limits, the alerts, the metrics and the draining flag."""

    def __init__(self, engine: EngineLike, tokenizer: Tokenizer, config: ServeConfig,
                 end_ids: Sequence[int] | None = None):
        self.engine, self.tokenizer, self.config = engine, tokenizer, config
        self.end_ids = None if end_ids is None else tuple(int(t) for t in end_ids)
        self.names = tuple(engine.names)
        self.model_name = config.model_name or "emojax"
        self.token = config.bearer_token()
        self.in_flight = 0
        self.draining = False
        self._drain: asyncio.Task | None = None
        self.metrics = ServeMetrics(engine.stats, lambda: self.in_flight)
        self.alerts = Alerts(config.parsed_rules(), self.names, AuditLog(config.audit_log),
                             WebhookSender(config.webhook, lambda outcome: self.metrics.webhook.labels(outcome).inc()),
                             on_alert=self._count_alert)

    def _count_alert(self, record: dict) -> None:
        self.metrics.alerts.labels(record["concept"], record["severity"]).inc()

    @property
    def healthy(self) -> bool:
        return bool(getattr(self.engine, "healthy", True))

    def check_auth(self, request: Request) -> None:
        if not self.token:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise ApiError(401, "missing or wrong bearer token: send Authorization: Bearer <serve.api_key>",
                           "authentication_error", headers={"WWW-Authenticate": "Bearer"})

    def admit(self) -> None:
        if self.in_flight >= self.config.limits.max_concurrent:
            raise ApiError(429, f"too many requests in flight ({self.in_flight}; serve.limits.max_concurrent="
                                f"{self.config.limits.max_concurrent}); retry shortly", "rate_limit_error",
                           param="max_concurrent", headers={"Retry-After": "1"})
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1

    async def drain(self, timeout_s: float | None = None) -> None:
        """Stops admitting (503), lets requests in flight finish (up to timeout_s, default
        serve.shutdown_timeout_s), shuts the engine down, delivers queued webhooks and closes the audit log.
        Idempotent: a second call waits for the first."""
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._drain_once(self.config.shutdown_timeout_s
                                                                 if timeout_s is None else timeout_s))
        await asyncio.shield(self._drain)

    async def _drain_once(self, timeout_s: float) -> None:
        self.draining = True
        deadline = time.monotonic() + timeout_s
        log.info("draining: %d request(s) in flight, waiting up to %.3g s", self.in_flight, timeout_s)
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        try:
            await self.engine.shutdown(max(deadline - time.monotonic(), 0.0))
        finally:
            await self.alerts.close(max(deadline - time.monotonic(), 0.5))
        log.info("drained (%d request(s) still in flight)", self.in_flight)


# ---- plumbing


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = ApiError(413, f"the request body is over {limit} bytes (serve.limits.max_body_bytes)",
                       param="body")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


class _EventStream(StreamingResponse):
    """Server-Sent Events whose `on_close` runs however the response ends (done, failed, client gone)."""

    def __init__(self, chunks: AsyncIterator[str], on_close: Callable[[], Awaitable[None]], request_id: str):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "x-request-id": request_id})
        self._chunks, self._on_close = chunks, on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(Exception):
                await self._chunks.aclose()
            await self._on_close()


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, allow_nan=False)}\n\n"


async def _close(stream) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


def _endpoint(state: ServeState, name: str, handler, *, guarded: bool = True):
    """A route: draining and auth checks (guarded), ApiError -> JSON, any other exception -> JSON 500 (the server
    keeps serving), and the request counted by endpoint and status."""

    async def endpoint(request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            if guarded:
                if state.draining:
                    raise ApiError(503, "the server is shutting down; send the request to another replica",
                                   "unavailable_error", headers={"Connection": "close", "Retry-After": "1"})
                state.check_auth(request)
            response = await handler(request, t0)
        except ApiError as e:
            response = _error_response(e)
        except Exception as e:
            log.exception("%s: internal error", name)
            response = _error_response(ApiError(500, f"internal error ({type(e).__name__}); see the server log",
                                                "server_error"))
        state.metrics.requests.labels(name, str(response.status_code)).inc()
        if not isinstance(response, _EventStream):
            state.metrics.duration.labels(name).observe(time.perf_counter() - t0)
        return response

    return endpoint


# ---- generation


class _Run:
    """One generation as the endpoints see it: consumes the engine's events, tracks alerts and text, and turns
    each event into its piece of the response."""

    def __init__(self, state: ServeState, gen: Generation, endpoint: str, t0: float):
        self.state, self.gen, self.endpoint, self.t0 = state, gen, endpoint, t0
        self.request = gen.request
        self.options: Options = gen.options
        self.watch: RequestAlerts = state.alerts.watch(self.request.request_id, endpoint)
        self.text = TextStream(state.tokenizer)
        self.n_prompt = len(self.request.prompt_ids)
        self.n_generated = 0
        self.finish: str | None = None
        self._last: float | None = None

    def header(self, event: PromptReadings) -> dict:
        """The request's own emojax fields, with the prompt's tokens when asked and its alerts (alert_scope all)."""
        s, r = self.state, self.request
        out = {"request_id": r.request_id, "concepts": list(s.names), "seed": r.seed, "steer": dict(r.steering)}
        readings = np.asarray(event.readings, np.float32)
        if self.options.prompt:
            texts = [s.tokenizer.decode([t], skip_special_tokens=False) for t in r.prompt_ids]
            out["prompt"] = [token_entry(p, t, text, readings[p], s.names, self.options)
                             for p, (t, text) in enumerate(zip(r.prompt_ids, texts))]
        out["alerts"] = self.watch.feed(range(self.n_prompt), readings) if s.config.alert_scope == "all" else []
        return out

    def token(self, event: TokenEvent) -> tuple[str, dict]:
        """The text the token adds and its emojax entry (with the alerts it raised)."""
        s = self.state
        if event.finished == "error":
            raise EngineFailure(event.error or "the engine failed this request")
        now = time.perf_counter()
        if self._last is None:
            s.metrics.ttft.observe(now - self.t0)
        else:
            s.metrics.per_token.observe(now - self._last)
        self._last = now
        s.metrics.token()
        self.n_generated += 1
        position = self.n_prompt + event.index
        readings = np.asarray(event.readings, np.float32)
        stop = event.finished == "stop" and event.token_id in self.request.stop_ids
        delta = "" if stop else self.text.add(event.token_id)
        if event.finished:
            delta += self.text.flush()
        entry = token_entry(position, event.token_id, s.tokenizer.decode([event.token_id], skip_special_tokens=False),
                            readings, s.names, self.options)
        self.finish = event.finished
        return delta, {"tokens": [entry], "alerts": self.watch.feed([position], readings[None])}

    def usage(self) -> dict:
        return {"prompt_tokens": self.n_prompt, "completion_tokens": self.n_generated,
                "total_tokens": self.n_prompt + self.n_generated}


def _engine_param(message: str, gen: Generation) -> str | None:
    """The request field an engine's InputError is about (its message names the GenerationRequest field)."""
    for field, param in (("max_new_tokens", "max_tokens"), ("prompt", gen.prompt_param), ("steering", "emojax.steer"),
                         ("concept", "emojax.steer"), ("temperature", "temperature"), ("top_p", "top_p"),
                         ("top_k", "top_k"), ("seed", "seed"), ("stop", "stop")):
        if field in message:
            return param
    return None


async def _events(state: ServeState, gen: Generation):
    """The engine's stream of `gen`, with its first event already in hand: submitting and waiting for the first
    event happen before any response starts, so a busy engine or a refused request gets its own status."""
    try:
        stream = state.engine.submit(gen.request)
        first = await anext(stream)
    except EngineBusy as e:
        raise ApiError(429, f"the engine is busy ({e}); retry shortly", "rate_limit_error", param="queue",
                       headers={"Retry-After": "1"}) from None
    except InputError as e:
        raise protocol.bad(_engine_param(str(e), gen), str(e)) from None
    except StopAsyncIteration:
        raise ApiError(500, "the engine ended the request without an event", "server_error") from None
    if not isinstance(first, PromptReadings):
        await _close(stream)
        raise ApiError(500, f"the engine's first event was {type(first).__name__}, not PromptReadings",
                       "server_error")
    return stream, first


def _choice(chat: bool, delta: str | None, finish: str | None, streaming: bool, role: bool = False) -> dict:
    if not chat:
        return {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
    if streaming:
        body = {"role": "assistant", "content": delta or ""} if role else ({"content": delta} if delta else {})
        return {"index": 0, "delta": body, "logprobs": None, "finish_reason": finish}
    return {"index": 0, "message": {"role": "assistant", "content": delta or ""}, "logprobs": None,
            "finish_reason": finish}


def _generation_endpoint(state: ServeState, chat: bool):
    name = "chat" if chat else "completions"
    prefix = "chatcmpl" if chat else "cmpl"
    kind = "chat.completion" if chat else "text_completion"

    async def handler(request: Request, t0: float) -> Response:
        state.admit()
        released = False

        async def release() -> None:
            nonlocal released
            if not released:
                released = True
                state.release()

        try:
            body = protocol.json_object(await _read_body(request, state.config.limits.max_body_bytes))
            request_id = f"{prefix}-{uuid.uuid4().hex}"
            gen = protocol.parse_generation(body, chat, state.tokenizer, state.names, state.config, request_id,
                                             state.end_ids)
            stream, first = await _events(state, gen)
        except BaseException:
            await release()
            raise
        run = _Run(state, gen, name, t0)
        created = int(time.time())
        base = {"id": request_id, "object": kind + (".chunk" if chat and gen.stream else ""), "created": created,
                "model": state.model_name}
        if gen.stream:
            async def close() -> None:
                await _close(stream)
                await release()
                state.metrics.duration.labels(name).observe(time.perf_counter() - t0)

            return _EventStream(_stream(run, stream, first, base, chat), close, request_id)
        try:
            return JSONResponse(await _complete(run, stream, first, base, chat),
                                headers={"x-request-id": request_id})
        finally:
            await _close(stream)
            await release()

    return handler


async def _stream(run: _Run, stream, first: PromptReadings, base: dict, chat: bool) -> AsyncIterator[str]:
    yield _sse({**base, "choices": [_choice(chat, "", None, True, role=True)], "emojax": run.header(first)})
    try:
        async for event in stream:
            delta, emojax = run.token(event)
            yield _sse({**base, "choices": [_choice(chat, delta, None, True)], "emojax": emojax})
            if event.finished:
                break
    except EngineFailure as e:
        yield _sse({"error": {"message": str(e), "type": "server_error", "param": None}})
        yield _sse("[DONE]")
        return
    except Exception as e:  # a bug: this stream ends with an error, the server goes on
        log.exception("%s: internal error while streaming", run.endpoint)
        yield _sse({"error": {"message": f"internal error ({type(e).__name__}); see the server log",
                              "type": "server_error", "param": None}})
        yield _sse("[DONE]")
        return
    finish = run.finish or "length"
    yield _sse({**base, "choices": [_choice(chat, "", finish, True)],
                "emojax": {"alerts": [], "summary": run.watch.summary()}})
    if run.gen.include_usage:
        yield _sse({**base, "choices": [], "usage": run.usage()})
    yield _sse("[DONE]")


async def _complete(run: _Run, stream, first: PromptReadings, base: dict, chat: bool) -> dict:
    emojax = run.header(first)
    tokens, text = [], []
    try:
        async for event in stream:
            delta, piece = run.token(event)
            text.append(delta)
            tokens += piece["tokens"]
            if event.finished:
                break
    except EngineFailure as e:
        raise ApiError(500, str(e), "server_error") from None
    emojax.update(tokens=tokens, alerts=run.watch.summary())
    return {**base, "choices": [_choice(chat, "".join(text), run.finish or "length", False)], "usage": run.usage(),
            "emojax": emojax}


# ---- monitor, models, health, metrics, page


def _monitor_endpoint(state: ServeState):
    async def handler(request: Request, t0: float) -> Response:
        state.admit()
        try:
            body = protocol.json_object(await _read_body(request, state.config.limits.max_body_bytes))
            ids, key = protocol.monitor_ids(body, state.tokenizer, state.config)
            options = protocol.parse_options(body, state.names, state.config, steering=False)
            rules = protocol.parse_rules(body)
            for i, rule in enumerate(rules or ()):
                if rule.concept not in state.names:
                    raise protocol.bad(f"rules[{i}]", f"rules[{i}]: {rule.concept!r} is not a concept of the bank "
                                                      f"(concepts: {', '.join(state.names)})")
            try:
                readings = np.asarray(await asyncio.to_thread(state.engine.score, ids), np.float32)
            except InputError as e:
                raise protocol.bad(key, str(e)) from None
            request_id = f"mon-{uuid.uuid4().hex}"
            watch = state.alerts.watch(request_id, "monitor", rules)
            watch.feed(range(len(ids)), readings)
            texts = [state.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
            return JSONResponse({
                "id": request_id, "object": "emojax.monitor", "created": int(time.time()), "model": state.model_name,
                "concepts": list(state.names),
                "tokens": [token_entry(p, t, text, readings[p], state.names, options)
                           for p, (t, text) in enumerate(zip(ids, texts))],
                "alerts": watch.summary(), "usage": {"prompt_tokens": len(ids)}})
        finally:
            state.release()

    return handler


def _models_endpoint(state: ServeState):
    async def handler(request: Request, t0: float) -> Response:
        c = state.config
        return JSONResponse({"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": 0, "owned_by": "emojax",
            "emojax": {"concepts": list(state.names), "strength_range": list(c.strength_range), "top_k": c.top_k,
                       "rules": [str(r) for r in state.alerts.rules], "max_tokens": c.limits.max_new_tokens,
                       "default_max_tokens": min(c.sampling.max_tokens, c.limits.max_new_tokens)}}]})

    return handler


def _health_endpoint(state: ServeState):
    async def handler(request: Request, t0: float) -> Response:
        status = "shutting down" if state.draining else "ok" if state.healthy else "unhealthy"
        try:
            stats = dataclasses.asdict(state.engine.stats()) if not state.draining else {}
        except Exception as e:  # a broken engine is exactly what this endpoint reports
            stats, status = {"error": str(e)}, "unhealthy"
        return JSONResponse({"status": status, "engine": stats}, status_code=200 if status == "ok" else 503)

    return handler


def _metrics_endpoint(state: ServeState):
    async def handler(request: Request, t0: float) -> Response:
        data, content_type = state.metrics.exposition()
        return Response(data, media_type=content_type)

    return handler


def _page_endpoint(state: ServeState):
    async def handler(request: Request, t0: float) -> Response:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    return handler


async def _http_error(request: Request, exc: HTTPException) -> Response:
    error = ApiError(exc.status_code, exc.detail or "error", "not_found_error" if exc.status_code == 404
                     else "invalid_request_error")
    return _error_response(error)


def create_app(engine: EngineLike, tokenizer: Tokenizer, config: ServeConfig,
               end_ids: Sequence[int] | None = None) -> Starlette:
    """The server's ASGI app over `engine`; `app.state.serve` is its ServeState (drain() it to stop cleanly).
    end_ids: the ids a generation ends at (`emojax.models.lm.stop_tokens(lm)`: the tokenizer's eos_token, else
    config.json's eos_token_id); None: the tokenizer's eos_token only.
    Raises ConfigError / InputError for rules on concepts the engine does not monitor or an unwritable audit log."""
    state = ServeState(engine, tokenizer, config, end_ids)
    routes = [
        Route("/", _endpoint(state, "page", _page_endpoint(state), guarded=False), methods=["GET"]),
        Route("/healthz", _endpoint(state, "healthz", _health_endpoint(state), guarded=False), methods=["GET"]),
        Route("/metrics", _endpoint(state, "metrics", _metrics_endpoint(state), guarded=False), methods=["GET"]),
        Route("/v1/models", _endpoint(state, "models", _models_endpoint(state)), methods=["GET"]),
        Route("/v1/completions", _endpoint(state, "completions", _generation_endpoint(state, chat=False)),
              methods=["POST"]),
        Route("/v1/chat/completions", _endpoint(state, "chat", _generation_endpoint(state, chat=True)),
              methods=["POST"]),
        Route("/v1/monitor", _endpoint(state, "monitor", _monitor_endpoint(state)), methods=["POST"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await state.drain()

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error})
    app.state.serve = state
    return app
