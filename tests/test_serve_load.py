"""`emojax serve` under load and shutdown, over a FakeEngine (tests/serve_fakes.py): SIGTERM drains in-flight
requests and refuses new ones, 32 concurrent differently-steered requests never mix their streams, the load-test
script runs, and the serve command refuses a bad setting before loading anything."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from serve_fakes import (NAMES, RULE, FakeEngine, error_of, expected_readings, expected_tokens, live_server,
                         make, sse, tokens_of)

from emojax.serve.config import Limits

REPO = Path(__file__).resolve().parents[1]


def test_sigterm_drains_finishes_in_flight_refuses_new_and_flushes_the_audit_log(tmp_path):
    log = tmp_path / "audit.jsonl"
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "serve_fakes.py"), "--audit", str(log),
                             "--delay", "0.05", "--rule", RULE], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "tests")})
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        url = f"http://127.0.0.1:{int(proc.stdout.readline())}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        first_token, chunks = threading.Event(), []

        def in_flight():
            body = {"prompt": "desperate times", "max_tokens": 40, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        chunks.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
                        if len(chunks) >= 2:
                            first_token.set()

        reader = threading.Thread(target=in_flight)
        reader.start()
        assert first_token.wait(30)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while True:  # the signal is handled within a moment; the listening socket stays open meanwhile
            r = httpx.post(url + "/v1/completions", json={"prompt": "new", "max_tokens": 1}, timeout=5)
            if r.status_code == 503:
                break
            assert time.monotonic() < deadline, r.text
            time.sleep(0.05)
        assert error_of(r)["type"] == "unavailable_error"
        assert httpx.get(url + "/healthz", timeout=5).status_code == 503
        assert not chunks or chunks[-1] != "[DONE]"  # still streaming while new requests are refused
        reader.join(60)
        assert chunks[-1] == "[DONE]" and len(tokens_of(chunks)) == 40
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(60) == 0
        lines = [json.loads(line) for line in log.read_text().splitlines()]
        assert lines and {a["request_id"] for a in lines} == {chunks[0]["id"]}
        assert [a for c in chunks[1:-2] for a in c["emojax"]["alerts"]] == lines
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# ---- streams are never mixed


def _body(i: int) -> dict:
    concept = NAMES[i % len(NAMES)]
    body = {"prompt": f"request {i}: " + "desperate " * (i % 3), "max_tokens": 12 + i % 5, "stream": i % 2 == 0,
            "emojax": {"steer": {concept: round((i - 16) / 40, 3)}, "full": True}}
    if i % 4 == 1:
        body.update(temperature=0.8, seed=1000 + i)
    else:
        body.update(temperature=0)
    return body


async def _ask(client: httpx.AsyncClient, body: dict, stagger_s: float = 0.0):
    await asyncio.sleep(stagger_s)
    if body["stream"]:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            chunks = sse((await r.aread()).decode())
        assert chunks[-1] == "[DONE]"
        tokens = tokens_of(chunks)
        alerts = [a for c in chunks[1:-2] for a in c["emojax"]["alerts"]]
        return chunks[0]["id"], "".join(c["choices"][0]["text"] for c in chunks[1:-2]), tokens, alerts
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    body = r.json()
    return body["id"], body["choices"][0]["text"], body["emojax"]["tokens"], body["emojax"]["alerts"]


def test_32_concurrent_requests_with_different_steering_each_get_their_own_stream():
    engine, app = make(FakeEngine(delay_s=0.004), rules=(RULE,), limits=Limits(max_concurrent=64))
    bodies = [_body(i) for i in range(32)]

    async def concurrently(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(_ask(client, b, stagger_s=0.003 * (i % 8)) for i, b in enumerate(bodies)))

    async def alone(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return [await _ask(client, b) for b in bodies]

    with live_server(app) as url:
        together = asyncio.run(concurrently(url))
        by_id = {r.request_id: r for r in engine.requests}
        single = asyncio.run(alone(url))
    for i, ((rid, text, tokens, alerts), (_, text1, tokens1, alerts1)) in enumerate(zip(together, single)):
        request = by_id[rid]
        assert dict(request.steering) == bodies[i]["emojax"]["steer"]
        assert [t["token"] for t in tokens] == expected_tokens(request), i
        assert text == text1 and [t["token"] for t in tokens] == [t["token"] for t in tokens1], i
        np.testing.assert_allclose([t["readings"] for t in tokens], [t["readings"] for t in tokens1], atol=0)
        for k, t in enumerate(tokens):
            np.testing.assert_allclose(t["readings"], expected_readings(request, k), atol=1e-4)
        strip = lambda alerts: [{k: v for k, v in a.items() if k not in ("time", "request_id")}  # noqa: E731
                                for a in alerts]
        assert strip(alerts) == strip(alerts1), i
    assert any(a for _, _, _, a in together)  # the prompts saying "desperate" raise alerts


# ---- load test


def test_the_load_test_script_against_a_fake_engine():
    spec = importlib.util.spec_from_file_location("load_test_serve", REPO / "scripts" / "load_test_serve.py")
    load_test = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = load_test  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(load_test)
    _, app = make(FakeEngine(delay_s=0.01))
    with live_server(app) as url:
        result = load_test.run_load(url, clients=4, duration_s=1.0, max_tokens=6)
    concurrent, sequential = result["concurrent"], result["sequential"]
    assert concurrent["errors"] == 0 and sequential["errors"] == 0, result
    assert concurrent["requests"] >= 4 and sequential["requests"] >= 1
    assert concurrent["tokens"] == 6 * concurrent["requests"]
    for key in ("requests_per_s", "tokens_per_s", "ttft_p50_s", "ttft_p99_s", "per_token_p50_s", "per_token_p99_s"):
        assert concurrent[key] is not None and math.isfinite(concurrent[key]) and concurrent[key] > 0, key
    assert concurrent["ttft_p50_s"] <= concurrent["ttft_p99_s"]
    assert result["throughput_ratio"] > 1  # four clients over a sleeping engine beat one


def test_the_serve_command_is_registered_and_refuses_a_bad_setting_before_loading_anything(capsys):
    from emojax.cli import main

    assert main(["serve", "--model", "nowhere", "--bank", "nowhere", "limits.max_concurent=1"]) == 2
    assert "serve.limits.max_concurent" in capsys.readouterr().err
