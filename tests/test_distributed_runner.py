"""The corpus stage and `emojax screen` on distributed Beam runners (issue Q, line 1): the same files, byte for byte,
as the DirectRunner's.

Dask: a scheduler and 2 worker processes (`dask scheduler`, `dask worker`) on 127.0.0.1. Beam's DaskRunner gives a
ParDo's tagged output every element and runs only the last sink (scripts/repro_dask_runner.py), so the corpus stage
cannot run on it; emojax.pipelines.dask_runner.DaskRunner fixes both, and both stages run there. The xfail test runs
the reproduction on Beam's own runner and fails the suite, by passing, once Beam fixes it.

Portable: Beam's PortableRunner, the path Flink, Spark and Dataflow take (their own job servers need a jar or a binary
downloaded at run time): the pipeline goes as a proto to a job service process, which has an external worker pool
process start the SDK worker that runs the transforms, all over gRPC on 127.0.0.1. Beam's own job service runs one
SDK worker whatever the options say; the DirectRunner's multi-process tests (test_corpus_pipeline.py,
test_screen.py) cover worker counts."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from emojax.concepts.bank import ConceptBank
from emojax.corpus.config import CorpusConfig
from emojax.corpus.generator import GeneratorConfig
from emojax.models.identity import model_identity
from emojax.pipelines.corpus import build_corpus
from emojax.screen import ScreenConfig
from emojax.screen.run import MANIFEST_FILE, screen

REPO = Path(__file__).resolve().parents[1]
# The worker pool starts SDK workers as `python -c ...` from PATH: this interpreter's, which imports emojax and JAX.
# Their JAX runs on the platform conftest.py gives this process, so both runners compute on the same one.
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
       "JAX_PLATFORMS": os.environ.get("EMOJAX_TEST_PLATFORMS") or "cpu"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop(proc: subprocess.Popen) -> None:
    """Ends a service and the processes it started (its session: dask's nannies' workers, the pool's SDK workers)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """start(name, *args, port=P): runs `python -m args` on 127.0.0.1 until `port` listens (else fails with its
    log); every service started is stopped when the module ends, passed or failed."""
    logs = tmp_path_factory.mktemp("services")
    started = []

    def start(name: str, *args: str, port: int) -> None:
        with open(logs / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen([sys.executable, "-m", *args], env=ENV, cwd=REPO, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        started.append(proc)
        deadline = time.monotonic() + 60
        while not _listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{name} did not listen on 127.0.0.1:{port}: "
                            f"{(logs / f'{name}.log').read_text(errors='replace')[-3000:]}", pytrace=False)
            time.sleep(0.2)

    yield start
    for proc in reversed(started):
        _stop(proc)


@pytest.fixture(scope="module")
def portable(services) -> list[str]:
    """Beam options for a job service and an external SDK worker pool, each its own process on 127.0.0.1."""
    job, pool = _free_port(), _free_port()
    services("job-service", "apache_beam.runners.portability.local_job_service_main", f"--port={job}", port=job)
    services("worker-pool", "apache_beam.runners.worker.worker_pool_main", f"--service_port={pool}", port=pool)
    return ["--runner=PortableRunner", f"--job_endpoint=127.0.0.1:{job}", "--environment_type=EXTERNAL",
            f"--environment_config=127.0.0.1:{pool}"]


def _files(out: Path) -> dict[str, bytes]:
    """Every file of an output folder by relative path (not the writer lock, a dotfile)."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


@pytest.mark.parametrize("engine", ["portable", "dask"])
def test_builtin_corpus_is_byte_identical_on_a_distributed_runner(engine, tmp_path, request):
    config = CorpusConfig(generator=GeneratorConfig(concepts=("calm", "afraid"), n_topics=4), n_shards=3)
    direct = build_corpus(dataclasses.replace(config, out=str(tmp_path / "direct")))
    remote = build_corpus(dataclasses.replace(config, out=str(tmp_path / engine)), request.getfixturevalue(engine))
    assert remote == direct and direct["documents_written"] > 0
    files = _files(tmp_path / "direct")
    shards = [f"shards/{s['name']}" for s in direct["shards"]]
    assert sorted(files) == sorted(["manifest.json", "rejected.jsonl", *shards]) and len(shards) == 3
    assert _files(tmp_path / engine) == files


@pytest.mark.parametrize("engine", ["portable", "dask"])
def test_user_corpus_with_rejected_rows_is_byte_identical_through_the_cli(engine, tmp_path, request):
    """Files read on the workers (fileio), the rejected and duplicate rows (tagged outputs), the options passed
    through `emojax corpus build` as a user would."""
    rows = [{"text": f"Story number {i} about the harbour.", "label": "calm"} for i in range(40)]
    rows += [{"text": "   ", "label": "calm"}, {"text": "unknown label", "label": "flabbergasted"}, rows[3]]
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def cli(out: Path, *beam_args: str) -> None:
        r = subprocess.run([sys.executable, "-m", "emojax.cli", "corpus", "build", "--input", str(data), "--out",
                            str(out), "--shards", "2", *beam_args], capture_output=True, text=True, env=ENV,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]

    cli(tmp_path / "direct")
    cli(tmp_path / engine, *request.getfixturevalue(engine))
    files = _files(tmp_path / "direct")
    manifest = json.loads(files["manifest.json"])
    assert (manifest["documents_written"], manifest["rejected"], manifest["deduplicated"]) == (40, 2, 1)
    assert _files(tmp_path / engine) == files


@pytest.fixture(scope="module")
def screen_run(tmp_path_factory):
    """run(name, beam_args) -> the files of `emojax screen` over 11 samples in 3 shards, by a random tiny model and a
    bank made for it (the manifest less its timings), and the DirectRunner's as "direct"."""
    root = tmp_path_factory.mktemp("screen")
    model = "random:tiny"
    vectors = np.random.default_rng(7).standard_normal((1, 2, 64)).astype(np.float32)  # [C, L, d_model of tiny]
    ConceptBank(names=("afraid",), layers=(1, 2), vectors=vectors, raw=vectors, resid_norm=np.ones(2, np.float32),
                info={"model_identity": model_identity(model), "store_model": model}).save(root / "bank")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i:02d}", "prompt": f"Human: Question {i}?\n\nAssistant:",
                                        "response": f" Answer {i}, in {i % 5 + 1} words."}) + "\n" for i in range(11)))
    config = ScreenConfig(data=(str(data),), bank=str(root / "bank"), concepts=("afraid",), batch_size=4,
                          n_shards=3, max_new_tokens=6, examples=2, mesh=(1, 1, 1))

    def run(name: str, beam_args: list[str]) -> dict[str, bytes]:
        out = root / name
        manifest = screen(dataclasses.replace(config, out=str(out)), beam_args)
        assert manifest["samples"] == 11 and manifest["throughput"]["shards_scored"] == 3
        files = _files(out)
        recorded = json.loads(files.pop(MANIFEST_FILE))
        recorded.pop("throughput")  # timings
        return files | {MANIFEST_FILE: json.dumps(recorded, sort_keys=True).encode()}

    direct = run("direct", [])
    assert len([name for name in direct if name.startswith("shards/")]) == 3
    return run, direct


@pytest.mark.parametrize("engine", ["portable", "dask"])
def test_screen_is_byte_identical_on_a_distributed_runner(engine, screen_run, request):
    """The scoring DoFn loads the model on the workers (their own processes: an SDK worker, or 2 Dask workers) and
    writes the same shards, scores, flags and manifest as the DirectRunner. Its pipeline has one output per step
    and one sink."""
    run, direct = screen_run
    assert run(engine, request.getfixturevalue(engine)) == direct


@pytest.fixture(scope="module")
def dask_scheduler(services) -> str:
    """The address of a dask.distributed scheduler with 2 worker processes (each under its nanny), on 127.0.0.1."""
    port = _free_port()
    services("dask-scheduler", "distributed.cli.dask_scheduler", "--host=127.0.0.1", f"--port={port}",
             "--no-dashboard", port=port)
    address = f"tcp://127.0.0.1:{port}"
    for i in range(2):
        worker = _free_port()
        services(f"dask-worker-{i}", "distributed.cli.dask_worker", address, "--host=127.0.0.1",
                 f"--worker-port={worker}", "--nthreads=1", "--no-dashboard", port=worker)
    from distributed import Client

    with Client(address, timeout=30) as client:
        client.wait_for_workers(2, timeout=60)
    return address


@pytest.fixture(scope="module")
def dask(dask_scheduler) -> list[str]:
    """Beam options for emojax's DaskRunner on that cluster (it closes the client it opens)."""
    return ["--runner=emojax.pipelines.dask_runner.DaskRunner", f"--dask_client_address={dask_scheduler}"]


@pytest.mark.xfail(strict=True, reason="Beam's DaskRunner misroutes tagged outputs and skips all but the last sink "
                                       "(scripts/repro_dask_runner.py); when this passes, run the corpus stage here")
def test_dask_runner_runs_tagged_outputs_and_every_sink(dask_scheduler):
    r = subprocess.run([sys.executable, "scripts/repro_dask_runner.py", f"--scheduler={dask_scheduler}"], cwd=REPO,
                       env=ENV, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout
