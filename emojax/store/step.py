"""The dump's device step: the jitted forward and the on-device reduction to what is stored."""

from __future__ import annotations

import functools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np


class Step:
    """The jitted forward (hidden states only, layers past the deepest capture skipped) and the on-device
    reduction to what is stored: activations cast to the store dtype, pooled means in float32, and whether each
    document's activations are all finite (checked on device, so the host reads back B booleans per layer).
    `interventions` (built for batch 1, emojax.models.interventions) act on every batch: a steered dump."""

    def __init__(self, lm, layers: tuple[int, ...], pool_start: int, dtype: str, interventions=None,
                 bos_id: int | None = None):
        self.lm, self.pool_start, self.bos_id = lm, pool_start, bos_id
        self.interventions = None if interventions is None else interventions.as_device()
        self.forward = lm._forward_fn((tuple(layers), False), self.interventions)
        self.reduce = _reduce_fn(pool_start, dtype, bos_id)

    def __call__(self, tokens: np.ndarray, mask: np.ndarray):
        """tokens, mask [B, T] -> (hidden [B, T, D] per layer, pooled [B, D] per layer, count [B],
        finite [L, B] bool)."""
        with self.lm._precision():
            out = self.forward(self.lm.params, tokens, mask, np.zeros(mask.shape, np.float32), self.interventions)
        return self.reduce(out.hidden, jnp.asarray(mask), jnp.asarray(tokens))


@functools.cache
def _reduce_fn(pool_start: int, dtype: str, bos_id: int | None = None):
    return jax.jit(partial(_reduce, pool_start=pool_start, dtype=jnp.dtype(dtype), bos_id=bos_id))


def _reduce(hidden, mask_BT, tokens_BT, *, pool_start: int, dtype, bos_id: int | None):
    """The pooled mean averages a document's real tokens from the `pool_start`-th on, counting real tokens
    (padding on either side never counts) with the BOS left out (a BOS is the first real token when it is
    `bos_id`): the study's offset of 50 tokens of text. A document of at most pool_start tokens is pooled over
    all of them, BOS still left out."""
    real_BT = mask_BT.astype(bool)
    valid_BT = real_BT
    if bos_id is not None:
        first_BT = real_BT & (jnp.cumsum(real_BT, axis=1) == 1)
        valid_BT = real_BT & ~(first_BT & (tokens_BT == bos_id))
    position_BT = jnp.cumsum(valid_BT, axis=1) - 1  # among the document's text tokens
    n_B = valid_BT.sum(axis=1)
    pooled_BT = valid_BT & ((position_BT >= pool_start) | (n_B[:, None] <= pool_start))
    count_B = pooled_BT.sum(axis=1)
    weights_BT = pooled_BT.astype(jnp.float32) / jnp.maximum(count_B, 1)[:, None].astype(jnp.float32)
    pooled = tuple(jnp.einsum("BTD,BT->BD", h.astype(jnp.float32), weights_BT,
                              precision=jax.lax.Precision.HIGHEST) for h in hidden)
    # Only real tokens count: padding never reaches the store, whatever the forward made of it.
    finite_LB = jnp.stack([jnp.all(jnp.isfinite(h) | ~real_BT[:, :, None], axis=(1, 2)) for h in hidden])
    return tuple(h.astype(dtype) for h in hidden), pooled, count_B, finite_LB
