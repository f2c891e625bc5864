"""The serving engine: each of 32 concurrent requests (steering, temperatures, seeds, staggered arrivals) gets the
tokens and readings it gets served alone, and the decode loop's for greedy and sampled requests; one compile of
the chunk step and one prefill per prompt bucket; a request joins while another decodes; finished and cancelled
requests free their slot; a full queue, bad input, shutdown and a failing loop answer clearly and hang nobody."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import jax
import numpy as np
import pytest

from emojax.concepts.bank import ConceptBank
from emojax.errors import InputError
from emojax.models import random_model
from emojax.models.presets import SHAPES
from emojax.serve.engine import Engine, EngineBusy, EngineConfig
from emojax.serve.types import GenerationRequest, PromptReadings, TokenEvent
from emojax.steer import DecodeConfig, Decoder, Sampling, from_bank, readout_from_bank
from emojax.tokenizer import ByteTokenizer

CFG = SHAPES["tiny"]
LAYER = 1
NAMES = ("joy", "fear", "anger")
MAIN = EngineConfig(slots=4, chunk_steps=4, max_context=48, prompt_buckets=(8, 16), max_queue=64)
PAIR = EngineConfig(slots=2, chunk_steps=4, max_context=96, prompt_buckets=(8,), max_queue=4)


def tiny_model_and_bank():
    """The tiny random model and a calibrated random bank at LAYER (readings are z-scores from a center). The
    stream's norm there is about 0.2, the bank's unit: strengths of a few tenths change the tokens."""
    lm = random_model(CFG, seed=0, tokenizer=ByteTokenizer())
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(len(NAMES), 1, CFG.d_model)).astype(np.float32)
    bank = ConceptBank(names=NAMES, layers=(LAYER,), vectors=vectors, raw=vectors,
                       resid_norm=np.full(1, 0.2, np.float32),
                       center=rng.normal(scale=0.05, size=(1, CFG.d_model)).astype(np.float32),
                       neutral_mean=rng.normal(scale=0.05, size=(1, len(NAMES))).astype(np.float32),
                       neutral_std=np.full((1, len(NAMES)), 0.2, np.float32))
    return lm, bank


@pytest.fixture(scope="module")
def model():
    return tiny_model_and_bank()


@pytest.fixture(scope="module")
def pair_engine(model):
    engine = Engine(*model, LAYER, PAIR)
    yield engine
    engine.close()


@pytest.fixture
def pair(pair_engine, monkeypatch):
    """A two-slot engine shared by the slot tests (each leaves it idle), its chunks slowed to at least 5 ms: the
    tiny model decodes a whole request before a test's client, on a busy machine, has read two events."""
    monkeypatch.setattr(pair_engine, "_chunk", slowed(pair_engine._chunk, 0.005))
    return pair_engine


def slowed(chunk, seconds: float):
    """The engine's chunk step, taking at least `seconds` (the values are the same)."""

    def run(*args):
        time.sleep(seconds)
        return chunk(*args)

    return run


def request(rid: str, n_prompt: int = 5, max_new: int = 4, **kw) -> GenerationRequest:
    prompt = tuple(int(t) for t in np.random.default_rng(len(rid) * 1000 + n_prompt).integers(1, 256, n_prompt))
    return GenerationRequest(request_id=rid, prompt_ids=prompt, max_new_tokens=max_new, **kw)


def workload(n: int = 32) -> list[GenerationRequest]:
    """Prompts of 2..16 tokens (both buckets), up to 13 new tokens, steering by random concepts and strengths,
    even requests greedy and odd ones sampled (temperature, top-k, top-p), every fifth with stop ids (which
    `served` replaces by one that stops it)."""
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        sampled = i % 2 == 1
        out.append(GenerationRequest(
            request_id=f"r{i}", prompt_ids=tuple(int(t) for t in rng.integers(1, 256, int(rng.integers(2, 17)))),
            max_new_tokens=int(rng.integers(1, 14)),
            temperature=float(rng.choice([0.7, 1.0, 1.3])) if sampled else 0.0,
            top_k=int(rng.choice([0, 20])) if sampled else 0, top_p=float(rng.choice([1.0, 0.9])) if sampled else 1.0,
            seed=int(rng.integers(0, 2 ** 32)),
            steering=tuple((c, float(rng.uniform(-0.4, 0.4))) for c in NAMES if rng.random() < 0.6),
            stop_ids=tuple(int(t) for t in rng.integers(1, 256, 3)) if i % 5 == 0 else ()))
    return out


async def collect(stream) -> dict:
    """A request's events: prompt readings [P, C], tokens, token readings [n, C], how it finished."""
    out = {"prompt": None, "tokens": [], "readings": [], "finished": None, "error": None}
    async for event in stream:
        if isinstance(event, PromptReadings):
            assert out["prompt"] is None and not out["tokens"]
            out["prompt"] = event.readings
        else:
            assert event.index == len(out["tokens"])
            out["tokens"].append(event.token_id)
            out["readings"].append(event.readings)
            out["finished"], out["error"] = event.finished, event.error
    out["readings"] = np.asarray(out["readings"], np.float32).reshape(-1, len(NAMES))
    return out


def record_deliveries(monkeypatch, engine) -> list[tuple[str, str, int]]:
    """(request id, kind, token index) of every event the engine sends, in the order it sends them."""
    log, original = [], engine._deliver

    def deliver(handle, event):
        log.append((event.request_id, "prompt" if isinstance(event, PromptReadings) else "token",
                    getattr(event, "index", -1)))
        original(handle, event)

    monkeypatch.setattr(engine, "_deliver", deliver)
    return log


@pytest.fixture(scope="module")
def served(model):
    """The workload served one request at a time, then all at once with staggered arrivals."""
    engine = Engine(*model, LAYER, MAIN)
    reqs = workload()

    async def run():
        for i, r in enumerate(reqs):
            if r.stop_ids:  # stop at the token it generates third (or last), wherever that first occurs
                tokens = (await collect(engine.submit(dataclasses.replace(r, stop_ids=()))))["tokens"]
                reqs[i] = dataclasses.replace(r, stop_ids=(tokens[min(2, len(tokens) - 1)], *r.stop_ids[1:]))
        alone = [await collect(engine.submit(r)) for r in reqs]
        engine._chunk = slowed(engine._chunk, 0.002)  # requests overlap however fast the machine decodes
        busy_at_submit = []

        async def arrive(i, r):
            await asyncio.sleep(0.004 * i)
            busy_at_submit.append(engine.stats().active)
            return await collect(engine.submit(r))

        together = await asyncio.gather(*(arrive(i, r) for i, r in enumerate(reqs)))
        return alone, together, busy_at_submit

    alone, together, busy = asyncio.run(run())
    yield dict(engine=engine, requests=reqs, alone=alone, together=together, busy=busy)
    engine.close()


def test_concurrent_requests_equal_each_served_alone_and_the_decode_loop(model, served):
    lm, bank = model
    assert sum(b > 0 for b in served["busy"]) >= 8  # many arrived while others were decoding
    finished = set()
    for r, alone, together in zip(served["requests"], served["alone"], served["together"]):
        assert together["tokens"] == alone["tokens"], r.request_id
        assert together["finished"] == alone["finished"] and alone["finished"] in ("stop", "length")
        finished.add(alone["finished"])
        assert alone["prompt"].shape == (len(r.prompt_ids), len(NAMES))
        np.testing.assert_allclose(together["prompt"], alone["prompt"], atol=1e-5)
        np.testing.assert_allclose(together["readings"], alone["readings"], atol=1e-5)
    assert len({tuple(a["tokens"]) for a in served["alone"]}) > 20  # steering and sampling made them differ

    # The same requests through Decoder.generate, one at a time: the same tokens and readings.
    decoder = Decoder(lm, DecodeConfig(prompt_buckets=(16,), new_token_buckets=(16,)))
    readout, _ = readout_from_bank(bank, LAYER, None)  # z-scores, as the engine reads them
    for r, alone in zip(served["requests"], served["alone"]):
        strengths = np.zeros((1, len(NAMES)), np.float32)
        for c, s in r.steering:
            strengths[0, NAMES.index(c)] += s
        sampling = Sampling.make(1, r.temperature, r.top_k, r.top_p, seed=r.seed) if r.temperature > 0 else None
        gen = decoder.generate(np.asarray([r.prompt_ids]), max_new_tokens=r.max_new_tokens,
                               interventions=from_bank(bank, CFG.n_layers, NAMES, strengths, layers=(LAYER,)),
                               sampling=sampling, key=jax.random.key(r.seed), stop_tokens=r.stop_ids,
                               readout=readout)
        assert gen.generated(0) == alone["tokens"], r.request_id
        valid = np.asarray(gen.valid)[0]
        np.testing.assert_allclose(np.asarray(gen.readings)[0][valid],
                                   np.concatenate([alone["prompt"], alone["readings"]]), atol=1e-5)
    assert "stop" in finished


def test_no_recompile_across_prompts_strengths_temperatures_seeds_and_concepts(served):
    engine = served["engine"]
    assert engine.chunk_trace_count == 1
    buckets = {8 if len(r.prompt_ids) <= 8 else 16 for r in served["requests"]}
    assert buckets == {8, 16} and engine.prefill_trace_count == len(buckets)


def test_score_reads_a_transcript_as_decoding_did(served):
    engine = served["engine"]
    for r, alone in zip(served["requests"], served["alone"]):
        if not r.steering:  # unsteered: the plain forward reads what the decode loop read
            readings = engine.score(list(r.prompt_ids) + alone["tokens"])
            np.testing.assert_allclose(readings, np.concatenate([alone["prompt"], alone["readings"]]), atol=1e-5)
            break
    else:
        pytest.fail("the workload has no unsteered request")
    with pytest.raises(InputError, match="token_ids"):
        engine.score([])
    with pytest.raises(InputError, match="token_ids"):
        engine.score([1] * 49)


def test_a_request_joins_while_another_decodes(pair, monkeypatch):
    log = record_deliveries(monkeypatch, pair)

    async def run():
        long_task = asyncio.create_task(collect(pair.submit(request("long", max_new=88))))
        while sum(1 for e in list(log) if e[0] == "long" and e[1] == "token") < 4:
            await asyncio.sleep(0.001)
        at_submit = sum(1 for e in list(log) if e[0] == "long" and e[1] == "token")
        short = await collect(pair.submit(request("short", max_new=3)))
        return at_submit, short, await long_task

    at_submit, short, long = asyncio.run(run())
    assert len(short["tokens"]) == 3 and len(long["tokens"]) == 88
    first_short = log.index(("short", "token", 0))
    long_before = sum(1 for e in log[:first_short] if e[0] == "long" and e[1] == "token")
    # Joined the chunk after the one in flight: at most that chunk, the next and the one read back late.
    assert long_before - at_submit <= 3 * PAIR.chunk_steps
    assert long_before < 88


def test_finished_slots_are_freed_at_once(pair, monkeypatch):
    log = record_deliveries(monkeypatch, pair)
    before = pair.stats().requests_finished

    async def run():
        first = [pair.submit(request("a", max_new=2)), pair.submit(request("b", max_new=60))]
        tasks = [asyncio.create_task(collect(s)) for s in first]
        while sum(1 for e in list(log) if e[1] == "prompt") < 2:  # both admitted: the queue is empty
            await asyncio.sleep(0.001)
        rest = [pair.submit(request(name, max_new=n)) for name, n in (("c", 3), ("d", 5), ("e", 2), ("f", 4))]
        return await asyncio.gather(*tasks, *(collect(s) for s in rest))

    results = asyncio.run(run())
    assert [len(r["tokens"]) for r in results] == [2, 60, 3, 5, 2, 4]
    assert all(r["finished"] == "length" for r in results)
    # c..f took turns in the slot "a" left while "b" went on decoding in the other.
    b_last = log.index(("b", "token", 59))
    assert all(log.index((name, "token", 0)) < b_last for name in "cdef")
    stats = pair.stats()
    assert stats.requests_finished - before == 6 and stats.active == 0 and stats.queued == 0


def test_cancelled_requests_free_their_slot(pair, monkeypatch):
    log = record_deliveries(monkeypatch, pair)

    async def run():
        stream = pair.submit(request("closed", max_new=90))
        async for event in stream:
            if isinstance(event, TokenEvent) and event.index == 1:
                break
        await stream.aclose()

        async def read(stream):
            async for _ in stream:
                pass

        task = asyncio.create_task(read(pair.submit(request("task", max_new=90))))
        while ("task", "token", 0) not in log:
            await asyncio.sleep(0.001)
        task.cancel()
        others = await asyncio.gather(*(collect(pair.submit(request(f"x{i}", max_new=4))) for i in range(3)))
        deadline = time.monotonic() + 10
        while pair.stats().active and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return others

    others = asyncio.run(run())
    assert all(len(o["tokens"]) == 4 for o in others)
    for rid in ("closed", "task"):  # stopped long before 90 tokens
        assert sum(1 for e in log if e[0] == rid and e[1] == "token") < 60
    assert pair.stats().active == 0 and pair.stats().queued == 0


def test_full_queue_raises_engine_busy(pair):
    async def run():
        streams = [pair.submit(request(f"long{i}", max_new=90)) for i in range(2)]
        for s in streams:
            assert isinstance(await s.__anext__(), PromptReadings)  # both slots taken
        streams += [pair.submit(request(f"q{i}", max_new=2)) for i in range(PAIR.max_queue)]
        with pytest.raises(EngineBusy, match="queue full"):
            pair.submit(request("one too many"))
        for s in streams:
            await s.aclose()

    asyncio.run(run())


def test_bad_requests_name_the_field(pair):
    cases = [
        (dict(n_prompt=0), "prompt_ids"),
        (dict(n_prompt=96), "prompt_ids"),
        (dict(max_new=0), "max_new_tokens"),
        (dict(n_prompt=90, max_new=7), "max_new_tokens"),
        (dict(steering=(("envy", 0.1),)), "steering"),
        (dict(steering=(("joy", float("nan")),)), "steering"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(seed=-1), "seed"),
        (dict(stop_ids=(999,)), "stop_ids"),
    ]

    async def run():
        for kw, field in cases:
            with pytest.raises(InputError, match=field):
                pair.submit(request("bad", **kw))
        with pytest.raises(InputError, match="prompt_ids"):
            pair.submit(GenerationRequest("bad", (1, 300), 2))

    asyncio.run(run())
    assert pair.stats().queued == 0


def test_shutdown_finishes_in_flight_requests_and_refuses_new_ones(model):
    engine = Engine(*model, LAYER, EngineConfig(slots=2, chunk_steps=4, max_context=32, prompt_buckets=(8,)))

    async def run():
        tasks = [asyncio.create_task(collect(engine.submit(request(f"s{i}", max_new=12)))) for i in range(3)]
        await asyncio.sleep(0)
        stopping = asyncio.create_task(engine.shutdown(timeout_s=60))
        while not engine._closing:
            await asyncio.sleep(0.001)
        with pytest.raises(EngineBusy, match="shutting down"):
            engine.submit(request("late"))
        await stopping
        return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    assert [r["finished"] for r in results] == ["length"] * 3 and all(len(r["tokens"]) == 12 for r in results)
    assert not engine._thread.is_alive() and engine.healthy


def test_shutdown_past_its_timeout_ends_the_rest_with_an_error(model):
    """The chunk step is held (a device that does not answer) until after the shutdown's wait has run out."""
    engine = Engine(*model, LAYER, EngineConfig(slots=2, chunk_steps=4, max_context=32, prompt_buckets=(8,)))
    release, real = threading.Event(), engine._chunk
    engine._chunk = lambda *args: (release.wait(), real(*args))[1]

    async def run():
        task = asyncio.create_task(collect(engine.submit(request("held", max_new=20))))
        stopping = asyncio.create_task(engine.shutdown(timeout_s=0.2))
        await asyncio.sleep(0.4)
        release.set()
        await stopping
        return await task

    held = asyncio.run(run())
    assert held["finished"] == "error" and "shut down" in held["error"]


def test_a_failing_loop_ends_every_request_with_an_error(model):
    engine = Engine(*model, LAYER, EngineConfig(slots=2, chunk_steps=4, max_context=32, prompt_buckets=(8,)))

    def boom(*args):
        raise RuntimeError("boom")

    engine._chunk = boom

    async def run():
        results = await asyncio.gather(*(collect(engine.submit(request(f"f{i}", max_new=5))) for i in range(3)))
        with pytest.raises(EngineBusy, match="boom"):
            engine.submit(request("after"))
        return results

    results = asyncio.run(asyncio.wait_for(run(), timeout=60))
    assert all(r["finished"] == "error" and "boom" in r["error"] for r in results)
    assert not engine.healthy and "boom" in engine.error
    engine.close()
