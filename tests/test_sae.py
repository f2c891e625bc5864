"""Sparse dictionaries: ground-truth recovery, sharded == single device, exact resume after SIGKILL, NaN input
reports, SAELens-style export round trip, metrics."""

from __future__ import annotations

import dataclasses
import re
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dump_helpers import run_child

from emojax.errors import ConfigError
from emojax.sae import (ArraySource, NonFiniteBatchError, SaeConfig, SaeTrainer, bank_max_cosine, export_sae,
                        load_sae, reconstruction_metrics, train_sae)
from emojax.sae.sharding import sae_mesh
from emojax.sae.train import input_statistics
from emojax.sae.variants import make_variant
from emojax.sae.variants.base import decode, decode_selected, select_top_k

D, ATOMS, ACTIVE = 48, 256, 4


def ground_truth(n: int = 8192, seed: int = 0, noise: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """x [n, D] = sum of ACTIVE of ATOMS random unit atoms with coefficients in [0.5, 1.5], plus noise."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(ATOMS, D))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    idx = np.argsort(rng.random((n, ATOMS)), axis=1)[:, :ACTIVE]
    coef = rng.uniform(0.5, 1.5, size=(n, ACTIVE))
    x = np.einsum("nk,nkd->nd", coef, atoms[idx]) + noise * rng.normal(size=(n, D))
    return x.astype(np.float32), atoms


GT = dict(n_latents=ATOMS, batch_size=256, steps=300, lr=1e-2, lr_warmup_steps=20, dead_after_tokens=256 * 20,
          aux_k=32, log_every=0, init_sample_tokens=4096)
# relu_l1 and jumprelu train with their default sparsity coefficients, thresholds and bandwidth (SaeConfig), for
# longer: a penalty finds the atoms more slowly than a top-k selection.
VARIANTS = {
    "topk": dict(variant="topk", sweep="k", sweep_values=(4, 32)),  # two SAEs in one pass over the data
    "batchtopk": dict(variant="batchtopk", k=32),
    "relu_l1": dict(variant="relu_l1", steps=2000),
    "jumprelu": dict(variant="jumprelu", steps=2000),
}
PENALISED = ("relu_l1", "jumprelu")


@pytest.fixture(scope="module")
def data():
    return ground_truth()


@pytest.fixture(scope="module")
def trained(data):
    x, _ = data
    return {name: train_sae(SaeConfig(**{**GT, **changes}), ArraySource(x, 256), log=None)
            for name, changes in VARIANTS.items()}


def _unit(w):
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def test_topk_recovers_the_atoms(data, trained):
    x, atoms = data
    sae = trained["topk"].sae(0)  # k = 4, the true number of active atoms
    mean_max_cos = np.abs(atoms @ _unit(sae.decoder_rows()).T).max(axis=1).mean()
    assert mean_max_cos >= 0.9, mean_max_cos
    assert reconstruction_metrics(x[:2048], sae.reconstruct(x[:2048]), sae.encode(x[:2048]))["l0"] == 4


@pytest.mark.parametrize("name", PENALISED)
def test_penalised_variants_find_the_atoms_at_their_default_coefficients(data, trained, name):
    """At the default coefficient the penalty neither kills the latents nor is too weak to sparsify: L0 near the
    4 planted atoms a token, nearly every atom learned as a decoder row. (The L1 shrinkage and the thresholds cost
    reconstruction: FVU 0.15-0.2 where top-k with the true k reaches 0.05.)"""
    x, atoms = data
    sae = trained[name].sae(0)
    m = reconstruction_metrics(x[:4096], sae.reconstruct(x[:4096]), sae.encode(x[:4096]))
    assert 2 <= m["l0"] <= 4 * ACTIVE, m
    found = np.abs(atoms @ _unit(sae.decoder_rows()).T).max(axis=1)
    assert np.mean(found > 0.9) >= 0.85, np.mean(found > 0.9)
    assert m["fvu"] < 0.25 and m["cosine"] > 0.85, m


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_reconstructs(data, trained, name):
    x, _ = data
    result = trained[name]
    sae = result.sae(result.config.n_sae - 1)
    m = reconstruction_metrics(x[:4096], sae.reconstruct(x[:4096]), sae.encode(x[:4096]))
    bound = 0.25 if name in PENALISED else 0.1
    assert m["fvu"] < bound, m
    assert m["cosine"] > 0.85, m
    norms = np.linalg.norm(result.state["params"]["W_dec"], axis=-1)
    if name == "relu_l1":  # free rows: its penalty weighs each latent by its row norm
        assert np.abs(norms - 1.0).max() > 0.1
    else:
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)  # unit decoder rows


@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_loads_back_with_the_same_reconstructions(data, trained, name, tmp_path):
    x = data[0][:512] * 3.0  # raw units differ from the training scale: the folded scale is exercised
    sae = trained[name].sae(0)
    folder = export_sae(sae, tmp_path / name, hook_layer=2)
    assert {p.name for p in folder.iterdir()} == {"cfg.json", "sae_weights.safetensors"}
    back = load_sae(folder)
    np.testing.assert_array_equal(np.asarray(back.encode(x)) > 0, np.asarray(sae.encode(x)) > 0)
    np.testing.assert_allclose(back.reconstruct(x), sae.reconstruct(x), rtol=1e-5, atol=1e-5)


def test_sweep_axis_trains_independent_saes(data, trained):
    x, _ = data
    result = trained["topk"]
    l0 = [reconstruction_metrics(x[:1024], s.reconstruct(x[:1024]), s.encode(x[:1024]))["l0"]
          for s in (result.sae(0), result.sae(1))]
    assert l0 == [4, 32]


@pytest.mark.parametrize("variant", ["topk", "batchtopk"])
def test_auxk_runs_only_while_a_latent_is_dead_and_trains_the_dead(data, variant):
    """The step's AuxK branch: zero loss while nothing is dead; once latents are dead, their encoder columns
    move differently from a run without AuxK (aux_coeff 0), i.e. the auxiliary loss reaches them."""
    x = data[0]

    def two_steps(aux_coeff):
        config = SaeConfig(variant=variant, n_latents=64, k=4, batch_size=128, steps=100, lr=1e-3,
                           lr_warmup_steps=0, dead_after_tokens=10 ** 5, aux_k=8, aux_coeff=aux_coeff, mesh=(1, 1))
        trainer = SaeTrainer(config, D, sae_mesh(config.mesh))
        scale, b_dec = input_statistics(x[:1024])
        state, first = trainer.run_step(trainer.init(b_dec), x[:128], scale)
        state["stats"]["since_fired"] = state["stats"]["since_fired"].at[0, :8].set(10 ** 6)  # 8 dead latents
        state, second = trainer.run_step(state, x[128:256], scale)
        return float(first["aux_loss"][0]), float(second["aux_loss"][0]), np.asarray(state["params"]["W_enc"][0])

    first, second, with_aux = two_steps(1 / 32)
    assert first == 0.0 and second > 0.0
    _, _, without = two_steps(0.0)
    assert np.abs(with_aux[:, :8] - without[:, :8]).max() > 1e-6  # the dead latents' columns
    np.testing.assert_allclose(with_aux[:, 8:], without[:, 8:], atol=1e-6)  # AuxK reaches only dead latents


# ---- sharding


SHARD = dict(variant="topk", n_latents=128, k=8, batch_size=64, steps=20, lr=3e-3, lr_warmup_steps=5,
             dead_after_tokens=64 * 3, aux_k=16, sweep="k", sweep_values=(4, 8))


def _run_steps(config: SaeConfig, x: np.ndarray) -> list[dict]:
    trainer = SaeTrainer(config, D, sae_mesh(config.mesh))
    scale, b_dec = input_statistics(x[:1024])
    state = trainer.init(b_dec)
    params = []
    for batch, _ in zip(ArraySource(x, config.batch_size).batches(0), range(config.steps)):
        state, _ = trainer.run_step(state, batch.acts, scale)
        params.append(jax.device_get(state["params"]))
    return params


@pytest.mark.parametrize("variant", ["topk", pytest.param("batchtopk", marks=pytest.mark.slow)])
def test_sharded_training_matches_single_device(data, variant):
    x = data[0]
    base = SaeConfig(**{**SHARD, "variant": variant})
    single = _run_steps(base, x)
    for mesh in ((8, 1), (2, 4)):
        sharded = _run_steps(dataclasses.replace(base, mesh=mesh), x)
        for step, (a, b) in enumerate(zip(single, sharded)):
            for key in a:
                np.testing.assert_allclose(b[key], a[key], atol=1e-4, rtol=1e-4,
                                           err_msg=f"mesh {mesh} step {step + 1} {key}")


def test_gathered_and_dense_decoders_train_the_same_sae(data):
    """decoder "gather" (the CPU default: the K selected decoder rows per token) and "dense" (the [B, F] code times
    W_dec) agree step for step, a k sweep included; so do their gradients, on one batch, at a tight tolerance."""
    x = data[0]
    gathered = SaeConfig(**{**SHARD, "decoder": "gather"})
    assert SaeTrainer(gathered, D).variant.gather_decode
    runs = {name: _run_steps(dataclasses.replace(gathered, decoder=name), x) for name in ("gather", "dense")}
    for step, (a, b) in enumerate(zip(runs["gather"], runs["dense"])):
        for key in a:
            np.testing.assert_allclose(a[key], b[key], atol=1e-5, rtol=1e-5, err_msg=f"step {step + 1} {key}")

    rng = np.random.default_rng(1)
    params = {"W_dec": jnp.asarray(rng.normal(size=(128, D)), jnp.float32),
              "b_dec": jnp.asarray(rng.normal(size=(D,)), jnp.float32)}
    pre = jnp.asarray(rng.normal(size=(16, 128)), jnp.float32)
    probe = jnp.asarray(rng.normal(size=(16, D)), jnp.float32)

    def loss(pre, params, gather):
        acts, vals, idx = select_top_k(pre, jnp.int32(6), 8)  # k 6 of k_max 8: two masked slots
        recon = decode_selected(params, acts, vals, idx) if gather else decode(params, acts)
        return jnp.sum(recon * probe)

    (g_pre, g_params), (d_pre, d_params) = (jax.grad(loss, (0, 1))(pre, params, gather) for gather in (True, False))
    np.testing.assert_allclose(loss(pre, params, True), loss(pre, params, False), rtol=1e-5)
    np.testing.assert_allclose(g_pre, d_pre, atol=1e-5)
    assert int(np.sum(np.asarray(g_pre) != 0)) <= 16 * 6  # only the selected latents get a gradient
    for key in params:
        np.testing.assert_allclose(g_params[key], d_params[key], atol=1e-4, rtol=1e-5)


def test_decoder_choice_follows_the_platform_and_refuses_what_cannot_gather():
    config = SaeConfig(**SHARD)  # decoder "auto"
    assert make_variant(config, groups=1, platform="cpu").gather_decode
    assert not make_variant(config, groups=1, platform="gpu").gather_decode
    assert not make_variant(config, groups=4, platform="cpu").gather_decode
    assert not make_variant(dataclasses.replace(config, decoder="gather"), groups=4).gather_decode  # mesh given
    with pytest.raises(ConfigError, match="sae.decoder='gather' needs variant topk and mesh tensor=1"):
        SaeConfig(**{**SHARD, "decoder": "gather", "mesh": (2, 4)})
    with pytest.raises(ConfigError, match="sae.decoder='sparse' is not one of"):
        SaeConfig(**{**SHARD, "decoder": "sparse"})


# ---- crashes and bad input

KILL_CHILD = """
import sys, time
from test_sae import ground_truth, kill_config
from emojax.sae import ArraySource, train_sae
def on_step(step, metrics):
    print("step", step, flush=True)
    time.sleep(0.03)
train_sae(kill_config(sys.argv[1]), ArraySource(ground_truth(2048)[0], 64), log=None, on_step=on_step)
"""


def kill_config(out: str) -> SaeConfig:
    return SaeConfig(variant="topk", n_latents=96, k=6, batch_size=64, steps=40, lr=3e-3, lr_warmup_steps=5,
                     dead_after_tokens=64 * 4, aux_k=16, checkpoint_every=10, log_every=0, out=out,
                     init_sample_tokens=1024)


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    x = ground_truth(2048)[0]
    out = tmp_path / "killed"
    child = run_child(KILL_CHILD, str(out))
    deadline = time.time() + 120
    for line in child.stdout:  # kill mid-run, once a checkpoint past the first is committed
        if line.startswith("step") and int(line.split()[1]) >= 17:
            break
        assert time.time() < deadline, "child did not reach step 17"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    committed = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert committed and max(committed) < 40, committed
    log: list[str] = []
    resumed = train_sae(kill_config(str(out)), ArraySource(x, 64), log=log.append)
    assert log and log[0].startswith("sae: resuming at step")
    straight = train_sae(dataclasses.replace(kill_config(str(tmp_path / "straight")), checkpoint_every=0),
                         ArraySource(x, 64), log=None)
    for key in ("params", "opt", "stats"):
        for a, b in zip(jax.tree.leaves(resumed.state[key]), jax.tree.leaves(straight.state[key])):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), key  # bitwise


def test_log_lines_print_floats_at_4_significant_digits(data):
    lines: list[str] = []
    train_sae(SaeConfig(**{**GT, "steps": 4, "log_every": 2, "sweep": "k", "sweep_values": (4, 32)}),
              ArraySource(data[0], 256), log=lines.append)
    assert [line.split(":")[0] for line in lines] == ["sae step 2", "sae step 4"]
    assert "mse=[" in lines[0] and "dead_frac=[" in lines[0]
    floats = [f for line in lines for f in re.findall(r"\d+\.\d+(?:e[-+]\d+)?", line)]
    assert floats and all(len(f.split("e")[0].replace(".", "").lstrip("0")) <= 4 for f in floats), lines


def test_nan_in_a_batch_stops_training_with_its_rows(tmp_path):
    x = ground_truth(2048)[0]
    bad = x.copy()
    bad[[77, 1500]] = np.nan
    bad[901, 3] = np.inf
    config = dataclasses.replace(kill_config(str(tmp_path / "nan")), steps=30, checkpoint_every=5)
    seen: list[int] = []
    with pytest.raises(NonFiniteBatchError) as err:
        train_sae(config, ArraySource(bad, 64), log=None, on_step=lambda s, m: seen.append(s))
    first_bad = next(b for b in ArraySource(bad, 64).batches(0) if not np.isfinite(b.acts).all())
    want = sorted(int(r) for r in first_bad.rows if r in (77, 1500, 901))
    assert sorted(err.value.rows.tolist()) == want and err.value.step == first_bad.index + 1
    assert "store rows" in str(err.value) and str(want[0]) in str(err.value)
    assert seen == list(range(1, first_bad.index + 1))  # nothing after the bad step was reported as trained
    # No checkpoint holds the bad batch, and the saved state is finite.
    steps = [int(p.name) for p in (tmp_path / "nan" / "checkpoints").iterdir() if p.name.isdigit()]
    assert all(s <= first_bad.index for s in steps)


def test_bank_max_cosine_finds_planted_directions(data, trained):
    from emojax.concepts.bank import ConceptBank

    sae = trained["topk"].sae(0)
    rows = sae.decoder_rows()
    vectors = np.stack([rows[7] * 2.0, rows[100] + 1e-3])[:, None, :].astype(np.float32)
    bank = ConceptBank(names=("calm", "afraid"), layers=(3,), vectors=vectors, raw=vectors,
                       resid_norm=np.ones(1, np.float32))
    got = bank_max_cosine(bank, 3, sae)
    assert got["calm"][1] == 7 and got["calm"][0] == pytest.approx(1.0, abs=1e-5)
    assert got["afraid"][1] == 100


# ---- the store, the command line and the spliced metrics


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    from dump_helpers import dump_config, make_corpus

    from emojax.store import dump

    root = tmp_path_factory.mktemp("sae_store")
    corpus = make_corpus(root / "corpus")
    dump(dump_config(corpus, root / "acts"), show_progress=False, log=lambda *_: None)
    return root / "acts"


@pytest.mark.slow  # the dump of a small corpus dominates (~30 s on 2 cores)
def test_sae_command_trains_on_the_store_and_exports(store_path, tmp_path):
    import argparse
    import json

    from emojax.sae.commands import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    config = tmp_path / "run.yaml"
    config.write_text(f"sae:\n  variant: topk\n  n_latents: 64\n  k: 4\n  batch_size: 64\n  steps: 6\n"
                      f"  lr_warmup_steps: 2\n  layer: 2\n  store: {store_path}\n  checkpoint_every: 3\n"
                      f"  init_sample_tokens: 256\n  buffer_chunks: 4\n")
    args = parser.parse_args(["sae", "--config", str(config), "--quiet", f"out={tmp_path / 'out'}",
                              "sweep=k", "sweep_values=[2,4]"])
    assert args.func(args) == 0
    summary = json.loads((tmp_path / "out" / "sae.json").read_text())
    assert len(summary["saes"]) == 2 and summary["tokens"] == 6 * 64
    sae = load_sae(tmp_path / "out" / "sae_1")
    assert sae.n_latents == 64 and sae.k == 4


@pytest.mark.slow
def test_spliced_metrics_on_held_out_documents(store_path):
    import emojax
    from emojax.sae import Sae, heldout_tokens, spliced_metrics
    from emojax.sae.variants import ReluL1
    from emojax.store import ActivationStore

    store = ActivationStore(str(store_path))
    tokens, mask = heldout_tokens(store, split="test", max_docs=4, max_len=64)
    lm = emojax.load_model("random:tiny")
    D = store.d_model
    eye = np.eye(D, dtype=np.float32)
    # relu(x) - relu(-x) = x: a 2D-latent ReLU SAE that reconstructs exactly.
    exact = Sae(ReluL1(), {"W_enc": np.concatenate([eye, -eye], 1), "b_enc": np.zeros(2 * D, np.float32),
                           "W_dec": np.concatenate([eye, -eye], 0), "b_dec": np.zeros(D, np.float32)})
    m = spliced_metrics(lm, exact, 1, tokens, mask)
    assert m["ce_spliced"] == pytest.approx(m["ce_clean"], abs=1e-4) and m["kl"] == pytest.approx(0, abs=1e-5)
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3) and m["ce_zero"] != m["ce_clean"]
    blind = dataclasses.replace(exact, params={**exact.params, "W_dec": exact.params["W_dec"] * 0})
    m = spliced_metrics(lm, blind, 1, tokens, mask)  # outputs b_dec = 0: the zero ablation
    assert m["ce_spliced"] == pytest.approx(m["ce_zero"], abs=1e-4) and m["kl"] > 0
    assert m["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-3)
