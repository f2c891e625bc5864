"""Prometheus metrics of one server (its own registry, so several apps in one process never share counters).

    emojax_requests_total{endpoint,status}        every answered request, errors included
    emojax_tokens_generated_total                 tokens streamed to clients
    emojax_tokens_per_second                      generated tokens over the last RATE_WINDOW_S seconds
    emojax_engine_queued / _active / _slots       the engine's queue depth, busy slots and slots (engine.stats())
    emojax_requests_in_flight                     requests the app is serving now
    emojax_alerts_total{concept,severity}         alerts raised
    emojax_webhook_deliveries_total{outcome}      delivered, failed (after retries) or dropped (queue full)
    emojax_time_to_first_token_seconds            request arrival to its first generated token
    emojax_time_per_token_seconds                 between consecutive tokens of a request
    emojax_request_duration_seconds{endpoint}     request arrival to its last byte
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from emojax.serve.types import EngineStats

RATE_WINDOW_S = 10.0
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class TokenRate:
    """Tokens per second over the last `window_s` seconds, from per-second counts (cheap at any rate)."""

    def __init__(self, window_s: float = RATE_WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self.clock = clock
        self._seconds: deque[list] = deque()  # [whole second, tokens in it], oldest first

    def add(self, n: int = 1) -> None:
        second = math.floor(self.clock())
        if self._seconds and self._seconds[-1][0] == second:
            self._seconds[-1][1] += n
        else:
            self._seconds.append([second, n])
        self._trim(second)

    def rate(self) -> float:
        self._trim(math.floor(self.clock()))
        return sum(n for _, n in self._seconds) / self.window_s

    def _trim(self, now: int) -> None:
        while self._seconds and self._seconds[0][0] <= now - self.window_s:
            self._seconds.popleft()


class ServeMetrics:
    def __init__(self, stats: Callable[[], EngineStats], in_flight: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("emojax_requests", "Requests answered, by endpoint and HTTP status",
                                ("endpoint", "status"), registry=r)
        self.tokens = Counter("emojax_tokens_generated", "Generated tokens sent to clients", registry=r)
        self.rate = TokenRate()
        Gauge("emojax_tokens_per_second", f"Generated tokens per second over the last {RATE_WINDOW_S:g} s",
              registry=r).set_function(self.rate.rate)
        for name, what in (("queued", "Requests waiting for an engine slot"), ("active", "Engine slots decoding"),
                           ("slots", "Engine slots")):
            Gauge(f"emojax_engine_{name}", what, registry=r).set_function(lambda name=name: getattr(stats(), name))
        Gauge("emojax_requests_in_flight", "Requests the app is serving", registry=r).set_function(in_flight)
        self.alerts = Counter("emojax_alerts", "Alerts raised, by concept and severity", ("concept", "severity"),
                              registry=r)
        self.webhook = Counter("emojax_webhook_deliveries", "Alert webhook deliveries by outcome", ("outcome",),
                               registry=r)
        self.ttft = Histogram("emojax_time_to_first_token_seconds", "Request arrival to its first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.per_token = Histogram("emojax_time_per_token_seconds", "Time between consecutive tokens of a request",
                                   buckets=TOKEN_BUCKETS, registry=r)
        self.duration = Histogram("emojax_request_duration_seconds", "Request arrival to its last byte",
                                  ("endpoint",), buckets=REQUEST_BUCKETS, registry=r)

    def token(self) -> None:
        self.tokens.inc()
        self.rate.add()

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type, for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
