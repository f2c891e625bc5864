"""The HTTP side of `emojax serve` (emojax.serve.app) over a FakeEngine (tests/serve_fakes.py): no model, so what
is checked is the app: OpenAI shapes, the emojax field, steering and limits, errors as JSON naming the field,
metrics, the page and the config. Alerts are in test_serve_alerts.py; draining, concurrency and the load test in
test_serve_load.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from serve_fakes import (NAMES, RULE, TOK, FakeEngine, error_of, expected_readings, expected_tokens, live_server,
                         make, sse, tokens_of, transcript_readings)
from starlette.testclient import TestClient

from emojax.config_loader import load_section
from emojax.errors import ConfigError, InputError
from emojax.serve import ServeConfig, create_app
from emojax.serve.config import Limits
from emojax.serve.protocol import TextStream
from emojax.serve.types import GenerationRequest
from emojax.steer.monitor import AlertTracker, Rule

REPO = Path(__file__).resolve().parents[1]


# ---- shapes


def test_completion_and_chat_responses_carry_openai_shapes_and_per_token_readings():
    engine, app = make()
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": "Once upon", "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        request = engine.requests[-1]
        ids = expected_tokens(request)
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "emojax"
        (choice,) = body["choices"]
        assert choice["text"] == TOK.decode(ids) and choice["finish_reason"] == "length"
        assert body["usage"] == {"prompt_tokens": len(TOK.encode("Once upon")), "completion_tokens": 6,
                                 "total_tokens": len(TOK.encode("Once upon")) + 6}
        e = body["emojax"]
        assert e["concepts"] == list(NAMES) and e["request_id"] == body["id"] == request.request_id
        P = len(request.prompt_ids)
        assert [t["position"] for t in e["tokens"]] == list(range(P, P + 6))
        assert [t["token"] for t in e["tokens"]] == ids
        for i, t in enumerate(e["tokens"]):
            want = expected_readings(request, i)
            assert len(t["top"]) == 5 and "readings" not in t  # serve.top_k, no full vector unless asked
            assert t["top"][0][0] == NAMES[int(np.argmax(want))]
            assert t["top"][0][1] == pytest.approx(float(want.max()), abs=1e-4)

        r = client.post("/v1/chat/completions", json={
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
            "max_completion_tokens": 4, "seed": 7, "emojax": {"top_k": 2, "full": True, "prompt": True}})
        body = r.json()
        request = engine.requests[-1]
        assert request.prompt_ids == tuple(TOK.encode("Be brief.\n\nHuman: Hello\n\nAssistant:"))
        assert request.seed == 7 and request.max_new_tokens == 4
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": TOK.decode(expected_tokens(request))}
        e = body["emojax"]
        assert len(e["prompt"]) == len(request.prompt_ids)
        np.testing.assert_allclose([t["readings"] for t in e["prompt"]], transcript_readings(request.prompt_ids),
                                   atol=1e-4)
        for i, t in enumerate(e["tokens"]):
            assert len(t["top"]) == 2
            np.testing.assert_allclose(t["readings"], expected_readings(request, i), atol=1e-4)


def test_streams_are_server_sent_events_ending_with_done():
    engine, app = make(FakeEngine(delay_s=0.002))
    with live_server(app) as url:
        for chat in (False, True):
            path = "/v1/chat/completions" if chat else "/v1/completions"
            payload = {"messages": [{"role": "user", "content": "Hi"}]} if chat else {"prompt": "Hi"}
            with httpx.stream("POST", url + path, json={**payload, "stream": True, "max_tokens": 5,
                                                        "stream_options": {"include_usage": True},
                                                        "emojax": {"full": True}}, timeout=30) as r:
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/event-stream")
                chunks = sse(r.read().decode())
            request = engine.requests[-1]
            assert chunks[-1] == "[DONE]"
            first, *middle, final, usage, _ = chunks
            assert first["emojax"]["concepts"] == list(NAMES) and first["emojax"]["alerts"] == []
            if chat:
                assert first["object"] == "chat.completion.chunk"
                assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
                text = "".join(c["choices"][0]["delta"].get("content", "") for c in middle)
            else:
                text = "".join(c["choices"][0]["text"] for c in middle)
            assert text == TOK.decode(expected_tokens(request))
            assert [len(c["emojax"]["tokens"]) for c in middle] == [1] * 5
            for i, t in enumerate(tokens_of(middle)):
                np.testing.assert_allclose(t["readings"], expected_readings(request, i), atol=1e-4)
            assert final["choices"][0]["finish_reason"] == "length"
            assert all(c["choices"][0]["finish_reason"] is None for c in [first, *middle])
            assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
            assert len({c["id"] for c in chunks[:-1]}) == 1


def test_a_single_token_stop_ends_the_reply_without_its_text():
    engine, app = make()
    with TestClient(app) as client:
        probe = GenerationRequest("x", tuple(TOK.encode("stop here")), 30, temperature=0.0)
        stop = chr(expected_tokens(probe)[3])
        body = client.post("/v1/completions", json={"prompt": "stop here", "max_tokens": 30, "temperature": 0,
                                                    "stop": stop}).json()
        assert body["choices"][0]["finish_reason"] == "stop"
        ids = [t["token"] for t in body["emojax"]["tokens"]]
        assert chr(ids[-1]) == stop and stop not in body["choices"][0]["text"]
        assert error_of(client.post("/v1/completions", json={"prompt": "x", "stop": "two"}))["param"] == "stop"


def test_the_model_end_ids_end_a_reply():
    """create_app(end_ids=): `emojax serve` passes stop_tokens(lm), so a model whose tokenizer names no end token
    still stops at config.json's eos_token_id. Without end_ids only the tokenizer's eos_token counts (none here)."""
    probe = GenerationRequest("x", tuple(TOK.encode("stop here")), 30, temperature=0.0)
    end = expected_tokens(probe)[3]
    request = {"prompt": "stop here", "max_tokens": 30, "temperature": 0}
    engine = FakeEngine()
    with TestClient(create_app(engine, TOK, ServeConfig(), end_ids=[end])) as client:
        body = client.post("/v1/completions", json=request).json()
        assert body["choices"][0]["finish_reason"] == "stop" and engine.requests[-1].stop_ids == (end,)
        assert [t["token"] for t in body["emojax"]["tokens"]] == expected_tokens(probe)[:4]
    engine, app = make()
    with TestClient(app) as client:
        assert client.post("/v1/completions", json=request).json()["choices"][0]["finish_reason"] == "length"
        assert engine.requests[-1].stop_ids == ()


def test_text_stream_holds_back_an_unfinished_character():
    stream = TextStream(TOK)
    assert [stream.add(b) for b in "aé".encode()] == ["a", "", "é"]
    assert [stream.add(b) for b in "b€".encode()[:3]] == ["b", "", ""] and stream.flush() == "\ufffd"
    assert stream.flush() == "" and stream.add(ord("c")) == "c"


# ---- bad input


@pytest.mark.parametrize("payload,param,fragment", [
    ({"prompt": "x", "emojax": {"steer": {"angrry": 0.1}}}, "emojax.steer.angrry", "not a concept"),
    ({"prompt": "x", "emojax": {"steer": {"calm": 5}}}, "emojax.steer.calm", "out of range"),
    ({"prompt": "x", "emojax": {"steer": {"calm": "lots"}}}, "emojax.steer.calm", "finite number"),
    ({"prompt": "x", "emojax": {"steer": ["calm"]}}, "emojax.steer", "concept: strength"),
    ({"prompt": "x", "emojax": {"top_k": 99}}, "emojax.top_k", "out of range"),
    ({"prompt": "x", "emojax": {"colour": 1}}, "emojax.colour", "not a setting"),
    ({"prompt": "x", "max_tokens": 65}, "max_tokens", "limit of 64"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "out of range"),
    ({"prompt": "x" * 40}, "prompt", "limit is 32"),
    ({"prompt": ["a", "b"]}, "prompt", "one prompt per request"),
    ({"prompt": [1, 2, 999]}, "prompt", "not a token id"),
    ({}, "prompt", "must be text"),
    ({"prompt": "x", "temperature": -1}, "temperature", "out of range"),
    ({"prompt": "x", "top_p": 0}, "top_p", "out of range"),
    ({"prompt": "x", "n": 2}, "n", "n must be 1"),
    ({"prompt": "x", "stream": "yes"}, "stream", "true or false"),
    ({"prompt": "x", "seed": 1.5}, "seed", "whole number"),
])
def test_bad_fields_are_400s_naming_the_field(payload, param, fragment):
    engine, app = make(limits=Limits(max_new_tokens=64, max_prompt_tokens=32))
    with TestClient(app) as client:
        r = client.post("/v1/completions", json=payload)
        assert r.status_code == 400, r.text
        error = error_of(r)
        assert error["param"] == param and fragment in error["message"], error
        assert error["type"] == "invalid_request_error"
        assert not engine.requests  # refused before the engine saw anything
        assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("raw,fragment", [(b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"),
                                          (b"\xff\xfe", "not valid JSON"), (b"", "not valid JSON")])
def test_malformed_json_is_a_400(raw, fragment):
    _, app = make()
    with TestClient(app) as client:
        for path in ("/v1/completions", "/v1/chat/completions", "/v1/monitor"):
            r = client.post(path, content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400 and fragment in error_of(r)["message"]


def test_chat_messages_are_checked_field_by_field():
    _, app = make()
    with TestClient(app) as client:
        for messages, param in (([], "messages"), ([{"role": "robot", "content": "x"}], "messages[0].role"),
                                ([{"role": "user", "content": 3}], "messages[0].content"),
                                ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0]")):
            r = client.post("/v1/chat/completions", json={"messages": messages})
            assert r.status_code == 400 and error_of(r)["param"] == param
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
            {"type": "text", "text": "Hi"}]}], "max_tokens": 2})
        assert r.status_code == 200


def test_engine_input_errors_and_failures_are_json():
    engine, app = make(FakeEngine(max_context=40))
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": "x" * 30, "max_tokens": 20})
        assert r.status_code == 400 and error_of(r)["param"] == "max_tokens"
    engine, app = make(FakeEngine(fail_at=2))
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 5})
        assert r.status_code == 500 and error_of(r)["type"] == "server_error"
        assert "device lost" in error_of(r)["message"]
        r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 5, "stream": True})
        chunks = sse(r.text)
        assert len(tokens_of(chunks)) == 2 and chunks[-2]["error"]["message"] == "device lost"
        assert chunks[-1] == "[DONE]"
        assert client.get("/healthz").status_code == 200  # the app keeps serving
        assert client.get("/nowhere").status_code == 404 and error_of(client.get("/nowhere"))["type"]
        assert client.get("/v1/completions").status_code == 405


def test_a_client_that_goes_away_ends_its_request():
    engine, app = make(FakeEngine(delay_s=0.02))
    state = app.state.serve
    with live_server(app) as url:
        with httpx.stream("POST", url + "/v1/completions", json={"prompt": "x", "max_tokens": 500, "stream": True},
                          timeout=30) as r:
            assert r.headers["x-request-id"] == engine.requests[-1].request_id
            lines = r.iter_lines()
            while not next(lines).startswith("data: "):
                pass
            assert engine.active == 1 and state.in_flight == 1
        deadline = time.monotonic() + 10
        while engine.active or state.in_flight:  # the engine's stream is closed and the slot counted free
            assert time.monotonic() < deadline, (engine.active, state.in_flight)
            time.sleep(0.02)
        assert engine.tokens < 500


# ---- auth and limits


def test_bearer_token(monkeypatch):
    _, app = make(api_key="s3cret")
    with TestClient(app) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=headers)
            assert r.status_code == 401 and error_of(r)["type"] == "authentication_error"
            assert r.headers["www-authenticate"] == "Bearer"
        ok = {"Authorization": "Bearer s3cret"}
        assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=ok).status_code == 200
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers=ok).json()["data"][0]["emojax"]["concepts"] == list(NAMES)
        for open_path in ("/healthz", "/metrics", "/"):  # probes, scrapers and the page itself
            assert client.get(open_path).status_code == 200
    assert "s3cret" not in repr(ServeConfig(api_key="s3cret"))
    monkeypatch.setenv("EMOJAX_API_KEY", "from-env")
    _, app = make()
    with TestClient(app) as client:
        assert client.post("/v1/monitor", json={"text": "x"}).status_code == 401
        r = client.post("/v1/monitor", json={"text": "x"}, headers={"Authorization": "Bearer from-env"})
        assert r.status_code == 200


def test_a_body_over_the_limit_is_a_413():
    _, app = make(limits=Limits(max_body_bytes=300))
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": "x" * 400})
        assert r.status_code == 413 and error_of(r)["param"] == "body" and "max_body_bytes" in error_of(r)["message"]

        def chunked():  # no Content-Length: counted as it arrives
            for _ in range(10):
                yield b" " * 50
        r = client.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_over_max_concurrent_or_a_full_engine_queue_is_a_429():
    engine, app = make(FakeEngine(delay_s=0.05), limits=Limits(max_concurrent=2))

    async def scenario(url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            started = asyncio.Event()
            body = {"prompt": "long", "max_tokens": 20, "stream": True}

            async def hold():
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    async for _ in r.aiter_lines():
                        started.set()
            holders = [asyncio.create_task(hold()) for _ in range(2)]
            await started.wait()
            while engine.active < 2:
                await asyncio.sleep(0.01)
            r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
            assert r.status_code == 429 and error_of(r)["param"] == "max_concurrent"
            assert r.headers["retry-after"] == "1"
            assert (await client.post("/v1/monitor", json={"text": "x"})).status_code == 429
            assert (await client.get("/healthz")).status_code == 200  # probes are never limited
            await asyncio.gather(*holders)
            assert (await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})).status_code == 200
            engine.busy = True
            r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 429 and error_of(r)["param"] == "queue" and "queue full" in error_of(r)["message"]
            engine.busy = False
            metrics = (await client.get("/metrics")).text
            assert 'emojax_requests_total{endpoint="completions",status="429"} 1.0' in metrics
            assert 'emojax_requests_in_flight 0.0' in metrics

    with live_server(app) as url:
        asyncio.run(scenario(url))


# ---- monitor, health, metrics, page


def test_monitor_scores_a_transcript_without_generating():
    engine, app = make(rules=(RULE,))
    with TestClient(app) as client:
        r = client.post("/v1/monitor", json={"text": "so desperate now", "emojax": {"full": True, "top_k": 1}})
        body = r.json()
        ids = TOK.encode("so desperate now")
        assert body["object"] == "emojax.monitor" and body["usage"] == {"prompt_tokens": len(ids)}
        assert [t["token"] for t in body["tokens"]] == ids and not engine.requests
        readings = transcript_readings(ids)
        np.testing.assert_allclose([t["readings"] for t in body["tokens"]], readings, atol=1e-4)
        assert body["alerts"] == []  # the fake transcript readings stay below 0.3
        r = client.post("/v1/monitor", json={"messages": [{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": "hello"}],
                                             "rules": ["calm>0.1:2", "angry<-0.25"]})
        body = r.json()
        ids = TOK.encode("Human: hi\n\nAssistant: hello")
        assert [t["token"] for t in body["tokens"]] == ids
        want = AlertTracker([Rule.parse("calm>0.1:2"), Rule.parse("angry<-0.25")], NAMES)
        want.feed(np.arange(len(ids))[None], transcript_readings(ids)[None])
        assert [(a["concept"], a["start"], a["trigger"], a["end"]) for a in body["alerts"]] == \
            [(a.concept, a.start, a.trigger, a.end) for a in want.alerts()] and body["alerts"]
        assert client.post("/v1/monitor", json={"tokens": [1, 2, 3]}).status_code == 200
        for payload, param in (({"text": "a", "messages": []}, "messages"), ({}, "text"),
                               ({"text": "a", "rules": ["joy>1"]}, "rules[0]"), ({"text": "a", "rules": ["?"]},
                                                                                  "rules[0]"),
                               ({"tokens": [-1]}, "tokens"), ({"text": "a", "emojax": {"steer": {}}}, "emojax.steer")):
            r = client.post("/v1/monitor", json=payload)
            assert r.status_code == 400 and error_of(r)["param"] == param, (payload, r.text)


def test_healthz_reports_the_engine_and_draining():
    engine, app = make()
    with TestClient(app) as client:
        r = client.get("/healthz")
        assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["engine"]["slots"] == 8
        engine.healthy = False
        assert client.get("/healthz").status_code == 503
        engine.healthy = True
        client.portal.call(app.state.serve.drain, 1.0)
        r = client.get("/healthz")
        assert r.status_code == 503 and r.json()["status"] == "shutting down"
        r = client.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and error_of(r)["type"] == "unavailable_error"
        assert engine.shut_down


def _metric(text: str, name: str) -> float:
    """The value of sample `name` (labels included, as exposed) in Prometheus text; 0 when absent."""
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    return 0.0


def test_metrics_move():
    engine, app = make(rules=(RULE,))
    with TestClient(app) as client:
        before = client.get("/metrics").text
        client.post("/v1/completions", json={"prompt": "desperate", "max_tokens": 5})
        client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True})
        client.post("/v1/completions", json={"prompt": "x", "max_tokens": 10_000})
        r = client.get("/metrics")
        assert r.headers["content-type"].startswith("text/plain")
        after = r.text
    for name, delta in (('emojax_requests_total{endpoint="completions",status="200"}', 2),
                        ('emojax_requests_total{endpoint="completions",status="400"}', 1),
                        ("emojax_tokens_generated_total", 8),
                        ('emojax_alerts_total{concept="desperate",severity="critical"}', 1),
                        ("emojax_time_to_first_token_seconds_count", 2),
                        ("emojax_time_per_token_seconds_count", 6),
                        ('emojax_request_duration_seconds_count{endpoint="completions"}', 3)):
        assert _metric(after, name) - _metric(before, name) == delta, name
    assert _metric(after, "emojax_tokens_per_second") > 0
    assert "emojax_engine_queued 0.0" in after and "emojax_engine_slots 8.0" in after


def test_the_page_is_served_and_downloads_nothing():
    _, app = make()
    with TestClient(app) as client:
        r = client.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "emojax monitor" in html and "/v1/chat/completions" in html and "<canvas" in html
    assert "http://" not in html and "https://" not in html and "cdn" not in html.lower()


# ---- config and rules


def test_serve_config_from_a_file_and_overrides(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("serve:\n  port: 9001\n  rules: ['desperate>2:3/8 critical']\n  limits: {max_concurrent: 4}\n"
                    "  engine: {slots: 3}\n")
    config = load_section(ServeConfig, path, ["webhook.retries=1", "strength_range=[-0.5, 0.5]"])
    assert (config.port, config.limits.max_concurrent, config.engine.slots, config.webhook.retries) == (9001, 4, 3, 1)
    assert config.parsed_rules() == (Rule("desperate", 2.0, 3, True, window=8, severity="critical"),)
    for overrides, fragment in ((["limits.max_concurent=3"], "serve.limits.max_concurent"),
                                (["rules=[calm>>1]"], "serve.rules[0]"), (["strength_range=[1, -1]"], "lo < hi"),
                                (["alert_scope=prompt"], "alert_scope"), (["engine.slot=2"], "serve.engine.slot")):
        with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
            load_section(ServeConfig, path, overrides)
    with pytest.raises(InputError, match="not monitored"):
        make(rules=("lonely>1",))
