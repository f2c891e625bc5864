"""Alerts of `emojax serve` over a FakeEngine (tests/serve_fakes.py): rules with a window and a severity, and
alerts reaching the stream, the audit log and a webhook that never blocks the stream."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from serve_fakes import (RULE, TOK, expected_readings, make, sse, transcript_readings)
from starlette.testclient import TestClient

from emojax.errors import InputError
from emojax.serve.config import Webhook
from emojax.steer.monitor import AlertTracker, Rule

REPO = Path(__file__).resolve().parents[1]


def test_rules_with_a_window_and_a_severity():
    rule = Rule.parse("desperate > 2 for 3 of 6 tokens critical")
    assert rule == Rule.parse("desperate>2:3/6 critical") == Rule("desperate", 2.0, 3, True, 6, "critical")
    assert Rule.parse(str(rule)).window == 6
    for bad in ("d>1:3/2", "d>1 urgent"):
        with pytest.raises(InputError):
            Rule.parse(bad)
    hits = np.array([3, 0, 3, 0, 0, 3, 3, 0, 0, 0, 0, 0, 0, 0, 3, 3, 3, 0], np.float32)
    readings = hits[None, :, None]
    tracker = AlertTracker([rule], ["desperate"])
    for t in range(len(hits)):  # one token at a time, as a stream feeds it
        tracker.feed(np.array([[t]]), readings[:, t:t + 1])
    assert [(a.start, a.trigger, a.end, a.severity) for a in tracker.alerts()] == \
        [(0, 5, 6, "critical"), (14, 16, 16, "critical")]
    consecutive = AlertTracker([Rule.parse("desperate>2:3/3"), Rule.parse("desperate>2:3")], ["desperate"])
    consecutive.feed(np.arange(len(hits))[None], readings)
    a, b = consecutive.alerts()
    assert (a.start, a.trigger, a.end) == (b.start, b.trigger, b.end) == (14, 16, 16)


# ---- alerts: stream, audit log, webhook


class _Hook:
    """A local webhook receiver: fails the first `fail` posts with 500, each post taking `delay_s`."""

    def __init__(self, fail: int, delay_s: float):
        self.fail, self.delay_s, self.posts = fail, delay_s, []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(hook.delay_s)
                hook.posts.append(body)
                status = 500 if len(hook.posts) <= hook.fail else 204
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("fail", [2, 99])
def test_alerts_go_to_the_stream_the_audit_log_and_a_webhook_that_never_blocks(tmp_path, fail):
    hook = _Hook(fail=fail, delay_s=0.2)
    log = tmp_path / "logs" / "audit.jsonl"
    engine, app = make(rules=(RULE, "calm>5"), audit_log=str(log),
                       webhook=Webhook(url=hook.url, retries=2, backoff_s=0.05, timeout_s=5))
    try:
        with TestClient(app) as client:
            t0 = time.perf_counter()
            r = client.post("/v1/completions", json={"prompt": "so desperate", "max_tokens": 6, "stream": True})
            elapsed = time.perf_counter() - t0
            chunks = sse(r.text)
            request = engine.requests[-1]
            assert elapsed < 0.2  # the receiver takes 0.2 s per post (and fails): the stream never waited for it
            raised = [(i, a) for i, c in enumerate(chunks[1:-2]) for a in c["emojax"]["alerts"]]
            P = len(request.prompt_ids)
            desperate = [float(expected_readings(request, i)[1]) for i in range(6)]  # 1.0 * i + noise
            trigger = next(i for i in range(1, 6) if desperate[i - 1] > 2 and desperate[i] > 2)
            ((index, alert),) = raised
            assert index == trigger and alert["position"] == P + trigger and alert["start"] == P + trigger - 1
            assert alert["concept"] == "desperate" and alert["severity"] == "critical"
            assert alert["value"] == pytest.approx(desperate[trigger], abs=1e-4)
            assert alert["request_id"] == request.request_id and alert["endpoint"] == "completions"
            (summary,) = chunks[-2]["emojax"]["summary"]
            assert (summary["start"], summary["trigger"], summary["end"]) == (P + trigger - 1, P + trigger, P + 5)
            assert len(hook.posts) <= 1  # still being delivered after the response has ended
        # leaving the client ran the lifespan's end: drain, deliver the queue, fsync the log
        lines = [json.loads(line) for line in log.read_text().splitlines()]
        assert lines == [alert]
        assert hook.posts[-1] == alert and len(hook.posts) == 3  # 2 failures then success, or 3 failures
        metrics = app.state.serve.metrics.exposition()[0].decode()
        outcome = "failed" if fail == 99 else "delivered"
        assert f'emojax_webhook_deliveries_total{{outcome="{outcome}"}} 1.0' in metrics
    finally:
        hook.close()


def test_alert_scope_all_reads_the_prompt_too():
    engine, app = make(rules=("calm>0.2",), alert_scope="all")
    with TestClient(app) as client:
        body = client.post("/v1/completions", json={"prompt": "abcdefgh", "max_tokens": 1}).json()
    ids = TOK.encode("abcdefgh")
    calm = transcript_readings(ids)[:, 0]
    assert body["emojax"]["alerts"] and body["emojax"]["alerts"][0]["trigger"] == int(np.argmax(calm > 0.2))


# ---- shutdown
