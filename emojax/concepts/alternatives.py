"""The alternatives to the study's recipe: contrastive difference of means (CAA / persona vectors), the first
principal component of paired differences (RepE / repeng), and multinomial logistic-regression probes.

Pairs: a pooled store holds labelled documents, not matched pairs, so every document of concept c is paired with
the mean of the negative set: d_i = x_i - m_neg(c). The default negative set is "rest" (one-vs-rest: the other
concepts' stories); "neutral" (the neutral dialogues) stays an option, but it puts the shared story-vs-dialogue
offset into every vector.
pca_pairs takes the top eigenvector of sum_i d_i d_i^T (uncentered, as repeng's order-randomised pairs give),
found by streamed power iteration, signed and scaled to agree with the contrastive difference of means.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from emojax.concepts.recipe import FitError, project_out
from emojax.concepts.stats import (IGNORED_CLASS, LabelStats, class_lookup, padded_rows, place_chunk,
                                   second_moment_times, stream_classes)
from emojax.store.reader import ActivationStore


def negative_means(stats: LabelStats, negative: str, names: tuple[str, ...]) -> np.ndarray:
    """The negative set's mean for every concept [C, D]. "rest" is the mean of the other concepts' means, each
    concept weighted equally (as the study's one-vs-mean recipe weights them), so a concept with many documents
    does not dominate every other concept's negative set; "neutral" is the neutral documents' mean."""
    C = len(names)
    if negative == "neutral":
        if not stats.neutral_count:
            raise FitError("negative='neutral' needs neutral documents in the fit split and the store has none; "
                           "set fit.negative=rest")
        return np.broadcast_to(stats.neutral_mean_D, stats.sums_CD.shape).copy()
    if C < 2:
        raise FitError("negative='rest' needs at least two concepts")
    means_CD = stats.means_CD
    return (means_CD.sum(0, keepdims=True) - means_CD) / (C - 1)


def contrastive(stats: LabelStats, negative: str, names: tuple[str, ...]) -> np.ndarray:
    """Mean of the concept's documents minus the mean of the negative set [C, D]."""
    return stats.means_CD - negative_means(stats, negative, names)


def pca_pairs(store: ActivationStore, layer: int, split: str, names: tuple[str, ...], stats: LabelStats,
              negative: str, iters: int, mesh: Mesh, chunk_docs: int, exclude_QD: np.ndarray | None = None
              ) -> np.ndarray:
    """First principal axis of each concept's differences from the negative mean, scaled by the contrastive
    difference's projection on it [C, D] (`iters` streamed passes). The axis is sought in the complement of
    `exclude_QD` (the neutral components, when denoising): high-variance neutral directions would otherwise
    dominate every concept's differences, which unpaired documents cannot cancel."""
    shift = negative_means(stats, negative, names)
    diff = stats.means_CD - shift
    exclude = np.zeros((0, diff.shape[1])) if exclude_QD is None else exclude_QD
    v = project_out(diff, exclude)
    v = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    for _ in range(iters):
        w = project_out(second_moment_times(store, layer, split, names, shift, v, mesh, chunk_docs), exclude)
        v = w / np.maximum(np.linalg.norm(w, axis=-1, keepdims=True), 1e-30)
    return v * np.sum(v * diff, -1, keepdims=True)


# ---- probes


@dataclass(frozen=True)
class Probe:
    """Logits = x @ weights_CD.T + bias_C on raw pooled activations."""

    weights_CD: np.ndarray
    bias_C: np.ndarray
    epochs: int  # epochs run
    best_epoch: int  # the epoch whose parameters were kept (lowest val loss)
    val_loss: float

    def logits(self, x_XD: np.ndarray) -> np.ndarray:
        return x_XD @ self.weights_CD.T + self.bias_C


def _loss(params, x_XD, class_X, center_D, scale_D, l2):
    z_XD = (x_XD - center_D) / scale_D
    logits_XC = z_XD @ params["w_DC"] + params["b_C"]
    valid_X = class_X >= 0
    labels_X = jnp.where(valid_X, class_X, 0)
    ce_X = optax.softmax_cross_entropy_with_integer_labels(logits_XC, labels_X)
    ce_sum = jnp.sum(jnp.where(valid_X, ce_X, 0.0))
    return ce_sum, valid_X.sum()


def _make_steps(optimizer, l2: float):
    @jax.jit
    def train_step(params, opt_state, x_XD, class_X, center_D, scale_D):
        def objective(p):
            ce_sum, n = _loss(p, x_XD, class_X, center_D, scale_D, l2)
            return ce_sum / jnp.maximum(n, 1) + l2 * jnp.sum(p["w_DC"] ** 2)

        loss, grads = jax.value_and_grad(objective)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def eval_step(params, x_XD, class_X, center_D, scale_D):
        return _loss(params, x_XD, class_X, center_D, scale_D, l2)

    return train_step, eval_step


def train_probe(store: ActivationStore, layer: int, names: tuple[str, ...], center_D: np.ndarray,
                train_split: str, val_split: str, l2: float, lr: float, epochs: int, patience: int, seed: int,
                mesh: Mesh, chunk_docs: int) -> Probe:
    """Multinomial logistic regression over the concepts (neutral documents excluded), trained with Adam a chunk
    per step on standardised inputs; stops when the val loss has not improved for `patience` epochs."""
    lookup = class_lookup(store, names)
    lookup = {k: (v if v >= 0 else IGNORED_CLASS) for k, v in lookup.items()}
    C, D = len(names), store.d_model
    rows = padded_rows(chunk_docs, mesh)
    has_val = len(store.select(val_split, names)) > 0
    scale = None
    for chunk in stream_classes(store, layer, train_split, lookup, chunk_docs):
        rows_x = chunk.acts_XD[chunk.class_X >= 0]
        if len(rows_x):
            scale = np.maximum(rows_x.std(0), 1e-6).astype(np.float32)
            break
    if scale is None:
        raise FitError(f"probe: no labelled documents in split {train_split!r} at layer {layer}")
    key = jax.random.key(seed)
    params = {"w_DC": 0.01 * jax.random.normal(key, (D, C), jnp.float32), "b_C": jnp.zeros((C,), jnp.float32)}
    params = jax.device_put(params, NamedSharding(mesh, P()))
    optimizer = optax.adam(lr)
    opt_state = optimizer.init(params)
    train_step, eval_step = _make_steps(optimizer, l2)
    center, scale_j = jnp.asarray(center_D, jnp.float32), jnp.asarray(scale)
    best, best_loss, best_epoch, epoch = params, np.inf, 0, 0
    for epoch in range(1, epochs + 1):
        for chunk in stream_classes(store, layer, train_split, lookup, chunk_docs):
            x, cls = place_chunk(chunk, rows, mesh)
            params, opt_state, _ = train_step(params, opt_state, x, cls, center, scale_j)
        if not has_val:
            best, best_epoch = params, epoch
            continue
        ce, n = 0.0, 0
        for chunk in stream_classes(store, layer, val_split, lookup, chunk_docs):
            x, cls = place_chunk(chunk, rows, mesh)
            s, k = eval_step(params, x, cls, center, scale_j)
            ce, n = ce + float(s), n + int(k)
        val = ce / max(n, 1)
        if val < best_loss - 1e-7:
            best, best_loss, best_epoch = params, val, epoch
        elif epoch - best_epoch >= patience:
            break
    w_DC, b_C = np.asarray(best["w_DC"], np.float64), np.asarray(best["b_C"], np.float64)
    w_raw = np.ascontiguousarray((w_DC / scale[:, None]).T)  # [C, D]
    b_raw = b_C - (center_D / scale) @ w_DC
    return Probe(w_raw.astype(np.float32), b_raw.astype(np.float32), epoch, best_epoch, float(best_loss))


def probe_vectors(probe: Probe) -> np.ndarray:
    """A probe's class weights as directions [C, D], centred over classes (softmax ignores a shared shift)."""
    w = probe.weights_CD.astype(np.float64)
    return w - w.mean(0, keepdims=True)
