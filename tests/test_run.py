"""`emojax run` end to end on configs/tiny.yaml: every stage's artefacts, resume after a kill, bad configs."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
from dump_helpers import REPO, assert_same_store, run_child

from emojax.cli import main
from emojax.concepts import load_bank
from emojax.run import load_run_file, run
from emojax.store import ActivationStore

TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One model cache for the module: the tiny built-in model is trained once."""
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("EMOJAX_CACHE")
    os.environ["EMOJAX_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("EMOJAX_CACHE")
    else:
        os.environ["EMOJAX_CACHE"] = old


@pytest.fixture(scope="module")
def tiny_run(cache, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    done = run(load_run_file(TINY, [f"run.dir={run_dir}"]), show_progress=False)
    return run_dir, done


def test_every_stage_writes_what_the_next_one_needs(tiny_run):
    run_dir, done = tiny_run
    run_file = load_run_file(TINY)
    assert list(done) == list(run_file.run.stages)
    assert all(r["complete"] for r in done.values())
    manifest = json.loads((run_dir / "corpus" / "manifest.json").read_text())
    concepts = run_file.section("corpus")["generator"]["concepts"]
    assert set(manifest["per_label"]) == set(concepts) | {"neutral"}
    assert manifest["rejected"] == 0
    store = ActivationStore(str(run_dir / "activations"))
    assert store.state["n_docs"] == manifest["documents_written"]
    assert store.state["n_tokens"] == manifest["tokens_written"]
    assert store.layers == (1, 2)
    bank = load_bank(run_dir / "concepts")
    assert sorted(bank.names) == sorted(concepts)
    assert bank.vectors.shape == (len(concepts), 2, store.d_model)
    assert np.isfinite(bank.vectors).all() and (bank.resid_norm > 0).all()
    report = json.loads((run_dir / "concepts" / "eval.json").read_text())
    best = report["per_layer"][str(report["best_layer"])]["test"]
    chance = 1 / len(concepts)
    assert max(best["nearest"]["top1"], best["probe"]["top1"]) > 1.5 * chance, best
    html = (run_dir / "report" / "index.html").read_text()
    assert html.count("data:image/png;base64,") >= 3


def test_a_rerun_skips_every_complete_stage(tiny_run, cache, capsys):
    run_dir, _ = tiny_run
    before = (run_dir / "concepts" / "bank.safetensors").read_bytes()
    assert main(["run", "--config", str(TINY), f"run.dir={run_dir}", "--quiet"]) == 0
    err = capsys.readouterr().err
    for stage in ("train", "corpus", "dump", "fit"):
        assert f"{stage}: skipped (complete, inputs unchanged)" in err
    assert (run_dir / "concepts" / "bank.safetensors").read_bytes() == before


def test_a_changed_setting_recomputes_only_what_depends_on_it(tiny_run, cache, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "tiny"
    shutil.copytree(tiny_run[0], run_dir)
    assert main(["run", "--config", str(TINY), f"run.dir={run_dir}", "fit.kmeans_k=3", "--quiet",
                 "run.stages=[train,corpus,dump,fit]"]) == 0
    err = capsys.readouterr().err
    assert "dump: skipped (complete, inputs unchanged)" in err
    assert "fit: settings or inputs changed; recomputing" in err


KILL_RUN = """
import sys, time
from emojax.store import state, writer
from emojax.cli import main
marker = [False]
original_json, original_write = state.KeyValueFolder.write_json, writer.Writes.write
def write_json(self, key, value):
    original_json(self, key, value)
    marker[0] |= key.startswith("shards/")
def write(self, *args, **kw):
    original_write(self, *args, **kw)
    if marker[0]:
        print("READY", flush=True)  # a dump shard is complete and the next has started: wait for SIGKILL
        time.sleep(600)
state.KeyValueFolder.write_json, writer.Writes.write = write_json, write
sys.exit(main(["run", "--quiet", *sys.argv[1:]]))
"""


def test_killed_during_dump_then_resumed_equals_an_uninterrupted_run(tiny_run, cache, tmp_path, capsys):
    run_dir = tmp_path / "tiny"
    stages = "run.stages=[train,corpus,dump,fit]"
    child = run_child(KILL_RUN, "--config", str(TINY), f"run.dir={run_dir}", stages,
                      env_extra={"EMOJAX_CACHE": str(cache)})
    line = child.stdout.readline()
    assert line.strip() == "READY", child.stderr.read()
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert main(["run", "--config", str(TINY), f"run.dir={run_dir}", stages, "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "corpus: skipped (complete, inputs unchanged)" in captured.err
    assert "dump: resuming an unfinished run" in captured.err
    assert "1 shard(s) already complete, skipped" in captured.out
    assert_same_store(run_dir / "activations", tiny_run[0] / "activations")
    a, b = load_bank(run_dir / "concepts"), load_bank(tiny_run[0] / "concepts")
    np.testing.assert_array_equal(a.vectors, b.vectors)


@pytest.mark.parametrize("override, message", [
    ("dump.layer=[1]", "unknown key(s) ['dump.layer']"),
    ("dump.pool_start=abc", "dump.pool_start must be a number"),
    ("run.model=/no/such/checkpoint", "/no/such/checkpoint"),
    ("sae.out=x", "set by `emojax run`"),
])
def test_bad_configs_are_one_line_errors(tmp_path, capsys, override, message):
    code = main(["run", "--config", str(TINY), f"run.dir={tmp_path / 'r'}", override, "--quiet",
                 "run.stages=[train,corpus,dump]"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
