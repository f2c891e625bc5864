"""Load test of `emojax serve`: N concurrent streaming chat clients on 127.0.0.1 for a bounded time, then the same
requests one at a time, each request with its own steering (the concepts from /v1/models, in turn).

    python scripts/load_test_serve.py --url http://127.0.0.1:8000 --clients 16 --duration 30
    python scripts/load_test_serve.py --clients 8 --duration 20     # starts `emojax serve` itself on random:tiny
                                                                    # with a random concept bank (CPU is fine)

Prints one JSON line per phase (bench_common.emit; a human summary goes to stderr): requests, errors,
requests/s, tokens/s, p50/p99 time to first token and per-token latency (seconds), and a last line with the
concurrent/sequential throughput ratio. A request counts as an error when its status is not 200, its stream
carries an error, or it ends without [DONE]. After a warm-up request (the first compiles), each client sends
requests back to back until the time is up; requests started before then are finished and counted.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import emit, log  # noqa: E402

PROMPTS = ("The deadline was in an hour and nothing worked.", "She opened the letter and smiled.",
           "The meeting started late, and he", "When the phone rang at midnight,")


@dataclasses.dataclass
class Record:
    ok: bool
    error: str | None
    ttft: float | None  # seconds from sending to the first token
    gaps: list[float]  # seconds between consecutive tokens
    tokens: int


def request_bodies(concepts: list[str], strength_range: tuple[float, float], max_tokens: int, n: int) -> list[dict]:
    """`n` chat requests: prompts in turn, one steered concept each (strength within the range), greedy."""
    lo, hi = strength_range
    bodies = []
    for i in range(n):
        steer = {concepts[i % len(concepts)]: max(lo, min(hi, 0.05 * ((i % 5) - 2)))} if concepts else {}
        bodies.append({"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "stream": True,
                       "max_tokens": max_tokens, "temperature": 0, "emojax": {"top_k": 3, "steer": steer}})
    return bodies


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> Record:
    t0 = time.perf_counter()
    last, ttft, gaps, tokens, done = None, None, [], 0, False
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return Record(False, f"HTTP {response.status_code}: {text[:200]}", None, [], 0)
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return Record(False, chunk["error"]["message"], ttft, gaps, tokens)
                n = len(chunk.get("emojax", {}).get("tokens", []))
                if n:
                    now = time.perf_counter()
                    if last is None:
                        ttft = now - t0
                    else:
                        gaps.append(now - last)
                    last, tokens = now, tokens + n
    except httpx.HTTPError as e:
        return Record(False, f"{type(e).__name__}: {e}", ttft, gaps, tokens)
    return Record(done, None if done else "the stream ended without [DONE]", ttft, gaps, tokens)


async def run_phase(url: str, bodies: list[dict], clients: int, duration_s: float,
                    headers: dict) -> tuple[list[Record], float, int]:
    """`clients` clients sending bodies in turn until duration_s has passed; returns the records, the wall time
    and how many bodies were used."""
    deadline = time.perf_counter() + duration_s
    records: list[Record] = []
    used = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal used
        while time.perf_counter() < deadline and used < len(bodies):
            body = bodies[used]
            used += 1
            records.append(await one_request(client, url, body))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(300.0), limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return records, time.perf_counter() - t0, used


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summarize(phase: str, records: list[Record], wall_s: float, clients: int) -> dict:
    ok = [r for r in records if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    tokens = sum(r.tokens for r in ok)
    errors = [r.error for r in records if not r.ok]
    return {"phase": phase, "clients": clients, "requests": len(records), "errors": len(errors),
            "first_error": errors[0] if errors else None, "wall_s": wall_s,
            "requests_per_s": len(ok) / wall_s if wall_s else 0.0, "tokens": tokens,
            "tokens_per_s": tokens / wall_s if wall_s else 0.0,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "per_token_p50_s": percentile(gaps, 50), "per_token_p99_s": percentile(gaps, 99)}


def run_load(url: str, clients: int = 8, duration_s: float = 10.0, max_tokens: int = 32,
             api_key: str | None = None, sequential: bool = True) -> dict:
    """The concurrent phase, then (sequential=True) the same requests one at a time for at most as long; returns
    {"concurrent": summary, "sequential": summary or None, "throughput_ratio": tokens/s concurrent / sequential}."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    models = httpx.get(f"{url}/v1/models", headers=headers, timeout=60).raise_for_status().json()["data"][0]
    info = models.get("emojax", {})
    bodies = request_bodies(info.get("concepts", []), tuple(info.get("strength_range", (-1.0, 1.0))), max_tokens,
                            n=100_000)

    async def main() -> dict:
        warm, _, _ = await run_phase(url, bodies[:1], 1, 600.0, headers)  # compiles; not counted
        if not warm[0].ok:
            raise RuntimeError(f"the warm-up request failed: {warm[0].error}")
        records, wall, used = await run_phase(url, bodies, clients, duration_s, headers)
        out = {"concurrent": summarize("concurrent", records, wall, clients), "sequential": None,
               "throughput_ratio": None}
        if sequential:
            records, wall, _ = await run_phase(url, bodies[:used], 1, max(duration_s, wall), headers)
            out["sequential"] = summarize("sequential", records, wall, 1)
            seq = out["sequential"]["tokens_per_s"]
            out["throughput_ratio"] = out["concurrent"]["tokens_per_s"] / seq if seq else None
        return out

    return asyncio.run(main())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, folder: Path, slots: int, timeout_s: float = 600.0) -> tuple[subprocess.Popen, str]:
    """`emojax serve` on `model` with a random 4-concept bank at two-thirds depth, on a free local port."""
    import numpy as np

    from emojax.concepts.bank import ConceptBank
    from emojax.models import load_model

    config = load_model(model).config
    layer = max(1, (2 * config.n_layers) // 3)
    rng = np.random.default_rng(0)
    names = ("calm", "desperate", "angry", "joyful")
    vectors = rng.normal(size=(len(names), 1, config.d_model)).astype(np.float32)
    ConceptBank(names=names, layers=(layer,), vectors=vectors, raw=vectors,
                resid_norm=np.ones(1, np.float32)).save(folder / "bank")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "emojax.cli", "serve", "--model", model, "--bank",
                             str(folder / "bank"), f"port={port}", f"engine.slots={slots}", "limits.max_concurrent=256",
                             "rules=[desperate>2:3]"], stderr=subprocess.DEVNULL if not os.environ.get("VERBOSE")
                            else None)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"emojax serve exited with status {proc.returncode} (VERBOSE=1 shows its log)")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"emojax serve did not answer /healthz within {timeout_s:g} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server's base URL; without it, one is started on --model")
    p.add_argument("--model", default="random:tiny")
    p.add_argument("--slots", type=int, default=8, help="engine slots of the server this script starts")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of the concurrent phase")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--api-key", default=os.environ.get("EMOJAX_API_KEY"))
    p.add_argument("--no-sequential", action="store_true", help="skip the one-at-a-time phase")
    args = p.parse_args(argv)
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url
        if url is None:
            log(f"starting emojax serve on {args.model} ...")
            proc, url = start_server(args.model, Path(tmp), args.slots)
        try:
            result = run_load(url, args.clients, args.duration, args.max_tokens, args.api_key,
                              sequential=not args.no_sequential)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=120)
    for phase in ("concurrent", "sequential"):
        if result[phase] is not None:
            emit({"bench": "serve_load", "url": url, "max_tokens": args.max_tokens, **result[phase]})
            r = result[phase]
            log(f"{phase}: {r['requests']} requests ({r['errors']} errors), {r['requests_per_s']:.2f} req/s, "
                f"{r['tokens_per_s']:.1f} tok/s, TTFT p50/p99 {r['ttft_p50_s']}/{r['ttft_p99_s']} s, "
                f"per token p50/p99 {r['per_token_p50_s']}/{r['per_token_p99_s']} s")
    if result["throughput_ratio"] is not None:
        emit({"bench": "serve_load", "throughput_ratio": result["throughput_ratio"]})
    return 1 if result["concurrent"]["errors"] or (result["sequential"] or {}).get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
