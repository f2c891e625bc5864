"""The continuous-batching engine behind `emojax serve`: concurrent requests share one compiled decode step in slots.

    engine = Engine(lm, bank, layer, EngineConfig(slots=8, chunk_steps=8))
    async for event in engine.submit(GenerationRequest(...)):   # PromptReadings, then TokenEvents
        ...

Slots. The engine owns one KV cache of [slots, max_context] columns, allocated once; each slot holds one request.
A slot's tokens sit at columns 0, 1, 2, ... of its row (the prompt right-padded to its bucket at prefill), so a
token's column is its position, and each slot writes its next token at its own column: the per-slot step is the
decode loop's model call (Transformer.__call__ with a cache, batch 1) under `jax.vmap` over the slots, which
gives every slot its own `start`. Nothing else differs from emojax.steer.decode.Decoder: the same forward,
interventions (emojax.steer.interventions.from_bank at `layer`, one strength per bank concept), readout
(readout_from_bank) and next-token choice (emojax.steer.sampling.choose, each slot with its own key chain, as
Decoder's batch-1 loop draws it), so a request's tokens and readings are those it gets served alone.

The loop (a background thread): admit queued requests into free slots (one jitted prefill each, compiled once
per prompt bucket: it fills the slot's cache row, its first-token logits and its prompt readings), then run
`chunk_steps` decode steps of every slot in one jitted call (a `lax.while_loop`; slots not generating are
masked; compiled once), then stream the previous chunk's tokens and readings to their clients. The host reads
each chunk back one round late, after the next one is dispatched, so the device does not wait on Python. Per-slot
settings (steering strengths [slots, concepts], sampling, stop ids, max_new_tokens) are arrays: new prompts
within a bucket, strengths, temperatures, seeds or concepts never recompile (`chunk_trace_count`,
`prefill_trace_count`). A slot is free again once its request has ended, or as soon as the chunk in flight is
certain to end it (its remaining tokens fit in the chunk): a request that arrives while others decode joins
within about one chunk.

Events reach each client through its asyncio loop (`call_soon_threadsafe` into a queue per request). A client
that goes away (the iterator closed, its task cancelled) cancels its request and frees its slot. An exception in
the loop ends every request with finished="error" and marks the engine unhealthy.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import dataclasses
import math
import threading

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from emojax.concepts.bank import ConceptBank
from emojax.config_loader import positive, range_violations, ranged
from emojax.errors import InputError
from emojax.models.lm import LanguageModel
from emojax.models.transformer import layer_segments
from emojax.serve.slots import SlotPrograms, Slots
from emojax.serve.types import EngineStats, GenerationRequest, PromptReadings, TokenEvent
from emojax.steer.decode import DecodeConfig
from emojax.steer.interventions import from_bank
from emojax.steer.monitor import monitor_metric, readout_from_bank
from emojax.steer.sampling import Sampling


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


class EngineBusy(RuntimeError):
    """The engine cannot take the request now: its queue is full, it is shutting down, or it has failed."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """slots: requests decoded together. chunk_steps: decode steps per compiled call (a new request joins
    within about one chunk). max_context: prompt + new tokens of one slot (None: the model's position limit, at
    most 1024). prompt_buckets: the lengths a prompt is padded to for its prefill (one compile each; those
    beyond max_context are dropped and max_context added). max_queue: requests waiting for a slot before
    submit refuses (EngineBusy). max_stop_ids: stop ids a request may give (the per-slot stop array's width)."""

    slots: int = positive(8)
    chunk_steps: int = positive(8)
    max_context: int | None = ranged(None, 2)
    prompt_buckets: tuple[int, ...] = positive(DecodeConfig().prompt_buckets)
    max_queue: int = positive(256)
    max_stop_ids: int = positive(8)

    def __post_init__(self):
        problems = range_violations(self)
        if problems:
            raise InputError(f"EngineConfig: {'; '.join(problems)}")
        b = self.prompt_buckets
        if not b or list(b) != sorted(set(b)) or b[0] < 1:
            raise InputError(f"EngineConfig.prompt_buckets must be increasing positive lengths, got {b}")


class _Handle:
    """One request's host side: its client's queue and loop, its slot, and what has been streamed."""

    def __init__(self, request: GenerationRequest, strengths_E: np.ndarray, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.strengths = strengths_E
        self.stops = frozenset(request.stop_ids)
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.emitted = 0  # TokenEvents sent
        self.scheduled = 0  # tokens the dispatched chunks generate at most
        self.cancelled = False  # the client went away (set from any thread)
        self.done = False


class RequestStream:
    """The events of one request, in order (an async iterator). Closing it, or cancelling the task awaiting it,
    cancels the request and frees its slot."""

    def __init__(self, engine: Engine, handle: _Handle):
        self._engine, self._handle, self._ended = engine, handle, False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> PromptReadings | TokenEvent:
        if self._ended:
            raise StopAsyncIteration
        try:
            event = await self._handle.events.get()
        except asyncio.CancelledError:
            self._ended = True
            self._engine._cancel(self._handle)
            raise
        if isinstance(event, TokenEvent) and event.finished is not None:
            self._ended = True
        return event

    async def aclose(self) -> None:
        if not self._ended:
            self._ended = True
            self._engine._cancel(self._handle)

    def __del__(self):
        if not getattr(self, "_ended", True):  # dropped unread: flag only (the loop drops it), no lock here
            self._handle.cancelled = True


class Engine:
    """Serves GenerationRequests in slots (see the module docstring); implements emojax.serve.types.EngineLike.

    lm, bank: the model and a concept bank fitted on it; layer: the residual index readings are taken at and
    steering vectors added at (in the bank's "norm" unit, as `emojax steer`); metric: the readings' unit
    (None: z-scores for a calibrated bank, else the centred cosine)."""

    def __init__(self, lm: LanguageModel, bank: ConceptBank, layer: int, config: EngineConfig = EngineConfig(),
                 metric: str | None = None):
        cfg = lm.config
        if bank.d_model != cfg.d_model:
            raise InputError(f"the bank's vectors have d_model {bank.d_model}; the model has {cfg.d_model}")
        self.lm, self.config, self.layer = lm, config, int(layer)
        self.metric = monitor_metric(bank, self.layer, metric)
        readout, self.names = readout_from_bank(bank, self.layer, self.metric)
        E = len(self.names)
        steer = from_bank(bank, cfg.n_layers, self.names, np.zeros((1, E), np.float32), layers=(self.layer,))
        # On the model's mesh, replicated: the arrays every call takes carry one placement, so none retraces.
        self._replicated = NamedSharding(lm.mesh, PartitionSpec())
        self._consts = jax.device_put((readout, steer), self._replicated)  # arguments of every call, not constants

        limit, key = cfg.position_limit
        self.max_context = config.max_context or min(limit, 1024)
        if self.max_context > limit:
            raise InputError(f"EngineConfig.max_context {self.max_context} passes the model's limit of {limit} "
                             f"positions ({key})")
        self.buckets = tuple(sorted({b for b in config.prompt_buckets if b < self.max_context} | {self.max_context}))
        self._segments = layer_segments(cfg.n_layers, (), unroll=True)  # decoding's layout (see DecodeConfig)

        N, S, Z = config.slots, self.max_context, config.max_stop_ids
        self._strengths = np.zeros((N, E), np.float32)
        self._sampling = Sampling.make(N)
        self._stops = np.full((N, Z), -1, np.int32)
        self._max_new = np.zeros((N,), np.int32)
        self._slots: list[_Handle | None] = [None] * N
        self._state = jax.device_put(Slots.empty(cfg, self._segments, N, S, lm.dtype), self._replicated)
        self._programs = SlotPrograms(lm, self._segments, config.chunk_steps)
        self._prefill = jax.jit(self._programs.prefill, donate_argnums=(1,))
        self._chunk = jax.jit(self._programs.chunk, donate_argnums=(1,))
        self._read = jax.jit(lambda r, x: r(x))

        self._queue: collections.deque[_Handle] = collections.deque()
        self._live: set[_Handle] = set()  # every request not yet ended
        self._pending = None  # (chunk outputs, slot -> handle at dispatch): read back one round late
        self._cv = threading.Condition()  # guards the queue, slots, counters and flags
        self._device = threading.Lock()  # one caller of the device at a time (the loop, score)
        self._closing = self._stopping = False
        self._error: str | None = None
        self._tokens = self._finished = 0
        self._thread = threading.Thread(target=self._run, name="emojax-engine", daemon=True)
        self._thread.start()

    # -- the API (any thread; submit from a running asyncio loop) -----------------------------------------------

    @property
    def chunk_trace_count(self) -> int:
        """Times the chunk step was traced (= compiled): once."""
        return self._programs.chunk_trace_count

    @property
    def prefill_trace_count(self) -> int:
        """Times a prefill was traced: once per prompt bucket."""
        return self._programs.prefill_trace_count

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queues `request`; its events arrive through the returned async iterator. Raises InputError (naming the
        field) for a request the engine cannot serve, EngineBusy when the queue is full or the engine stops."""
        strengths = self._check(request)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("Engine.submit must be called from a running asyncio event loop") from None
        with self._cv:
            if self._error is not None:
                raise EngineBusy(f"the engine failed and serves no more requests ({self._error})")
            if self._closing:
                raise EngineBusy("shutting down")
            if sum(not h.cancelled for h in self._queue) >= self.config.max_queue:
                raise EngineBusy(f"queue full ({self.config.max_queue} requests waiting); retry later")
            handle = _Handle(request, strengths, loop)
            self._queue.append(handle)
            self._live.add(handle)
            self._cv.notify_all()
        return RequestStream(self, handle)

    def score(self, token_ids) -> np.ndarray:
        """Readings [T, C] float32 of a transcript's tokens: a plain forward to `layer` (no steering) and the
        engine's readout; equal to the readings of an unsteered generation of the same tokens. Any thread."""
        ids = np.asarray(list(token_ids) if not isinstance(token_ids, np.ndarray) else token_ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise InputError("token_ids must be a non-empty list of token ids")
        T, V = ids.size, self.lm.config.vocab_size
        if T > self.max_context:
            raise InputError(f"token_ids has {T} tokens; at most {self.max_context} (max_context)")
        if ids.min() < 0 or ids.max() >= V:
            raise InputError(f"token_ids must be in [0, {V}); got {ids.min()}..{ids.max()}")
        P = self.buckets[bisect.bisect_left(self.buckets, T)]
        tokens, mask = np.zeros((1, P), np.int32), np.zeros((1, P), np.int32)
        tokens[0, :T], mask[0, :T] = ids, 1  # right padding: real tokens never see it (causal)
        with self._device, self.lm._precision():
            hidden = self.lm(tokens, mask, capture=(self.layer,), logits=False).hidden[0]
            readings = self._read(self._consts[0], hidden)
        return np.asarray(readings[0, :T], np.float32)

    def stats(self) -> EngineStats:
        with self._cv:
            return EngineStats(queued=sum(not h.cancelled for h in self._queue),
                               active=sum(h is not None and not h.done for h in self._slots),
                               slots=self.config.slots, tokens_generated=self._tokens,
                               requests_finished=self._finished)

    @property
    def healthy(self) -> bool:
        """False once the decode loop has failed (`error` says why)."""
        return self._error is None

    @property
    def error(self) -> str | None:
        return self._error

    async def shutdown(self, timeout_s: float) -> None:
        """Stops admitting (submit raises EngineBusy("shutting down")), lets queued and decoding requests finish
        for up to timeout_s seconds, ends the rest with finished="error", and stops the loop."""
        await asyncio.to_thread(self.close, timeout_s)

    def close(self, timeout_s: float = 0.0) -> None:
        """shutdown() for a caller without an event loop (blocks)."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
            self._cv.wait_for(lambda: not self._busy() or not self._thread.is_alive(), max(timeout_s, 0.0))
            self._stopping = True
            self._cv.notify_all()
        self._thread.join()

    # -- host side of the loop ---------------------------------------------------------------------------------

    def _check(self, r: GenerationRequest) -> np.ndarray:
        """The request's steering strengths [E], after refusing what cannot be served (InputError naming the field)."""
        V, n = self.lm.config.vocab_size, len(r.prompt_ids)
        if n == 0:
            raise InputError("prompt_ids is empty")
        if n > self.max_context - 1:
            raise InputError(f"prompt_ids has {n} tokens; at most {self.max_context - 1} (the context is "
                             f"{self.max_context} tokens, prompt and new tokens together)")
        if not all(_is_int(t) and 0 <= t < V for t in r.prompt_ids):
            raise InputError(f"prompt_ids must be token ids in [0, {V})")
        if not _is_int(r.max_new_tokens) or r.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {r.max_new_tokens!r}")
        if n + r.max_new_tokens > self.max_context:
            raise InputError(f"max_new_tokens {r.max_new_tokens} with a prompt of {n} tokens passes the context of "
                             f"{self.max_context} tokens; at most {self.max_context - n}")
        if not (_is_number(r.temperature) and r.temperature >= 0):
            raise InputError(f"temperature must be >= 0, got {r.temperature!r}")
        if not _is_int(r.top_k) or r.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0, got {r.top_k!r}")
        if not (_is_number(r.top_p) and 0 < r.top_p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {r.top_p!r}")
        if not _is_int(r.seed) or not 0 <= r.seed < 2 ** 32:
            raise InputError(f"seed must be an integer in [0, 2**32), got {r.seed!r}")
        if len(r.stop_ids) > self.config.max_stop_ids:
            raise InputError(f"stop_ids has {len(r.stop_ids)} ids; at most {self.config.max_stop_ids}")
        if not all(_is_int(t) and 0 <= t < V for t in r.stop_ids):
            raise InputError(f"stop_ids must be token ids in [0, {V})")
        strengths = np.zeros((len(self.names),), np.float32)
        for concept, value in r.steering:
            if concept not in self.names:
                raise InputError(f"steering: unknown concept {concept!r} (concepts: {', '.join(self.names)})")
            if not _is_number(value):
                raise InputError(f"steering: the strength of {concept!r} must be a finite number, got {value!r}")
            strengths[self.names.index(concept)] += value
        return strengths

    def _cancel(self, handle: _Handle) -> None:
        with self._cv:
            handle.cancelled = True
            self._cv.notify_all()

    def _busy(self) -> bool:
        return bool(self._queue) or any(h is not None for h in self._slots) or self._pending is not None

    def _deliver(self, handle: _Handle, event) -> None:
        if handle.cancelled:
            return
        try:
            handle.loop.call_soon_threadsafe(handle.events.put_nowait, event)
        except RuntimeError:  # the client's loop is closed: nobody is listening
            handle.cancelled = True

    def _end(self, handle: _Handle, counted: bool = True) -> None:
        handle.done = True
        self._live.discard(handle)
        self._finished += counted
        for s, h in enumerate(self._slots):
            if h is handle:
                self._slots[s] = None

    def _end_all(self, message: str) -> None:
        """Ends every live request with finished="error" (the loop failed or shut down before it finished)."""
        for h in list(self._live):
            if not h.done:
                self._deliver(h, TokenEvent(h.request.request_id, h.emitted, -1,
                                            np.zeros(len(self.names), np.float32), finished="error", error=message))
                self._end(h)
        self._queue.clear()
        self._pending = None

    def _run(self) -> None:
        try:
            with self.lm._precision():
                while self._round():
                    pass
        except Exception as e:  # a bug or a device failure: no client may hang on it
            with self._cv:
                self._error = f"{type(e).__name__}: {e}"
                self._end_all(f"the engine failed: {self._error}")
                self._cv.notify_all()

    def _round(self) -> bool:
        """Admit, dispatch a chunk, stream the previous chunk. False once the engine stops."""
        with self._cv:
            for h in [h for h in self._queue if h.cancelled]:
                self._queue.remove(h)
                self._end(h, counted=False)
            for h in self._slots:
                if h is not None and h.cancelled and not h.done:
                    self._end(h, counted=False)
            if self._stopping:
                self._end_all("the engine shut down before this request finished")
                self._cv.notify_all()
                return False
            if not self._busy():
                self._cv.notify_all()  # drained: what close() waits for
                self._cv.wait()
                return True
            admitted = []
            for s in range(self.config.slots):
                h = self._slots[s]
                if self._queue and (h is None or h.scheduled >= h.request.max_new_tokens):
                    new = self._queue.popleft()
                    self._slots[s] = new
                    admitted.append((s, new))
            snapshot = list(self._slots)
        with self._device:
            prompts = [(h, self._admit(s, h)) for s, h in admitted]
            chunk = self._dispatch(snapshot) if any(h is not None for h in snapshot) else None
        for h, readings in prompts:
            self._deliver(h, PromptReadings(h.request.request_id, np.asarray(readings)[:len(h.request.prompt_ids)]))
        if self._pending is not None:
            self._stream(*self._pending)
        with self._cv:
            self._pending = chunk
            self._cv.notify_all()
        return True

    def _admit(self, s: int, h: _Handle):
        """Prefills request h into slot s and sets the slot's arrays; returns its prompt readings [P, C] (device)."""
        r = h.request
        n = len(r.prompt_ids)
        prompt = np.zeros((self.buckets[bisect.bisect_left(self.buckets, n)],), np.int32)
        prompt[:n] = r.prompt_ids
        self._strengths[s] = h.strengths
        for name, value in (("temperature", r.temperature), ("top_k", r.top_k), ("top_p", r.top_p),
                            ("seed", r.seed)):
            getattr(self._sampling, name)[s] = value
        self._stops[s] = -1
        self._stops[s, :len(r.stop_ids)] = r.stop_ids
        self._max_new[s] = r.max_new_tokens
        self._state, readings = self._prefill(self.lm.params, self._state, np.int32(s), prompt, np.int32(n),
                                              h.strengths.copy(), np.uint32(r.seed), self._consts)
        return readings

    def _dispatch(self, snapshot: list[_Handle | None]):
        """Runs one chunk of every slot (asynchronously); returns (its outputs, the slot -> request map)."""
        active = np.asarray([h is not None for h in snapshot])
        sampling = jax.tree.map(np.copy, self._sampling)  # copies: the host arrays change while the call runs
        self._state, outputs = self._chunk(self.lm.params, self._state, active, self._strengths.copy(), sampling,
                                           self._stops.copy(), self._max_new.copy(), self._consts)
        for h in snapshot:
            if h is not None:
                h.scheduled = min(h.request.max_new_tokens, h.scheduled + self.config.chunk_steps)
        return outputs, snapshot

    def _stream(self, outputs, snapshot: list[_Handle | None]) -> None:
        """Sends a chunk's tokens and readings to their requests; ends (and frees) the finished ones."""
        tokens_NK, readings_NKC, emitted_NK = jax.device_get(outputs)
        with self._cv:
            for s, h in enumerate(snapshot):
                if h is not None and h.cancelled and not h.done:  # e.g. cancelled after its slot was handed on
                    self._end(h, counted=False)
                if h is None or h.done:
                    continue
                for j in np.nonzero(emitted_NK[s])[0]:
                    token = int(tokens_NK[s, j])
                    last = h.emitted + 1 == h.request.max_new_tokens
                    finished = "stop" if token in h.stops else "length" if last else None
                    self._deliver(h, TokenEvent(h.request.request_id, h.emitted, token,
                                                np.asarray(readings_NKC[s, j], np.float32), finished=finished))
                    h.emitted += 1
                    self._tokens += 1
                    if finished:
                        self._end(h)
                        break
