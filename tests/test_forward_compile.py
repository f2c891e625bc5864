"""Compilation behaviour: one trace per capture set, none for new intervention values, and a depth-independent
graph."""

import numpy as np

import emojax
from emojax.models import Interventions
from emojax.models.config import ModelConfig

CONFIG = ModelConfig(architecture="llama", vocab_size=97, d_model=40, n_layers=4, n_heads=4, n_kv_heads=2,
                     head_dim=10, d_mlp=64)


def _tokens(B=2, T=7, seed=0):
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (B, T)).astype(np.int32)


def test_new_intervention_values_and_inputs_do_not_recompile():
    lm = emojax.random_model(CONFIG)
    rng = np.random.default_rng(1)
    for step in range(4):
        iv = (Interventions.empty(2, 4, 40).add(rng.normal(size=40), layers=(1, 3), strengths=rng.normal(size=2))
              .ablate(rng.normal(size=40), layers=(2,), mean=rng.normal())
              .patch_at(rng.normal(size=(2, 7, 40)), 2))
        lm(_tokens(seed=step), capture=(1, 3), interventions=iv)
    assert lm.trace_count == 1
    lm(_tokens(), capture=(1, 3))  # no steering: a different program
    lm(_tokens(seed=9), capture=(1, 3))
    assert lm.trace_count == 2
    lm(_tokens(), capture=(2,))  # a different capture set is a different program
    assert lm.trace_count == 3


def _hlo_lines(n_layers: int) -> int:
    lm = emojax.random_model(CONFIG.replace(n_layers=n_layers, layer_windows=()))
    tokens = _tokens()
    fn = lm._forward_fn(((1,), True), None)
    mask = np.ones_like(tokens)
    return len(fn.lower(lm.params, tokens, mask, np.zeros(tokens.shape, np.float32), None).as_text().splitlines())


def test_program_size_does_not_grow_with_depth():
    # Layers run under lax.scan: the program for 24 layers is the program for 3 layers.
    assert _hlo_lines(24) == _hlo_lines(3)
