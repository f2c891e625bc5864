"""Alerts of a running server: the config's rules applied to each request's readings as they stream (one
emojax.steer.monitor.AlertTracker per request), and each alert sent on three ways: into the response stream,
a JSONL audit log, and an optional webhook.

    alerts = Alerts(rules, names, AuditLog(path), WebhookSender(settings), metrics)
    watch = alerts.watch(request_id, endpoint)
    for record in watch.feed(positions_n, readings_nC): ...   # the alerts raised by these tokens, as dicts
    await alerts.close(timeout_s)                             # deliver what is queued, fsync the log

An alert record: time (UTC, ISO 8601), request_id, endpoint, position (the token that raised it; 0 = the first
prompt token), concept, value (its reading there), rule, severity, start (the run's first position), peak.
The webhook runs on its own task with a bounded queue: a slow or failing receiver delays nothing but its own
deliveries, and when the queue is full an alert is dropped from the webhook (still in the stream and the log).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

from emojax.errors import InputError
from emojax.experiment.judge import retry_after
from emojax.serve.config import Webhook
from emojax.steer.monitor import Alert, AlertTracker, Rule

log = logging.getLogger("emojax.serve")


def _finite(value: float) -> float | None:
    return round(float(value), 5) if math.isfinite(value) else None


class AuditLog:
    """Appends one JSON object per line to `path` (parents created); each line is flushed to the OS as it is
    written, and `close` fsyncs. path None or "": a log that keeps nothing."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self._file = None
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open until close()
            except OSError as e:
                raise InputError(f"serve.audit_log {self.path}: cannot open it for appending ({e.strerror})") from None

    def write(self, record: dict) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None


class WebhookSender:
    """POSTs payloads to settings.url from one background task, in order, retrying like the judge client
    (emojax.experiment.judge): connection errors, timeouts, 429 and 5xx are retried with exponential backoff
    (or the Retry-After), other 4xx are not. `on_outcome` hears "delivered", "failed" or "dropped"."""

    def __init__(self, settings: Webhook, on_outcome: Callable[[str], None] | None = None):
        self.settings = settings
        self.on_outcome = on_outcome or (lambda outcome: None)
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.settings.url)

    def send(self, payload: dict) -> None:
        """Queues `payload` (never waits); call from the event loop."""
        if not self.enabled:
            return
        if self._task is None:
            self._queue = asyncio.Queue(maxsize=self.settings.queue_size)
            self._task = asyncio.get_running_loop().create_task(self._run(), name="emojax-webhook")
        try:
            self._queue.put_nowait(payload)
        except asyncio.QueueFull:
            log.warning("alert webhook queue full (%d): alert dropped from the webhook", self.settings.queue_size)
            self.on_outcome("dropped")

    async def close(self, timeout_s: float) -> None:
        """Waits up to timeout_s for queued payloads to be delivered, then stops."""
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), timeout=max(timeout_s, 0.0))
        except TimeoutError:
            log.warning("alert webhook: %d alert(s) undelivered at shutdown", self._queue.qsize())
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None

    async def _run(self) -> None:
        s = self.settings
        async with httpx.AsyncClient(timeout=httpx.Timeout(s.timeout_s)) as client:
            while True:
                payload = await self._queue.get()
                try:
                    error = await self._post(client, payload)
                    if error is not None:
                        log.warning("alert webhook %s: %s", s.url, error)
                    self.on_outcome("failed" if error else "delivered")
                finally:
                    self._queue.task_done()

    async def _post(self, client: httpx.AsyncClient, payload: dict) -> str | None:
        """None once delivered, else why not (after the retries)."""
        s = self.settings
        error = None
        for attempt in range(s.retries + 1):
            wait = s.backoff_s * 2**attempt
            try:
                response = await client.post(s.url, json=payload)
            except httpx.TimeoutException as e:
                error = f"timed out after {s.timeout_s:g} s ({type(e).__name__})"
            except (httpx.NetworkError, httpx.RemoteProtocolError) as e:
                error = f"connection failed ({type(e).__name__}: {e})"
            except httpx.HTTPError as e:  # not transient (a bad URL, a redirect loop): asking again would not help
                return f"request failed ({type(e).__name__}: {e})"
            else:
                if response.is_success:
                    return None
                error = f"HTTP {response.status_code}"
                if response.status_code != 429 and response.status_code < 500:
                    return error
                wait = retry_after(response.headers.get("retry-after"), wait)
            if attempt < s.retries:
                await asyncio.sleep(wait)
        return f"{error} (after {s.retries + 1} attempts)"


class Alerts:
    """The server's rules over concepts `names`, and where the alerts they raise go."""

    def __init__(self, rules: Sequence[Rule], names: Sequence[str], audit: AuditLog, webhook: WebhookSender,
                 on_alert: Callable[[dict], None] | None = None):
        AlertTracker(rules, names)  # refuses a rule on a concept that is not monitored, before serving anything
        self.rules, self.names = tuple(rules), tuple(names)
        self.audit, self.webhook = audit, webhook
        self.on_alert = on_alert or (lambda record: None)

    def watch(self, request_id: str, endpoint: str, rules: Sequence[Rule] | None = None) -> RequestAlerts:
        return RequestAlerts(self, request_id, endpoint, self.rules if rules is None else rules)

    def emit(self, record: dict) -> None:
        self.audit.write(record)
        self.webhook.send(record)
        self.on_alert(record)

    async def close(self, timeout_s: float) -> None:
        await self.webhook.close(timeout_s)
        self.audit.close()


class RequestAlerts:
    """One request's tracker: feed it its tokens in position order; each alert raised is emitted (log, webhook)
    and returned as a record for the response."""

    def __init__(self, alerts: Alerts, request_id: str, endpoint: str, rules: Sequence[Rule]):
        self.alerts, self.request_id, self.endpoint = alerts, request_id, endpoint
        self.tracker = AlertTracker(rules, alerts.names)

    def feed(self, positions: Sequence[int], readings_nC: np.ndarray) -> list[dict]:
        if not self.tracker.rules:
            return []
        positions = np.asarray(positions, np.int64)
        readings_nC = np.asarray(readings_nC, np.float32)
        raised = self.tracker.feed(positions[None], readings_nC[None])
        records = []
        for alert in raised:
            row = int(np.nonzero(positions == alert.trigger)[0][0])
            value = float(readings_nC[row, self.alerts.names.index(alert.concept)])
            record = self.record(alert, value)
            self.alerts.emit(record)
            records.append(record)
        return records

    def record(self, alert: Alert, value: float | None = None) -> dict:
        out = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "request_id": self.request_id,
               "endpoint": self.endpoint, "position": alert.trigger, "concept": alert.concept,
               "value": None if value is None else _finite(value), "rule": alert.rule, "severity": alert.severity,
               "start": alert.start, "peak": _finite(alert.peak)}
        return out

    def summary(self) -> list[dict]:
        """Every alert of the request with its whole run (start, trigger, end, peak), for a complete response."""
        return [{"concept": a.concept, "rule": a.rule, "severity": a.severity, "start": a.start,
                 "trigger": a.trigger, "end": a.end, "peak": _finite(a.peak)} for a in self.tracker.alerts()]
