"""Next-token choice: greedy, or temperature / top-k / top-p sampling with an explicit PRNG key.

Every setting is a per-example array, so changing it never recompiles; a batch that is all greedy
(temperature 0) skips the sort at run time (a `lax.cond`, not a Python branch). Each row draws with its own key,
fold_in(step key, seed[b]): a row's tokens depend on the key, its seed and its own logits only, not on which rows
share its batch (the experiment harness seeds each sample from (seed, condition, scenario, sample)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from emojax.errors import InputError


@struct.dataclass
class Sampling:
    """temperature [B] (0 = greedy), top_k [B] int32 (0 = no limit), top_p [B] (1 = no limit), seed [B] uint32
    (default: the row index)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array

    @classmethod
    def make(cls, batch: int, temperature=0.0, top_k=0, top_p=1.0, seed=None) -> Sampling:
        def per_row(value, dtype, name):
            a = np.broadcast_to(np.asarray(value, dtype), (batch,)) if np.ndim(value) == 0 else np.asarray(value, dtype)
            if a.shape != (batch,):
                raise InputError(f"{name} must be a scalar or [batch={batch}], got shape {a.shape}")
            return np.array(a)

        t, k, p = per_row(temperature, np.float32, "temperature"), per_row(top_k, np.int32, "top_k"), \
            per_row(top_p, np.float32, "top_p")
        if (t < 0).any() or (k < 0).any() or ((p <= 0) | (p > 1)).any():
            raise InputError("temperature must be >= 0, top_k >= 0 and top_p in (0, 1]")
        seeds = np.arange(batch, dtype=np.uint32) if seed is None else per_row(seed, np.uint32, "seed")
        return cls(temperature=t, top_k=k, top_p=p, seed=seeds)


def greedy(logits_BV: jax.Array, block: int = 256) -> jax.Array:
    """Token ids [B] int32: jnp.argmax over the vocabulary (the first of equal maxima), found in blocks of `block`
    tokens: the best block by its maximum, then the best token in that block. Rows with NaN logits get some token
    (XLA's CPU max may drop a NaN), not necessarily the first NaN.

    XLA's CPU argmax over a long axis is a scalar loop: 1.7 ms for [32, 32000] float32 logits on a 2-core Xeon,
    4% of a 56M model's decode step at batch 32; block maxima vectorise (0.19 ms) and the search is then short."""
    *lead, V = logits_BV.shape
    if V <= block:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    pad = -V % block
    if pad:
        logits_BV = jnp.pad(logits_BV, [(0, 0)] * len(lead) + [(0, pad)], constant_values=-jnp.inf)
    blocks = logits_BV.reshape(*lead, -1, block)
    best = jnp.argmax(jnp.max(blocks, axis=-1), axis=-1)
    inside = jnp.take_along_axis(blocks, best[..., None, None], axis=-2)[..., 0, :]
    return (best * block + jnp.argmax(inside, axis=-1)).astype(jnp.int32)


def choose(logits_BV: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Token ids [B] int32: argmax where temperature is 0, else a draw after temperature, top-k, top-p
    (in that order, as transformers' generate applies them)."""
    greedy_B = greedy(logits_BV)

    def truncated(scaled_BV):
        """scaled_BV with the tokens outside each row's top-k and top-p set to -inf (one sort over the vocabulary)."""
        V = scaled_BV.shape[-1]
        sorted_BV = -jnp.sort(-scaled_BV, axis=-1)
        k = jnp.where(sampling.top_k > 0, jnp.minimum(sampling.top_k, V), V)
        rank = jnp.arange(V)[None, :]
        sorted_BV = jnp.where(rank < k[:, None], sorted_BV, -jnp.inf)
        probs = jax.nn.softmax(sorted_BV, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly better tokens
        n_keep = jnp.clip(jnp.sum((before < sampling.top_p[:, None]) & (rank < k[:, None]), axis=-1), 1, V)
        cutoff = jnp.take_along_axis(sorted_BV, (n_keep - 1)[:, None], axis=-1)
        return jnp.where(scaled_BV >= cutoff, scaled_BV, -jnp.inf)

    def draw(_):
        V = logits_BV.shape[-1]
        scaled = logits_BV.astype(jnp.float32) / jnp.maximum(sampling.temperature, 1e-6)[:, None]
        # The sort is the step's most expensive op at a large vocabulary; skip it when no row truncates.
        truncates = jnp.any(((sampling.top_k > 0) & (sampling.top_k < V)) | (sampling.top_p < 1.0))
        scaled = jax.lax.cond(truncates, truncated, lambda x: x, scaled)
        keys_B = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, sampling.seed)
        drawn = jax.vmap(jax.random.categorical)(keys_B, scaled)
        return jnp.where(sampling.temperature > 0, drawn.astype(jnp.int32), greedy_B)

    return jax.lax.cond(jnp.any(sampling.temperature > 0), draw, lambda _: greedy_B, None)
