"""The interface every SAE variant implements, and the pieces they share.

Shapes: B batch (tokens), D d_model, F latents, K selected latents. Parameters of one SAE:
    W_enc [D, F], b_enc [F], W_dec [F, D] (unit-norm rows), b_dec [D]  (+ variant extras, e.g. log_threshold [F])
Inputs are already scaled to unit mean squared norm. `hyper` holds the per-SAE values of a sweep as arrays
(k int32, coeff float32), so one compiled step serves every SAE of the sweep axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Encoded:
    acts: jax.Array | None  # [B, F] dense latent activations, or None when the code is given sparse
    penalty: jax.Array  # scalar sparsity penalty (before the coefficient); 0 for variants with none
    aux_loss: jax.Array  # scalar auxiliary loss, already weighted; 0 for none
    stats: dict = field(default_factory=dict)  # updated variant statistics (e.g. the batchtopk threshold)
    vals: jax.Array | None = None  # [B, K] sparse code: values (0 = inactive) ...
    idx: jax.Array | None = None  # [B, K] ... at these latents

    def decode(self, params: dict) -> jax.Array:
        """Reconstruction [B, D]; a sparse code is decoded by gathering K decoder rows (no [B, F] matmul)."""
        if self.idx is None:
            return decode(params, self.acts)
        return jnp.einsum("bk,bkd->bd", self.vals, params["W_dec"][self.idx]) + params["b_dec"]

    def fired(self, n_latents: int) -> jax.Array:
        """[F] bool: latents active on at least one token."""
        if self.idx is None:
            return jnp.any(self.acts > 0, axis=0)
        return jnp.zeros((n_latents,), bool).at[self.idx.reshape(-1)].max(self.vals.reshape(-1) > 0)

    def l0(self) -> jax.Array:
        return jnp.mean(jnp.sum((self.acts if self.idx is None else self.vals) > 0, axis=-1))


def pre_acts(params: dict, x_BD: jax.Array) -> jax.Array:
    return (x_BD - params["b_dec"]) @ params["W_enc"] + params["b_enc"]


def decode(params: dict, acts_BF: jax.Array) -> jax.Array:
    return acts_BF @ params["W_dec"] + params["b_dec"]


def top_k(pre_BF: jax.Array, k: int, groups: int = 1) -> tuple[jax.Array, jax.Array]:
    """Top-k values and indices [B, k] along F: a local top-k in each of `groups` latent shards, then a merge.

    With groups = the "tensor" mesh size each device ranks only its own latents, and only K values per shard
    cross devices (the merge), instead of the whole [B, F] row.
    """
    B, F = pre_BF.shape
    if groups <= 1 or F % groups or k > F // groups:
        return jax.lax.top_k(pre_BF, k)
    local = pre_BF.reshape(B, groups, F // groups)
    vals, idx = jax.lax.top_k(local, k)  # [B, G, K]
    idx = idx + (jnp.arange(groups) * (F // groups))[None, :, None]
    vals, pick = jax.lax.top_k(vals.reshape(B, groups * k), k)
    return vals, jnp.take_along_axis(idx.reshape(B, groups * k), pick, axis=-1)


def scatter(vals_BK: jax.Array, idx_BK: jax.Array, F: int) -> jax.Array:
    """Dense [B, F] activations holding vals at idx."""
    B = vals_BK.shape[0]
    return jnp.zeros((B, F), vals_BK.dtype).at[jnp.arange(B)[:, None], idx_BK].set(vals_BK)


def aux_k_loss(params: dict, x_BD, recon_BD, dead_F, any_dead, aux_k: int, groups: int) -> jax.Array:
    """AuxK (Gao et al. 2024): the dead latents' top aux_k reconstruct the residual; normalised by its variance.

    Scaled by min(n_dead / aux_k, 1), so it is zero for an SAE with no dead latent (a mask). `any_dead` is one
    flag for the whole sweep (not per SAE, so the cond survives vmap): while nothing is dead anywhere the dense
    pass below is skipped on device, not by a host branch.
    """
    F = dead_F.shape[0]
    aux_k = min(aux_k, F)
    n_dead = dead_F.sum()

    def loss():
        pre_BF = pre_acts(params, x_BD)
        vals, idx = top_k(jnp.where(dead_F, pre_BF, -jnp.inf), aux_k, groups)
        vals = jnp.where(jnp.arange(aux_k) < n_dead, jax.nn.relu(vals), 0.0)
        err_BD = jax.lax.stop_gradient(x_BD - recon_BD)
        e_hat = scatter(vals, idx, F) @ params["W_dec"]
        variance = jnp.sum((err_BD - err_BD.mean(0)) ** 2)
        return jnp.sum((e_hat - err_BD) ** 2) / jnp.maximum(variance, 1e-12)

    value = jax.lax.cond(any_dead, loss, lambda: jnp.zeros((), x_BD.dtype))
    return jnp.minimum(n_dead / aux_k, 1.0) * value


class Variant:
    """One SAE architecture. Subclasses are frozen dataclasses holding only static settings."""

    name: str = ""

    def init_extra(self, n_latents: int) -> dict:
        """Extra trainable parameters beyond W_enc, b_enc, W_dec, b_dec."""
        return {}

    def init_stats(self, n_latents: int) -> dict:
        """Non-trainable statistics the variant updates during training (carried in the train state)."""
        return {}

    def encode_train(self, params, stats, x_BD, hyper, dead_F, any_dead) -> Encoded:
        raise NotImplementedError

    def encode(self, params, stats, x_BD, hyper) -> jax.Array:
        """Inference activations [B, F]."""
        raise NotImplementedError
