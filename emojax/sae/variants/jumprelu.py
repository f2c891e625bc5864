"""JumpReLU SAE (Rajamanoharan et al. 2024): acts = pre * H(pre - theta) with a learned threshold per latent.

The step H has no useful gradient; thresholds learn through straight-through estimators: the pseudo-derivative
of H(z - theta) with respect to theta is -K((z - theta) / eps) / eps, K the rectangle kernel of width 1. The
sparsity penalty is L0 (the expected number of active latents per token). The jump acts on the raw pre-activations
(theta > 0 zeroes the negative ones): a ReLU first would pile every negative pre-activation at z = 0, inside the
thresholds' kernel once theta < bandwidth / 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from emojax.sae.variants.base import Encoded, Variant, pre_acts


def _rect(z):
    return ((z > -0.5) & (z < 0.5)).astype(z.dtype)


@jax.custom_vjp
def step_fn(z, theta, eps):
    """H(z - theta) with the straight-through gradient for theta."""
    return (z > theta).astype(z.dtype)


def _step_fwd(z, theta, eps):
    return step_fn(z, theta, eps), (z, theta, eps)


def _step_bwd(res, g):
    z, theta, eps = res
    d_theta = -(1.0 / eps) * _rect((z - theta) / eps) * g
    return jnp.zeros_like(z), d_theta.sum(0) if d_theta.ndim > theta.ndim else d_theta, jnp.zeros_like(eps)


step_fn.defvjp(_step_fwd, _step_bwd)


@jax.custom_vjp
def jump_relu(z, theta, eps):
    """z * H(z - theta): exact gradient for z above the threshold, straight-through for theta."""
    return z * (z > theta).astype(z.dtype)


def _jump_fwd(z, theta, eps):
    return jump_relu(z, theta, eps), (z, theta, eps)


def _jump_bwd(res, g):
    z, theta, eps = res
    gate = (z > theta).astype(z.dtype)
    d_theta = -(theta / eps) * _rect((z - theta) / eps) * g
    return gate * g, d_theta.sum(0) if d_theta.ndim > theta.ndim else d_theta, jnp.zeros_like(eps)


jump_relu.defvjp(_jump_fwd, _jump_bwd)


@dataclass(frozen=True)
class JumpRelu(Variant):
    bandwidth: float = 0.05  # defaults: SaeConfig.jump_bandwidth / jump_init_threshold
    init_threshold: float = 0.1
    name: str = "jumprelu"

    def init_extra(self, n_latents):
        return {"log_threshold": jnp.full((n_latents,), jnp.log(self.init_threshold), jnp.float32)}

    def encode(self, params, stats, x_BD, hyper):
        pre = pre_acts(params, x_BD)
        return jnp.where(pre > jnp.exp(params["log_threshold"]), pre, 0.0)

    def encode_train(self, params, stats, x_BD, hyper, dead_F, with_aux):
        pre = pre_acts(params, x_BD)
        theta = jnp.exp(params["log_threshold"])
        eps = jnp.asarray(self.bandwidth, pre.dtype)
        acts = jump_relu(pre, theta, eps)
        l0 = jnp.mean(jnp.sum(step_fn(pre, theta, eps), axis=-1))
        return Encoded(acts, l0, jnp.zeros(()), {})
