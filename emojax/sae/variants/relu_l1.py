"""ReLU SAE with an L1 penalty weighted by the decoder row norms (Anthropic, April 2024 update).

The rows are free (the trainer does not project them to unit norm): the penalty sum_i f_i |W_dec[i]| does not
change when a latent trades activation scale for row norm, so it cannot be dodged that way."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from emojax.sae.variants.base import Encoded, Variant, pre_acts


@dataclass(frozen=True)
class ReluL1(Variant):
    name: str = "relu_l1"
    unit_decoder = False

    def encode(self, params, stats, x_BD, hyper):
        return jax.nn.relu(pre_acts(params, x_BD))

    def encode_train(self, params, stats, x_BD, hyper, dead_F, with_aux):
        acts = self.encode(params, stats, x_BD, hyper)
        norms_F = jnp.linalg.norm(params["W_dec"], axis=-1)
        penalty = jnp.mean(jnp.sum(acts * norms_F, axis=-1))
        return Encoded(acts, penalty, jnp.zeros(()), {})
