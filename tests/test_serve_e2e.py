"""`emojax serve` end to end: the HTTP app over the real Engine on the tiny random model and a random bank, served by
a live uvicorn on 127.0.0.1. 32 concurrent chat requests (streaming or not, steered, sampled, staggered) each get
exactly what the same request gets served alone; the readings a response carries are the model's (the engine's
own score() of prompt + reply); and the `emojax serve` command serves a saved checkpoint and bank, streams a reply
to [DONE] and exits 0 on SIGTERM."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest
from dump_helpers import REPO, child_env
from serve_fakes import live_server, sse, tokens_of
from test_serve_engine import LAYER, NAMES, slowed, tiny_model_and_bank

from emojax.serve import ServeConfig, create_app
from emojax.serve.config import Limits
from emojax.serve.engine import Engine, EngineConfig
from emojax.tokenizer import ByteTokenizer, chat_prompt

TOK = ByteTokenizer()
# Chat prompts here are 42..62 byte tokens: both buckets compile once; replies of up to 10 tokens fit the context.
ENGINE = EngineConfig(slots=4, chunk_steps=4, max_context=80, prompt_buckets=(48, 64), max_queue=64)
TOPICS = ("the sea", "a storm at night", "my old friend", "the last train home", "bread", "a lost key")
ATOL = 2e-4  # responses round readings to 4 decimals


@pytest.fixture(scope="module")
def model():
    return tiny_model_and_bank()


@pytest.fixture(scope="module")
def server(model):
    """(engine, base URL): the app over a real Engine, live on 127.0.0.1; leaving it drains the engine."""
    config = ServeConfig(model_name="tiny", engine=ENGINE, limits=Limits(max_concurrent=64, max_new_tokens=16))
    engine = Engine(*model, LAYER, config.engine)
    with live_server(create_app(engine, TOK, config)) as url:
        yield engine, url
    assert not engine._thread.is_alive()  # the lifespan's drain stopped the engine


def chat_body(i: int) -> dict:
    """Request i of the workload: a system message on some, steering by random concepts and strengths, greedy
    (even i) or sampled (odd i: temperature, top_p, a few with top_k), streaming for i % 4 in (0, 1), a
    the prompt's readings asked for on every third."""
    rng = np.random.default_rng(1000 + i)
    messages = [{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."}]
    if i % 3 == 1:
        messages.insert(0, {"role": "system", "content": "Be brief."})
    body = {"messages": messages, "max_tokens": int(rng.integers(3, 11)), "stream": i % 4 < 2,
            "seed": int(rng.integers(0, 2**31 - 1)),
            "emojax": {"steer": {c: round(float(rng.uniform(-0.5, 0.5)), 3) for c in NAMES if rng.random() < 0.6},
                       "full": True, "prompt": i % 3 == 0}}
    if i % 2:
        body.update(temperature=float(rng.choice([0.7, 1.0, 1.3])), top_p=float(rng.choice([1.0, 0.9])))
        if i % 7 == 1:
            body["top_k"] = 20
    else:
        body["temperature"] = 0
    return body


def with_stops(url: str, bodies: list[dict]) -> list[dict]:
    """Every fifth body with a `stop` that ends it: the first ASCII token it generates without one (the random
    model's bytes are arbitrary; a stop must be a single token the tokenizer can spell)."""
    out = []
    for i, body in enumerate(bodies):
        if i % 5 == 0:
            ascii_ids = [t for t in asyncio.run(_ask_once(url, body))["tokens"] if t < 128]
            if ascii_ids:
                body = {**body, "stop": chr(ascii_ids[0])}
        out.append(body)
    return out


async def ask(client: httpx.AsyncClient, path: str, body: dict) -> dict:
    """One generation through HTTP, streaming or not, as {id, text, tokens, positions, readings [n, C], finish,
    prompt (ids), prompt_readings [P, C] (when asked), seed, steer}."""
    if body.get("stream"):
        async with client.stream("POST", path, json=body) as r:
            assert r.status_code == 200, (await r.aread()).decode()
            chunks = sse((await r.aread()).decode())
        assert chunks[-1] == "[DONE]", chunks[-3:]
        header, entries = chunks[0]["emojax"], tokens_of(chunks)
        choices = [c["choices"][0] for c in chunks[:-1] if c.get("choices")]
        text = "".join(c["delta"].get("content", "") if "delta" in c else c["text"] for c in choices)
        finish, rid = choices[-1]["finish_reason"], chunks[0]["id"]
        assert all(c["finish_reason"] is None for c in choices[:-1])
    else:
        r = await client.post(path, json=body)
        assert r.status_code == 200, r.text
        data = r.json()
        header, entries = data["emojax"], data["emojax"]["tokens"]
        choice = data["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        finish, rid = choice["finish_reason"], data["id"]
    assert header["request_id"] == rid and header["concepts"] == list(NAMES)
    prompt = header.get("prompt", [])
    return dict(id=rid, text=text, finish=finish, seed=header["seed"], steer=header["steer"],
                tokens=[t["token"] for t in entries], positions=[t["position"] for t in entries],
                readings=np.asarray([t["readings"] for t in entries], np.float64).reshape(-1, len(NAMES)),
                prompt=[t["token"] for t in prompt],
                prompt_readings=np.asarray([t["readings"] for t in prompt], np.float64).reshape(-1, len(NAMES)))


def test_32_concurrent_requests_each_get_what_they_get_served_alone(server, monkeypatch):
    engine, url = server
    # Chunks of at least 5 ms (the same values): the tiny model decodes a request before the next one arrives.
    monkeypatch.setattr(engine, "_chunk", slowed(engine._chunk, 0.005))
    bodies = with_stops(url, [chat_body(i) for i in range(32)])
    active_at_send = []

    async def concurrently():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            async def staggered(i, body):
                await asyncio.sleep(0.005 * i)  # later ones arrive while earlier ones decode
                active_at_send.append(engine.stats().active)
                return await ask(client, "/v1/chat/completions", body)

            return await asyncio.gather(*(staggered(i, b) for i, b in enumerate(bodies)))

    async def alone():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return [await ask(client, "/v1/chat/completions", b) for b in bodies]

    together = asyncio.run(concurrently())
    single = asyncio.run(alone())
    # Many arrived while others decoded, and some waited for a slot another request freed.
    assert sum(a > 0 for a in active_at_send) >= 16 and max(active_at_send) == ENGINE.slots, active_at_send
    finishes = set()
    for i, (body, t, s) in enumerate(zip(bodies, together, single)):
        assert t["seed"] == s["seed"] == body["seed"] and t["steer"] == s["steer"] == body["emojax"]["steer"], i
        assert t["tokens"] == s["tokens"] and t["text"] == s["text"] and t["finish"] == s["finish"], i
        assert t["text"] == TOK.decode(t["tokens"][:-1] if t["finish"] == "stop" else t["tokens"]), i
        n_prompt = len(TOK.encode_prompt(chat_prompt(body["messages"], TOK)))
        assert t["positions"] == list(range(n_prompt, n_prompt + len(t["tokens"]))), i
        assert len(t["tokens"]) == body["max_tokens"] or t["finish"] == "stop", i
        np.testing.assert_allclose(t["readings"], s["readings"], atol=ATOL, err_msg=f"request {i}")
        if body["emojax"]["prompt"]:
            assert t["prompt"] == s["prompt"] and len(t["prompt"]) == n_prompt, i
            np.testing.assert_allclose(t["prompt_readings"], s["prompt_readings"], atol=ATOL, err_msg=f"request {i}")
        finishes.add(t["finish"])
    assert finishes == {"stop", "length"} and sum("stop" in b for b in bodies) >= 3, finishes
    assert len({tuple(t["tokens"]) for t in together}) >= 24  # prompts, steering and sampling made them differ
    assert len({t["id"] for t in together + single}) == 64
    # Steering moves the readings where it is added: a steered request's readings are not its unsteered ones.
    i = next(k for k, b in enumerate(bodies) if b["emojax"]["steer"] and not b.get("stop"))
    unsteered = asyncio.run(_ask_once(url, {**bodies[i], "emojax": {"full": True}}))
    assert not np.allclose(unsteered["readings"][:1], together[i]["readings"][:1], atol=1e-2)
    assert engine.chunk_trace_count == 1 and engine.prefill_trace_count <= len(ENGINE.prompt_buckets)


async def _ask_once(url: str, body: dict, path: str = "/v1/chat/completions") -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await ask(client, path, body)


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "How was your day?"}],
                              "max_tokens": 8, "temperature": 0, "stream": True}),
    ("/v1/completions", {"prompt": "Once upon a time there was", "max_tokens": 7, "temperature": 0.9, "seed": 11,
                         "top_p": 0.95}),
], ids=["chat-greedy-stream", "completion-sampled"])
def test_readings_in_a_response_are_the_models_readings_of_prompt_and_reply(server, path, body):
    engine, url = server
    body = {**body, "emojax": {"full": True, "prompt": True, "top_k": len(NAMES)}}
    got = asyncio.run(_ask_once(url, body, path))
    chat = "messages" in body
    prompt_ids = TOK.encode_prompt(chat_prompt(body["messages"], TOK) if chat else body["prompt"])
    assert got["prompt"] == prompt_ids and len(got["tokens"]) == body["max_tokens"]
    transcript = prompt_ids + got["tokens"]
    want = engine.score(transcript)  # [P + n, C]: a plain forward to LAYER, the engine's readout
    P = len(prompt_ids)
    assert got["positions"] == list(range(P, len(transcript)))
    np.testing.assert_allclose(got["prompt_readings"], want[:P], atol=ATOL)
    np.testing.assert_allclose(got["readings"], want[P:], atol=ATOL)
    # /v1/monitor reads the same transcript the same way.
    r = httpx.post(url + "/v1/monitor", json={"tokens": transcript, "emojax": {"full": True}}, timeout=60)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose([t["readings"] for t in r.json()["tokens"]], want, atol=ATOL)


def test_the_serve_command_serves_a_saved_checkpoint_and_exits_0_on_sigterm(model, server, tmp_path):
    """The checkpoint and bank saved, then served by `emojax serve` in its own process: the reply it streams is the
    one the in-process server gives the same request (same weights, same bank, same layer)."""
    lm, bank = model
    lm.save(tmp_path / "model")
    bank.save(tmp_path / "bank")
    proc = subprocess.Popen(
        [sys.executable, "-m", "emojax.cli", "serve", "--model", str(tmp_path / "model"), "--bank",
         str(tmp_path / "bank"), "--layer", str(LAYER), "port=0", "engine.slots=2", "engine.chunk_steps=4",
         "engine.max_context=64", "engine.prompt_buckets=[32]", "limits.max_new_tokens=16"],
        cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(180, proc.kill)
    watchdog.start()
    log, port, bound = [], [], threading.Event()

    def read_stderr():  # uvicorn says which port port=0 got
        for line in proc.stderr:
            log.append(line)
            found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            if found:
                port.append(int(found.group(1)))
                bound.set()
        bound.set()  # the process ended

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    body = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 6, "temperature": 0,
            "stream": True, "emojax": {"full": True, "steer": {"fear": 0.3}}}
    try:
        assert bound.wait(120) and port, "".join(log)
        url = f"http://127.0.0.1:{port[0]}"
        health = httpx.get(url + "/healthz", timeout=30)
        assert health.status_code == 200 and health.json()["status"] == "ok", health.text
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200, r.read()
            chunks = sse(r.read().decode())
        assert chunks[-1] == "[DONE]" and chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[0]["emojax"]["concepts"] == list(NAMES) and chunks[0]["emojax"]["steer"] == {"fear": 0.3}
        entries = tokens_of(chunks)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, "".join(log)
        reader.join(10)
        assert "Traceback" not in "".join(log), "".join(log)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    in_process = asyncio.run(_ask_once(server[1], body))
    assert [t["token"] for t in entries] == in_process["tokens"] and len(entries) == 6
    np.testing.assert_allclose([t["readings"] for t in entries], in_process["readings"], atol=ATOL)
