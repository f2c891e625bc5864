"""The SAE stage loses nothing and is never silently wrong: a resume only with the settings that fix the math
(every SaeConfig field classified), one writer per output folder, no NaN/inf state checkpointed or exported,
atomic export files and a one-line error on a full disk."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from dump_helpers import run_child
from synthetic_store import write_synthetic_store

from emojax.errors import CheckpointError
from emojax.fileio import DiskFullError
from emojax.locks import LockedError, holder
from emojax.sae import (ArraySource, NonFiniteParamsError, Sae, SaeConfig, SaeTrainer, StoreSource, TopK, export_sae,
                        load_sae, train_sae)
from emojax.sae.checkpoint import SaeCheckpoints
from emojax.sae.fingerprint import MATH, NOT_MATH, RESOLVED
from emojax.store import ActivationStore

D = 12


def acts(n: int = 1024, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)


def tiny(out, **changes) -> SaeConfig:
    base = dict(variant="topk", n_latents=24, k=3, batch_size=32, steps=4, lr=3e-3, lr_warmup_steps=1,
                dead_after_tokens=32 * 3, aux_k=4, checkpoint_every=2, log_every=0, init_sample_tokens=256,
                out=str(out) if out else "")
    return SaeConfig(**{**base, **changes})


def assert_same_state(a: dict, b: dict) -> None:
    for key in ("params", "opt", "stats"):
        for x, y in zip(jax.tree.leaves(a[key]), jax.tree.leaves(b[key])):
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), key


# ---- (5) the resume fingerprint


def test_every_sae_config_field_is_classified_as_math_or_not():
    names = [f.name for f in dataclasses.fields(SaeConfig)]
    tables = (set(MATH), set(RESOLVED), set(NOT_MATH))
    unclassified = [n for n in names if not any(n in t for t in tables)]
    assert not unclassified, f"classify these SaeConfig fields in emojax/sae/fingerprint.py: {unclassified}"
    assert sum(len(t) for t in tables) == len(set().union(*tables)), "a field is in two tables"
    assert set().union(*tables) <= set(names), "a table names a field SaeConfig does not have"


# One change per field that changes the math (each still a valid config).
MATH_CHANGES = {
    "variant": dict(variant="batchtopk"), "n_latents": dict(n_latents=36), "k": dict(k=2),
    "sparsity_coeff": dict(sparsity_coeff=1.0), "sparsity_warmup_steps": dict(sparsity_warmup_steps=3),
    "aux_k": dict(aux_k=8), "aux_coeff": dict(aux_coeff=0.5), "dead_after_tokens": dict(dead_after_tokens=999),
    "dead_window_frac": dict(dead_window_frac=0.5),
    "jump_bandwidth": dict(jump_bandwidth=0.01), "jump_init_threshold": dict(jump_init_threshold=0.01),
    "threshold_decay": dict(threshold_decay=0.5), "lr": dict(lr=1e-3), "lr_warmup_steps": dict(lr_warmup_steps=2),
    "lr_decay_frac": dict(lr_decay_frac=0.5), "adam_b1": dict(adam_b1=0.8), "adam_b2": dict(adam_b2=0.99),
    "batch_size": dict(batch_size=16), "steps": dict(steps=6), "seed": dict(seed=1),
    "sweep": dict(sweep="sparsity_coeff", sweep_values=(5.0,)), "sweep_values": dict(sweep="k", sweep_values=(3,)),
    "init_sample_tokens": dict(init_sample_tokens=128), "buffer_chunks": dict(buffer_chunks=8),
    "layer": dict(layer=2), "decoder": dict(decoder="dense"),  # "auto" resolves to "gather" on CPU, tensor 1
}


def test_resume_is_refused_when_any_math_setting_changes(tmp_path):
    assert set(MATH_CHANGES) == set(MATH) | set(RESOLVED)
    x = acts()
    train_sae(tiny(tmp_path), ArraySource(x, 32), log=None)
    for name, change in MATH_CHANGES.items():
        with pytest.raises(CheckpointError) as err:
            train_sae(tiny(tmp_path, **change), ArraySource(x, change.get("batch_size", 32)), log=None)
        message = str(err.value)
        assert f"{name} (checkpoint" in message and str(tmp_path / "checkpoints") in message, message
        assert "\n" not in message
    with pytest.raises(CheckpointError, match=r"data \(the training data's content identity differs"):
        train_sae(tiny(tmp_path), ArraySource(acts(seed=1), 32), log=None)
    # What resolves to the same math resumes: "gather" is what "auto" means here.
    log: list[str] = []
    train_sae(tiny(tmp_path, decoder="gather"), ArraySource(x, 32), log=log.append)
    assert log == ["sae: resuming at step 4 (data position 4)"]


def _interrupted(config: SaeConfig, x: np.ndarray, at: int) -> None:
    def stop(step, _):
        if step == at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sae(config, ArraySource(x, 32), log=None, on_step=stop)


def test_non_math_settings_a_moved_out_folder_and_another_mesh_resume(tmp_path):
    x = acts()
    config = tiny(tmp_path / "a", steps=6)
    straight = train_sae(dataclasses.replace(config, out="", checkpoint_every=0), ArraySource(x, 32), log=None)
    _interrupted(config, x, at=3)  # the step-2 checkpoint is committed, step 3 is lost
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    shutil.move(tmp_path / "a", tmp_path / "b")
    log: list[str] = []
    resumed = train_sae(dataclasses.replace(config, out=str(tmp_path / "b"), log_every=1, checkpoint_every=3),
                        ArraySource(x, 32), log=log.append)
    assert log[0] == "sae: resuming at step 2 (data position 2)"
    assert_same_state(resumed.state, straight.state)
    # The layout is not math: resumed on 2 data shards, the same SAE continues (to float rounding).
    log.clear()
    resumed = train_sae(dataclasses.replace(config, out=str(tmp_path / "c"), mesh=(2, 1)), ArraySource(x, 32),
                        log=log.append)
    assert log[0] == "sae: resuming at step 2 (data position 2)"
    for a, b in zip(jax.tree.leaves(resumed.state["params"]), jax.tree.leaves(straight.state["params"])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.fixture
def store(tmp_path):
    """A one-layer (residual 2) store of 48 train documents x 16 tokens."""
    rng = np.random.default_rng(3)
    n, T = 48, 16
    tokens = rng.normal(size=(n, T, D)).astype(np.float32)
    path = write_synthetic_store(tmp_path / "store", pooled={2: tokens.mean(1)}, label_id=np.zeros(n),
                                 split=["train"] * n, tokens={2: tokens}, token_chunk_rows=256, token_read_rows=64)
    state = json.loads((Path(path) / "store.json").read_text())  # a dump's fingerprints: the store's identity
    state["fingerprints"] = {"model": "m-1", "tokenizer": "t-1", "corpus": "c-1", "capture": {"layers": [2]}}
    (Path(path) / "store.json").write_text(json.dumps(state))
    return Path(path)


def _store_source(path: Path, config: SaeConfig) -> StoreSource:
    return StoreSource(ActivationStore(str(path)), config.layer, config.batch_size, config.seed, config.buffer_chunks)


def test_a_moved_store_resumes_and_a_redumped_one_is_refused(store, tmp_path):
    config = tiny(tmp_path / "sae", layer=2, buffer_chunks=4)
    train_sae(config, _store_source(store, config), log=None)
    moved = tmp_path / "moved_store"
    shutil.copytree(store, moved)
    log: list[str] = []
    train_sae(config, _store_source(moved, config), log=log.append)
    assert log and log[0].startswith("sae: resuming at step 4")
    state = json.loads((moved / "store.json").read_text())
    state["fingerprints"]["model"] = "m-2"  # the same shapes dumped from another model
    (moved / "store.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"sae/checkpoints: .* data \(the training data's content"):
        train_sae(config, _store_source(moved, config), log=None)


# ---- (2) one writer


HOLD_LOCK = """
import sys
from emojax.locks import WriterLock
with WriterLock(sys.argv[1], what="SAE output"):
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_a_second_writer_of_the_sae_output_fails_at_once(tmp_path):
    out = tmp_path / "sae"
    child = run_child(HOLD_LOCK, str(out), stdin=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == "held", child.stderr.read()
        with pytest.raises(LockedError) as err:
            train_sae(tiny(out), ArraySource(acts(), 32), log=None)
        assert str(out) in str(err.value) and f"pid {child.pid}" in str(err.value)
        assert not (out / "checkpoints").exists()  # refused before anything was written
    finally:
        child.stdin.close()
        child.wait(timeout=60)
    seen = []
    train_sae(tiny(out), ArraySource(acts(), 32), log=None, on_step=lambda s, m: seen.append(holder(out)))
    assert seen and all(h and h.startswith(f"pid {os.getpid()}:") for h in seen)  # held while training
    assert holder(out) is None  # and released after


def test_the_sae_command_holds_the_lock_through_export_and_writes_atomically(store, tmp_path, monkeypatch):
    import emojax.sae.evaluate as evaluate_module
    from emojax.sae.commands import register

    out = tmp_path / "out"
    held_at_export = []
    real_export = evaluate_module.export_sae

    def export(*args, **kwargs):
        held_at_export.append(holder(out))
        return real_export(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "export_sae", export)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["sae", "--quiet", f"store={store}", f"out={out}", "layer=2", "n_latents=24", "k=3",
                              "batch_size=32", "steps=2", "checkpoint_every=2", "init_sample_tokens=256",
                              "buffer_chunks=4", "sweep=k", "sweep_values=[2,3]"])
    assert args.func(args) == 0
    assert len(held_at_export) == 2 and all(h and h.startswith(f"pid {os.getpid()}:") for h in held_at_export)
    assert json.loads((out / "sae.json").read_text())["tokens"] == 2 * 32
    assert not [p for p in out.rglob(".*tmp-*")]  # no temporary file left behind
    assert load_sae(out / "sae_1").k == 3


# ---- (8) no NaN/inf state saved or exported


class Ordered:
    """Batches of x in order (batch i = rows [32 i, 32 i + 32)), with identity like ArraySource's."""

    def __init__(self, x):
        self.x, self.batch_size, self.d_model = x, 32, x.shape[1]

    def identity(self) -> str:
        return ArraySource(self.x, 32).identity()

    def batches(self, start=0):
        from emojax.store.reader import TokenBatch

        i = start
        while True:
            j = i % (len(self.x) // 32)
            yield TokenBatch(self.x[32 * j:32 * j + 32], np.arange(32 * j, 32 * j + 32), i)
            i += 1


def test_diverged_parameters_stop_training_before_any_checkpoint_holds_them(tmp_path, monkeypatch):
    """SAE 1 of a k sweep turns NaN at step 6 (a checkpoint step): the run stops naming step 6 and SAE 1, and the
    newest checkpoint on disk is step 3's, finite."""
    x = acts()
    x[5 * 32, 0] = 1e6  # batch 5 (step 6) carries a finite marker that triggers the poison below
    real = SaeTrainer._update_one

    def poisoned(self, params, opt, stats, hyper, x_BD, coeff_scale, with_aux):
        params, opt, stats, metrics = real(self, params, opt, stats, hyper, x_BD, coeff_scale, with_aux)
        hit = (jax.numpy.max(x_BD) > 1e3) & (hyper["k"] == 2)
        return {**params, "W_enc": jax.numpy.where(hit, jax.numpy.nan, params["W_enc"])}, opt, stats, metrics

    monkeypatch.setattr(SaeTrainer, "_update_one", poisoned)
    config = tiny(tmp_path, steps=9, checkpoint_every=3, sweep="k", sweep_values=(3, 2),
                  init_sample_tokens=64)  # the input scale from batches 0-1, not the marker's
    seen: list[int] = []
    with pytest.raises(NonFiniteParamsError) as err:
        train_sae(config, Ordered(x), log=None, on_step=lambda s, m: seen.append(s))
    assert err.value.step == 6 and err.value.saes == [1]
    assert "SAE step 6: the parameters of SAE 1 (k=2) of the sweep became NaN/inf" in str(err.value)
    assert seen == [1, 2, 3, 4, 5]
    ckpt = SaeCheckpoints(tmp_path / "checkpoints", 3)
    try:
        assert ckpt.latest_step() == 3
        trainer = SaeTrainer(config, D)
        state, _ = ckpt.restore(trainer.abstract_state)
        assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(state["params"]))
    finally:
        ckpt.close()


def random_sae(seed: int) -> Sae:
    """A TopK SAE with random weights (export does not care how they were trained)."""
    rng = np.random.default_rng(seed)
    params = {"W_enc": rng.normal(size=(D, 24)), "b_enc": rng.normal(size=24), "W_dec": rng.normal(size=(24, D)),
              "b_dec": rng.normal(size=D)}
    return Sae(TopK(k_max=3), {k: v.astype(np.float32) for k, v in params.items()}, {}, 0.7, 3)


def test_export_refuses_non_finite_weights(tmp_path):
    bad = random_sae(0)
    bad.params["W_dec"][4, 1] = np.inf
    with pytest.raises(CheckpointError, match=r"sae_0: refusing to export an SAE with NaN/inf in W_dec"):
        export_sae(bad, tmp_path / "sae_0")
    assert not (tmp_path / "sae_0").exists()


# ---- (9) atomic files, full disk


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_export_is_one_line_and_never_leaves_a_mixed_export(tmp_path, monkeypatch):
    import emojax.sae.export as export_module

    first, second = random_sae(0), random_sae(1)
    folder = export_sae(first, tmp_path / "sae_0")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    x = acts(64, seed=5)

    with monkeypatch.context() as m:  # the weights cannot be written: the old export stays whole
        m.setattr(export_module, "save_file", _enospc)
        with pytest.raises(DiskFullError) as err:
            export_sae(second, folder)
    assert "\n" not in str(err.value) and "sae_weights.safetensors" in str(err.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

    real_write = Path.write_bytes
    with monkeypatch.context() as m:  # the weights land, cfg.json does not: the pair is refused, not mixed
        m.setattr(Path, "write_bytes", lambda p, data: _enospc() if ".cfg.json" in p.name else real_write(p, data))
        with pytest.raises(DiskFullError, match=r"cfg\.json"):
            export_sae(second, folder)
    assert (folder / "cfg.json").read_bytes() == before["cfg.json"]
    with pytest.raises(CheckpointError, match="come from different exports"):
        load_sae(folder)
    export_sae(second, folder)  # rerun after freeing space
    np.testing.assert_allclose(load_sae(folder).reconstruct(x), second.reconstruct(x), rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]


def test_a_full_disk_while_checkpointing_is_one_line(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    monkeypatch.setattr(ocp.CheckpointManager, "save", _enospc)
    with pytest.raises(DiskFullError) as err:
        train_sae(tiny(tmp_path), ArraySource(acts(), 32), log=None)
    assert "\n" not in str(err.value) and f"{tmp_path}/checkpoints/2" in str(err.value)
