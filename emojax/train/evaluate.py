"""Held-out perplexity of the model, and of a unigram model for comparison.

Both are measured on the same targets: the tokens of the held-out rows after the first of their row where the
row's mask is 1 (every real token of a built-in model's held-out document; a fine-tune's response tokens).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from emojax.models.interventions import Interventions
from emojax.train.data import TokenData


def token_nll(graphdef: nnx.GraphDef, params, rows_BT1: jax.Array,
              interventions: Interventions | None = None) -> jax.Array:
    """Next-token negative log-likelihood [B, T] (nats) of rows [B, T + 1]: inputs row[:-1], targets row[1:].
    Rows are right-padded, so no attention mask: a real token never attends to the padding after it."""
    model = nnx.merge(graphdef, params)
    logits_BTV = model(rows_BT1[:, :-1], interventions=interventions).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, rows_BT1[:, 1:])


@functools.lru_cache(maxsize=8)
def make_eval_fn(graphdef: nnx.GraphDef):
    """jitted (params, rows [B, T+1], mask [B, T+1]) -> (sum of target NLL, number of targets): token j >= 1 is a
    target where mask[:, j] is 1."""

    @jax.jit
    def evaluate(params, rows, mask):
        nll_BT = token_nll(graphdef, params, rows)
        target_mask = mask[:, 1:].astype(jnp.float32)
        return jnp.sum(nll_BT * target_mask), jnp.sum(target_mask)

    return evaluate


def heldout_nll(eval_fn, params, data: TokenData, batch_size: int) -> tuple[float, int]:
    """Mean NLL per held-out target token (nats) and the number of targets. Padded to whole batches so the
    evaluation compiles once."""
    rows, mask = data.heldout, data.heldout_mask
    pad = -len(rows) % batch_size
    rows = np.pad(rows, ((0, pad), (0, 0)))
    mask = np.pad(mask, ((0, pad), (0, 0)))
    total, count = 0.0, 0.0
    for start in range(0, len(rows), batch_size):
        s, c = eval_fn(params, rows[start:start + batch_size], mask[start:start + batch_size])
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0), int(count)


def unigram_nll(data: TokenData, vocab_size: int) -> float:
    """Mean held-out NLL (nats) of a unigram model fitted on the training targets with add-one smoothing."""
    counts = np.bincount(data.train[:, 1:].ravel(), minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts) - np.log(counts.sum())
    mask = data.heldout_mask[:, 1:].astype(bool)
    return float(-log_p[data.heldout[:, 1:][mask]].mean())


def perplexity(nll: float) -> float:
    return math.exp(nll)
