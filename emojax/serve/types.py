"""What the serving engine and the HTTP app exchange (emojax/serve/engine.py runs requests; app.py speaks HTTP).

    engine = Engine(lm, bank, layer, config)          # starts its own decode thread
    stream = engine.submit(GenerationRequest(...))     # -> an async iterator of events, in order:
        PromptReadings   once, the prompt's per-token readings
        TokenEvent       one per generated token (the last has `finished` set)
    engine.score(token_ids) -> [T, C] readings of a transcript without generating (/v1/monitor)
    engine.stats() -> EngineStats
    await engine.shutdown(timeout_s)                   # stop admitting, finish in-flight requests, then stop

Readings are the monitor's (emojax.steer.monitor.readout_from_bank): z-scores against neutral text for a calibrated
bank, else the centred cosine; `names` gives their concept order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Protocol

import numpy as np


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]  # already templated and tokenised (BOS included when the tokenizer adds one)
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int = 0  # a sampled request is reproducible from its seed, whatever else is being served
    steering: tuple[tuple[str, float], ...] = ()  # (concept, strength in the bank's steering unit)
    stop_ids: tuple[int, ...] = ()  # a stop token ends the request (it is emitted, with finished="stop")


@dataclasses.dataclass(frozen=True)
class PromptReadings:
    request_id: str
    readings: np.ndarray  # [P, C] float32: one row per prompt token


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    request_id: str
    index: int  # 0 = the first generated token
    token_id: int
    readings: np.ndarray  # [C] float32 at this token
    finished: str | None = None  # None while running; "stop" or "length" on the last event; "error" with `error`
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class EngineStats:
    queued: int  # requests waiting for a slot
    active: int  # requests decoding
    slots: int
    tokens_generated: int  # since start
    requests_finished: int


class EngineLike(Protocol):
    names: tuple[str, ...]  # the monitored concepts, in reading order

    def submit(self, request: GenerationRequest) -> AsyncIterator[PromptReadings | TokenEvent]: ...

    def score(self, token_ids: list[int]) -> np.ndarray: ...

    def stats(self) -> EngineStats: ...

    async def shutdown(self, timeout_s: float) -> None: ...
