"""The interface every SAE variant implements, and the pieces they share.

Shapes: B batch (tokens), D d_model, F latents, J selected latent slots. Parameters of one SAE:
    W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D]  (+ variant extras, e.g. log_threshold [F])
The trainer keeps decoder rows unit-norm for variants with `unit_decoder` (all but relu_l1, whose penalty weighs
each latent by its row norm instead).
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
    acts: jax.Array  # [B, F] dense latent activations
    penalty: jax.Array  # scalar sparsity penalty (before the coefficient); 0 for variants with none
    aux_loss: jax.Array  # scalar auxiliary loss, already weighted; 0 for none
    stats: dict = field(default_factory=dict)  # updated variant statistics (e.g. the batchtopk threshold)
    recon: jax.Array | None = None  # [B, D] the reconstruction, where the variant computed it already
    counts: jax.Array | None = None  # [F] fire counts, where the variant computed them already

    def decode(self, params: dict) -> jax.Array:
        return decode(params, self.acts) if self.recon is None else self.recon

    def fire_counts(self) -> jax.Array:
        """[F] float32: tokens of the batch on which each latent is active (one pass gives L0 and `fired`)."""
        if self.counts is not None:
            return self.counts
        return jnp.sum(self.acts > 0, axis=0, dtype=jnp.float32)


def pre_acts(params: dict, x_BD: jax.Array) -> jax.Array:
    """(x - b_dec) W_enc + b_enc, computed as x W_enc + (b_enc - b_dec W_enc): the b_dec gradient is then a
    [F] x [F, D] product instead of a [B, F] x [F, D] matmul (one of the step's six big matmuls saved)."""
    return _encode_matmul(x_BD, params["W_enc"]) + (params["b_enc"] - params["b_dec"] @ params["W_enc"])


@jax.custom_vjp
def _encode_matmul(x_BD, W_DF):
    return x_BD @ W_DF


def _encode_matmul_fwd(x_BD, W_DF):
    return x_BD @ W_DF, (x_BD, W_DF)


def _encode_matmul_bwd(res, g_BF):
    # d W = x^T g with x^T materialised first: left to itself XLA folds the transpose into the matmul, and its
    # CPU backend runs that [B, D]^T x [B, F] form at 0.6x the speed of a plain [D, B] x [B, F] one (61 ms vs
    # 36 ms at B=1024, D=512, F=4096). The input's cotangent is never used by the trainer (XLA drops it).
    x_BD, W_DF = res
    return g_BF @ W_DF.T, jax.lax.optimization_barrier(x_BD.T) @ g_BF


_encode_matmul.defvjp(_encode_matmul_fwd, _encode_matmul_bwd)


def decode(params: dict, acts_BF: jax.Array) -> jax.Array:
    return acts_BF @ params["W_dec"] + params["b_dec"]


def top_k(pre_BF: jax.Array, k: int, groups: int = 1) -> tuple[jax.Array, jax.Array]:
    """Top-k values and indices [B, k] along F: a local top-k in each of `groups` latent shards, then a merge.

    With groups = the "tensor" mesh size each device ranks only its own latents, and only k values per shard
    cross devices (the merge), instead of the whole [B, F] row.
    """
    B, F = pre_BF.shape
    if groups <= 1 or F % groups or k > F // groups:
        return jax.lax.top_k(pre_BF, k)
    local = pre_BF.reshape(B, groups, F // groups)
    vals, idx = jax.lax.top_k(local, k)  # [B, groups, k]
    idx = idx + (jnp.arange(groups) * (F // groups))[None, :, None]
    vals, pick = jax.lax.top_k(vals.reshape(B, groups * k), k)
    return vals, jnp.take_along_axis(idx.reshape(B, groups * k), pick, axis=-1)


def keep_top_k(pre_BF: jax.Array, k: jax.Array, k_max: int, groups: int = 1) -> jax.Array:
    """Dense [B, F] activations: relu(pre) where pre is among the row's k largest (k <= k_max, traced), else 0.

    The selection is a threshold (the k-th largest value) compared elementwise, not a scatter of the top-k values
    into zeros: one fused pass, and its gradient is the same mask. Ties at the threshold keep every tied latent.
    The barrier keeps XLA from rewriting a top-k whose indices go unused into a full sort: with a constant k
    that rewrite made this 30x slower on CPU (367 vs 14 ms for 512 x 4096).
    """
    vals = jax.lax.optimization_barrier(top_k(jax.lax.stop_gradient(pre_BF), k_max, groups)[0])
    kth = jnp.take(vals, jnp.clip(k - 1, 0, k_max - 1), axis=1)[:, None]
    return jnp.where((pre_BF >= kth) & (pre_BF > 0), pre_BF, 0.0)


def select_top_k(pre_BF: jax.Array, k: jax.Array, k_max: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Exactly the k (<= k_max, traced) largest positive entries of each row, ties to the lower index.

    Returns the dense activations [B, F] (relu(pre) there, else 0; differentiable in pre), and the same
    selection as values and indices [B, k_max], with zeros in the slots beyond k or not positive. Both forms
    hold the same numbers, so a decoder may read either (see decode_selected).
    """
    vals, idx = jax.lax.optimization_barrier(jax.lax.top_k(jax.lax.stop_gradient(pre_BF), k_max))
    live = (vals > 0) & (jnp.arange(k_max) < k)
    B, F = pre_BF.shape
    mask = jnp.zeros((B, F), bool).at[jnp.arange(B)[:, None], idx].set(live)
    return jnp.where(mask, pre_BF, 0.0), jnp.where(live, vals, 0.0), idx


def decode_selected(params: dict, acts_BF: jax.Array, vals_BJ: jax.Array, idx_BJ: jax.Array) -> jax.Array:
    """decode(params, acts) computed from the selection (vals, idx) that acts holds: a gather of J decoder rows
    per token instead of a [B, F] x [F, D] matmul (on CPU 2.4 vs 36 ms at B 1024, F 4096, D 512, J 32).

    The backward stays dense (the gradients w.r.t. acts and W_dec are the matmuls of `decode`): on CPU a gather-
    dot for the J selected gradients and a scatter-add for W_dec both measured slower than those matmuls.
    """
    return _gather_decode(acts_BF, vals_BJ, idx_BJ, params["W_dec"]) + params["b_dec"]


@jax.custom_vjp
def _gather_decode(acts_BF, vals_BJ, idx_BJ, W_FD):
    out = jnp.zeros((vals_BJ.shape[0], W_FD.shape[1]), W_FD.dtype)
    for j in range(vals_BJ.shape[1]):  # one [B]-row gather per slot: XLA's CPU gather is fast in this form,
        out = out + vals_BJ[:, j:j + 1] * W_FD[idx_BJ[:, j]]  # and 20x slower as one gather of [B, J] rows
    return out


def _gather_decode_fwd(acts_BF, vals_BJ, idx_BJ, W_FD):
    return _gather_decode(acts_BF, vals_BJ, idx_BJ, W_FD), (acts_BF, W_FD)


def _gather_decode_bwd(res, g_BD):
    acts_BF, W_FD = res
    # W^T materialised first: XLA's CPU backend runs the [B, D] x [F, D]^T form of this matmul ~1.5x slower.
    d_acts_BF = g_BD @ jax.lax.optimization_barrier(W_FD.T)
    d_W_FD = jax.lax.dot_general(acts_BF, g_BD, (((0,), (0,)), ((), ())))
    return d_acts_BF, None, None, d_W_FD


_gather_decode.defvjp(_gather_decode_fwd, _gather_decode_bwd)


def scatter(vals_BJ: jax.Array, idx_BJ: jax.Array, F: int) -> jax.Array:
    """Dense [B, F] activations holding vals at idx."""
    B = vals_BJ.shape[0]
    return jnp.zeros((B, F), vals_BJ.dtype).at[jnp.arange(B)[:, None], idx_BJ].set(vals_BJ)


def aux_k_loss(params: dict, pre_BF, x_BD, recon_BD, dead_F, with_aux: bool, aux_k: int, groups: int) -> jax.Array:
    """AuxK (Gao et al. 2024): the dead latents' top aux_k reconstruct the residual; normalised by its variance.

    Scaled by min(n_dead / aux_k, 1), so it is zero for an SAE with no dead latent (a mask). `with_aux` is
    static: the trainer compiles its step both ways and picks one on device (lax.switch on whether any latent of
    the sweep is dead), so while nothing is dead this pass costs nothing.
    """
    if not with_aux:
        return jnp.zeros((), x_BD.dtype)
    F = dead_F.shape[0]
    aux_k = min(aux_k, F)
    n_dead = dead_F.sum()
    vals, idx = top_k(jnp.where(dead_F, pre_BF, -jnp.inf), aux_k, groups)
    vals = jnp.where(jnp.arange(aux_k) < n_dead, jax.nn.relu(vals), 0.0)
    err_BD = jax.lax.stop_gradient(x_BD - recon_BD)
    e_hat = scatter(vals, idx, F) @ params["W_dec"]
    variance = jnp.sum((err_BD - err_BD.mean(0)) ** 2)
    value = jnp.sum((e_hat - err_BD) ** 2) / jnp.maximum(variance, 1e-12)
    return jnp.minimum(n_dead / aux_k, 1.0) * value


class Variant:
    """One SAE architecture. Subclasses are frozen dataclasses holding only static settings."""

    name: str = ""
    unit_decoder = True  # the trainer projects decoder rows back to unit norm after every step

    def init_extra(self, n_latents: int) -> dict:
        """Extra trainable parameters beyond W_enc, b_enc, W_dec, b_dec."""
        return {}

    def init_stats(self, n_latents: int) -> dict:
        """Non-trainable statistics the variant updates during training (carried in the train state)."""
        return {}

    def encode_train(self, params, stats, x_BD, hyper, dead_F, with_aux: bool) -> Encoded:
        raise NotImplementedError

    def encode(self, params, stats, x_BD, hyper) -> jax.Array:
        """Inference activations [B, F]."""
        raise NotImplementedError
