"""SAE scales: global-variance FVU, the dead-latent window, sampled held-out documents, JumpReLU's jump on raw
pre-activations, and ReLU-L1's free decoder rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emojax.sae import ArraySource, Sae, SaeConfig, SaeTrainer, evaluate_batches, train_sae
from emojax.sae.metrics import heldout_docs
from emojax.sae.train import input_statistics
from emojax.sae.variants import JumpRelu, ReluL1

D = 6


def test_fvu_divides_by_the_variance_about_the_global_mean():
    """Two documents far apart, each reconstructed as the global mean (0): FVU is 1, not the per-document ratio
    of that error to each document's own small variance."""
    rng = np.random.default_rng(0)
    docs = [(rng.normal(size=(40, D)) + shift).astype(np.float32) for shift in (5.0, -5.0)]
    docs[1] -= np.concatenate(docs).mean(0)  # global mean exactly 0
    blind = Sae(ReluL1(), {"W_enc": np.zeros((D, 3), np.float32), "b_enc": np.zeros(3, np.float32),
                           "W_dec": np.zeros((3, D), np.float32), "b_dec": np.zeros(D, np.float32)})
    x = np.concatenate(docs).astype(np.float64)
    assert evaluate_batches(blind, docs)["fvu"] == pytest.approx((x ** 2).sum() / ((x - x.mean(0)) ** 2).sum(),
                                                                 rel=1e-6)
    assert evaluate_batches(blind, docs)["fvu"] == pytest.approx(1.0, abs=1e-3)


def test_dead_window_is_a_share_of_the_run_with_a_floor():
    assert SaeConfig(steps=30_000, batch_size=4096).dead_window_tokens == int(0.05 * 30_000 * 4096)
    assert SaeConfig(steps=400, batch_size=1024).dead_window_tokens == 100_000  # the floor (the demo's run)
    assert SaeConfig(steps=60, batch_size=256).dead_window_tokens == 60 * 256  # shorter than the floor: the run


def test_a_short_run_reports_latents_that_never_fired_as_dead():
    rng = np.random.default_rng(0)  # tokens along one direction: a few latents win every top-1
    x = (rng.uniform(1, 2, size=(512, 1)) * np.ones(D) + 0.01 * rng.normal(size=(512, D))).astype(np.float32)
    config = SaeConfig(variant="topk", n_latents=64, k=1, batch_size=32, steps=20, lr=1e-3, lr_warmup_steps=1,
                       log_every=20, init_sample_tokens=256)
    result = train_sae(config, ArraySource(x, 32), log=None)
    since = np.asarray(result.state["stats"]["since_fired"][0])
    dead = result.history[-1]["dead_frac"][0]
    assert dead == pytest.approx(np.mean(since >= 20 * 32)) and dead > 0


class _Store:
    def select(self, split):
        return np.arange(100, 200)


def test_heldout_documents_are_a_seeded_uniform_sample():
    a, b = heldout_docs(_Store(), "test", 16, seed=0), heldout_docs(_Store(), "test", 16, seed=1)
    assert len(a) == 16 and np.all(np.diff(a) > 0) and set(a) <= set(range(100, 200))
    assert a.max() > 115  # not the first 16
    np.testing.assert_array_equal(a, heldout_docs(_Store(), "test", 16, seed=0))
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(heldout_docs(_Store(), "test", 500), np.arange(100, 200))


def test_jumprelu_jumps_on_raw_pre_activations():
    """No ReLU before the jump: a negative pre-activation is not moved to 0, so it reaches the threshold's
    straight-through kernel only when it lies within bandwidth / 2 of theta."""
    variant = JumpRelu(bandwidth=0.001)
    theta = 0.0002  # below bandwidth / 2: a ReLU would put every negative pre-activation inside the kernel
    params = {"W_enc": jnp.eye(2), "b_enc": jnp.zeros(2), "W_dec": jnp.eye(2), "b_dec": jnp.zeros(2),
              "log_threshold": jnp.full((2,), np.log(theta), jnp.float32)}
    x = jnp.asarray([[-0.0004, -0.0001]], jnp.float32)  # latent 0 outside the kernel, latent 1 inside

    def l0(log_threshold):
        enc = variant.encode_train({**params, "log_threshold": log_threshold}, {}, x, {}, None, False)
        return enc.penalty

    grad = np.asarray(jax.grad(l0)(params["log_threshold"]))
    assert grad[0] == 0.0
    assert grad[1] == pytest.approx(-theta / 0.001, rel=1e-3)  # d/dlog(theta) of H = -theta K / eps
    acts = np.asarray(variant.encode(params, {}, jnp.asarray([[0.5, -0.5]]), {}))
    np.testing.assert_array_equal(acts, [[0.5, 0.0]])


def test_relu_l1_rows_are_free_and_the_penalty_weighs_them():
    x = np.random.default_rng(0).normal(size=(256, D)).astype(np.float32)
    config = SaeConfig(variant="relu_l1", n_latents=16, batch_size=64, steps=5, lr=1e-2, lr_warmup_steps=0,
                       sparsity_coeff=0.1)
    trainer = SaeTrainer(config, D)
    scale, b_dec = input_statistics(x)
    state, _ = trainer.run_step(trainer.init(b_dec), x[:64], scale)
    params = jax.tree.map(lambda v: v[0], state["params"])
    assert np.abs(np.linalg.norm(params["W_dec"], axis=-1) - 1.0).max() > 1e-4  # not projected back
    scaled = {**params, "W_dec": params["W_dec"] * 3.0}
    xs = jnp.asarray(x[:64] * scale)
    p1 = ReluL1().encode_train(params, {}, xs, {}, None, False).penalty
    p3 = ReluL1().encode_train(scaled, {}, xs, {}, None, False).penalty
    assert float(p3) == pytest.approx(3.0 * float(p1), rel=1e-5)


def test_sparsity_coefficient_defaults_per_variant_and_is_recorded_resolved():
    from emojax.sae.config import DEFAULT_SPARSITY
    from emojax.sae.fingerprint import fingerprint

    for variant, coeff in DEFAULT_SPARSITY.items():
        config = SaeConfig(variant=variant, k=4, n_latents=16)
        assert config.sparsity_coeff == coeff
        assert fingerprint(config, 8, None, "data")["sparsity_coeff"] == coeff  # a later default change is seen
    assert SaeConfig(variant="relu_l1", sparsity_coeff=0.5).sparsity_coeff == 0.5
    assert SaeConfig(variant="jumprelu", sweep="sparsity_coeff", sweep_values=(0.01, 0.03)).values(
        "sparsity_coeff") == (0.01, 0.03)


def test_a_coefficient_on_the_wrong_scale_kills_relu_l1():
    """Why the coefficient is defined on the scaled inputs: 5, SAELens's L1 default for inputs of norm sqrt(d),
    silences every latent here (a token's whole squared error is about 1), where the default keeps L0 > 1."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4096, 16)).astype(np.float32)
    l0 = {}
    for coeff in (5.0, None):
        config = SaeConfig(variant="relu_l1", n_latents=32, batch_size=128, steps=150, lr=1e-2, lr_warmup_steps=10,
                           log_every=0, init_sample_tokens=1024, sparsity_coeff=coeff)
        sae = train_sae(config, ArraySource(x, 128), log=None).sae(0)
        l0[coeff] = float((np.asarray(sae.encode(x[:1024])) > 0).sum(axis=1).mean())
    assert l0[5.0] < 0.5 < 2.0 < l0[None], l0
