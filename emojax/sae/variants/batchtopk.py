"""BatchTopK SAE (Bussmann et al. 2024): the k * B largest activations over the whole batch are kept.

At inference a token cannot see its batch, so a single threshold replaces the selection: the EMA, over
training steps, of the smallest activation the batch selection kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from emojax.sae.variants.base import Encoded, Variant, aux_k_loss, decode, pre_acts


@dataclass(frozen=True)
class BatchTopK(Variant):
    k_max: int = 32
    aux_k: int = 256
    aux_coeff: float = 1 / 32
    threshold_decay: float = 0.99
    groups: int = 1
    name: str = "batchtopk"

    def init_stats(self, n_latents):
        return {"threshold": jnp.zeros((), jnp.float32), "threshold_steps": jnp.zeros((), jnp.int32)}

    def encode(self, params, stats, x_BD, hyper):
        pre = pre_acts(params, x_BD)
        return jnp.where(pre > stats["threshold"], jax.nn.relu(pre), 0.0)

    def encode_train(self, params, stats, x_BD, hyper, dead_F, with_aux):
        pre = pre_acts(params, x_BD)
        B = pre.shape[0]
        relu = jax.nn.relu(pre)
        vals, _ = jax.lax.top_k(relu.reshape(-1), self.k_max * B)
        cut = vals[jnp.clip(hyper["k"] * B - 1, 0, self.k_max * B - 1)]  # the (k*B)-th largest
        keep = (relu >= cut) & (relu > 0)
        acts = jnp.where(keep, relu, 0.0)
        # Smallest kept activation of this batch, folded into the inference threshold.
        smallest = jax.lax.stop_gradient(jnp.min(jnp.where(keep, relu, jnp.inf)))
        smallest = jnp.where(jnp.isfinite(smallest), smallest, stats["threshold"])
        first = stats["threshold_steps"] == 0
        threshold = jnp.where(first, smallest,
                              self.threshold_decay * stats["threshold"] + (1 - self.threshold_decay) * smallest)
        aux = aux_k_loss(params, pre, x_BD, decode(params, acts), dead_F, with_aux, self.aux_k, self.groups)
        new = {"threshold": threshold, "threshold_steps": stats["threshold_steps"] + 1}
        return Encoded(acts, jnp.zeros(()), self.aux_coeff * aux, new)
