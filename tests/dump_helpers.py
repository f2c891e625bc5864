"""Shared pieces of the dump tests: a small corpus, store configs, reading a whole store, child processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import tensorstore as ts

from emojax.pipelines.corpus import build_corpus
from emojax.corpus.config import CorpusConfig
from emojax.corpus.generator import GeneratorConfig
from emojax.store import DumpConfig

REPO = Path(__file__).resolve().parents[1]
SMALL = GeneratorConfig(concepts=("desperate", "calm", "afraid"), n_topics=5, stories_per_topic=2)


def make_corpus(out: Path, tokenizer: str = "byte", n_shards: int = 4) -> Path:
    build_corpus(CorpusConfig(out=str(out), generator=SMALL, n_shards=n_shards, max_tokens=200,
                              tokenizer=tokenizer))
    return out


def dump_config(corpus: Path, out: Path, **changes) -> DumpConfig:
    values = dict(corpus=str(corpus), model="random:tiny", out=str(out), layers=(1, 2), dtype="float32",
                  buckets=(48, 96, 200), tokens_per_batch=1024, token_chunk_rows=512, token_read_rows=128,
                  doc_chunk_rows=16, doc_read_rows=4, mesh=(1, 1, 1), pool_start=150)
    values.update(changes)
    return DumpConfig(**values)


def config_args(config: DumpConfig) -> list[str]:
    """The same settings as `emojax dump` key=value overrides."""
    import dataclasses

    out = []
    for k, v in dataclasses.asdict(config).items():
        out.append(f"{k}={json.dumps(list(v)) if isinstance(v, tuple) else v}")
    return out


def store_contents(path: Path) -> dict:
    """Every array (read whole), store.json and the shard records: what 'bitwise identical' compares."""
    state = json.loads((path / "store.json").read_text())
    state.pop("corpus")  # where the corpus was read from, not what it holds (its fingerprint is compared)
    out = {"store.json": state}
    for zarr_json in sorted(path.rglob("zarr.json")):
        name = str(zarr_json.parent.relative_to(path))
        out[name] = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(zarr_json.parent)}}
                            ).result().read().result()
    for record in sorted((path / "shards").glob("*.json")):
        out[f"shards/{record.name}"] = json.loads(record.read_text())
    return out


def assert_same_store(a: Path, b: Path) -> None:
    ca, cb = store_contents(a), store_contents(b)
    assert sorted(ca) == sorted(cb)
    for key in ca:
        if isinstance(ca[key], np.ndarray):
            assert ca[key].dtype == cb[key].dtype and ca[key].shape == cb[key].shape, key
            assert ca[key].tobytes() == cb[key].tobytes(), f"{key} differs"
        else:
            assert ca[key] == cb[key], key


def child_env(devices: int = 1) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_NUM_CPU_DEVICES"] = str(devices)
    env["PYTHONPATH"] = str(REPO / "tests") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_child(code: str, *args: str, env_extra: dict | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], env={**child_env(), **(env_extra or {})}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(REPO), **popen)
