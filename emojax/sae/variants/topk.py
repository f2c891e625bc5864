"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations per token; AuxK revives dead latents."""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from emojax.sae.variants.base import (Encoded, Variant, aux_k_loss, decode, decode_selected, keep_top_k, pre_acts,
                                      select_top_k)


@dataclass(frozen=True)
class TopK(Variant):
    k_max: int = 32  # static size of the selection; per-SAE k <= k_max is a mask (k sweeps share one step)
    aux_k: int = 256
    aux_coeff: float = 1 / 32
    groups: int = 1  # latent shards ("tensor" size): local top-k then merge
    gather_decode: bool = False  # training decodes by gathering the k selected rows (make_variant: groups == 1)
    name: str = "topk"

    def encode(self, params, stats, x_BD, hyper):
        return keep_top_k(pre_acts(params, x_BD), hyper["k"], self.k_max, self.groups)

    def encode_train(self, params, stats, x_BD, hyper, dead_F, with_aux):
        pre = pre_acts(params, x_BD)
        if self.gather_decode:
            acts, vals, idx = select_top_k(pre, hyper["k"], self.k_max)
            recon = decode_selected(params, acts, vals, idx)
            counts = jnp.zeros((pre.shape[1],), jnp.float32).at[idx.reshape(-1)].add(
                (vals > 0).reshape(-1).astype(jnp.float32))
        else:  # the dense code and decoder matmul (a threshold top-k: ties at the k-th value are all kept)
            acts = keep_top_k(pre, hyper["k"], self.k_max, self.groups)
            recon, counts = decode(params, acts), None
        aux = aux_k_loss(params, pre, x_BD, recon, dead_F, with_aux, self.aux_k, self.groups)
        return Encoded(acts, jnp.zeros(()), self.aux_coeff * aux, {}, recon=recon, counts=counts)
