"""Streamed, sharded sufficient statistics of the pooled activations.

The store is read `chunk_docs` documents at a time; each chunk is padded to a fixed row count, split over the
mesh's ("data", "fsdp") axes, reduced on every device to partial sums, and the partials are combined with
psum. The host only adds the per-chunk totals (float64), so no more than one chunk of activations is ever in
memory and the result does not depend on how many devices share the work (up to float32 summation order).

Axes (the glossary in emojax/__init__.py): X rows of a chunk, C concepts, D d_model.
Row classes: 0..C-1 a concept, NEUTRAL_CLASS a neutral document, IGNORED_CLASS anything else (padding,
labels not being fitted).

A row holding NaN or inf is counted per class and contributes zeros to the sums: one bad row must not turn every
concept's mean into NaN (0 x NaN is NaN in the one-hot matmul), so that the fit can name the label at fault.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from emojax.concepts.recipe import FitError
from emojax.models.sharding import make_mesh
from emojax.store.reader import NEUTRAL_ID, ActivationStore

NEUTRAL_CLASS = -1
IGNORED_CLASS = -2
ROW_AXES = ("data", "fsdp")


@dataclass(frozen=True)
class LabelStats:
    """Sufficient statistics of one layer over one split (float64 on the host)."""

    sums_CD: np.ndarray  # per-concept sums of pooled rows
    counts_C: np.ndarray  # documents per concept
    neutral_count: int
    neutral_mean_D: np.ndarray  # mean of the neutral rows (zeros when there are none)
    neutral_cov_DD: np.ndarray  # covariance of the neutral rows (population, 1/n)
    norm_mean: float  # mean L2 norm of every pooled row read (concepts and neutral)
    nonfinite_C: np.ndarray | None = None  # documents per concept whose pooled row holds NaN or inf
    neutral_nonfinite: int = 0  # neutral documents whose pooled row holds NaN or inf

    @property
    def means_CD(self) -> np.ndarray:
        return self.sums_CD / np.maximum(self.counts_C, 1)[:, None]


@dataclass(frozen=True)
class ChunkClasses:
    acts_XD: np.ndarray  # float32
    class_X: np.ndarray  # int32 row classes (see module docstring)


def fit_mesh(shape: tuple[int, ...] = ()) -> Mesh:
    """The mesh of the fit stage: `shape` (data, fsdp, tensor), or every device on "data"."""
    return make_mesh(tuple(shape) if shape else (len(jax.devices()), 1, 1))


def class_lookup(store: ActivationStore, label_names: tuple[str, ...]) -> dict[int, int]:
    """Store label id -> row class: the position in `label_names`, or NEUTRAL_CLASS for the neutral id."""
    lookup = {store.label_ids[name]: i for i, name in enumerate(label_names)}
    lookup[NEUTRAL_ID] = NEUTRAL_CLASS
    return lookup


def stream_classes(store: ActivationStore, layer: int, split: str, lookup: dict[int, int],
                   chunk_docs: int) -> Iterator[ChunkClasses]:
    """The split's pooled rows with their row classes, read in aligned blocks of `chunk_docs` store rows: a read
    never spans more than `chunk_docs` rows, however the split's documents are interleaved with others'."""
    ids = np.array(sorted(lookup), np.int64)
    classes = np.array([lookup[i] for i in ids], np.int32)
    docs = store.docs
    index = store.select(split)
    rows = docs.rows[index]
    blocks = rows // chunk_docs
    bounds = np.flatnonzero(np.diff(blocks)) + 1
    for part in np.split(index, bounds):
        if not len(part):
            continue
        acts = store.pooled(layer, docs.rows[part])
        label = docs.label_id[part]
        pos = np.minimum(np.searchsorted(ids, label), len(ids) - 1)
        known = ids[pos] == label
        yield ChunkClasses(acts, np.where(known, classes[pos], IGNORED_CLASS).astype(np.int32))


def padded_rows(chunk_docs: int, mesh: Mesh) -> int:
    """Rows every chunk is padded to: chunk_docs rounded up to a multiple of the row-sharding devices."""
    k = math.prod(mesh.shape[a] for a in ROW_AXES)
    return -(-chunk_docs // k) * k


def place_chunk(chunk: ChunkClasses, rows: int, mesh: Mesh) -> tuple[jax.Array, jax.Array]:
    """Pads a chunk to `rows` (padding rows are IGNORED_CLASS) and shards its rows over ("data", "fsdp")."""
    n, d = chunk.acts_XD.shape
    acts = np.zeros((rows, d), np.float32)
    acts[:n] = chunk.acts_XD
    cls = np.full((rows,), IGNORED_CLASS, np.int32)
    cls[:n] = chunk.class_X
    return (jax.device_put(acts, NamedSharding(mesh, P(ROW_AXES, None))),
            jax.device_put(cls, NamedSharding(mesh, P(ROW_AXES))))


def _moments(x_XD, class_X, shift_D, *, n_classes: int):
    onehot_XC = (class_X[:, None] == jnp.arange(n_classes)[None, :]).astype(jnp.float32)
    neutral_X = (class_X == NEUTRAL_CLASS).astype(jnp.float32)
    bad_X = ~jnp.isfinite(x_XD).all(-1)
    x_XD = jnp.where(bad_X[:, None], 0.0, x_XD)  # counted below; the fit refuses them by label
    read_X = (class_X != IGNORED_CLASS).astype(jnp.float32)
    xc_XD = (x_XD - shift_D[None, :]) * neutral_X[:, None]  # shifted: a large shared offset costs no precision
    out = {
        "sums_CD": jnp.einsum("XC,XD->CD", onehot_XC, x_XD, precision="highest"),
        "counts_C": onehot_XC.sum(0),
        "neutral_count": neutral_X.sum(),
        "neutral_sum_D": xc_XD.sum(0),
        "neutral_outer_DD": jnp.tensordot(xc_XD, xc_XD, axes=(0, 0), precision="highest"),
        "norm_sum": (jnp.linalg.norm(x_XD, axis=-1) * read_X).sum(),
        "nonfinite_C": (onehot_XC * bad_X[:, None]).sum(0),
        "neutral_nonfinite": (neutral_X * bad_X).sum(),
    }
    return jax.tree.map(lambda a: jax.lax.psum(a, ROW_AXES), out)


@partial(jax.jit, static_argnames=("n_classes", "mesh"))
def moments_step(x_XD, class_X, shift_D, *, n_classes: int, mesh: Mesh):
    """Per-device partial moments of one chunk, combined with psum over the row axes."""
    fn = jax.shard_map(partial(_moments, n_classes=n_classes), mesh=mesh,
                       in_specs=(P(ROW_AXES, None), P(ROW_AXES), P()), out_specs=P(), check_vma=False)
    return fn(x_XD, class_X, shift_D)


def label_stats(store: ActivationStore, layer: int, split: str, label_names: tuple[str, ...], mesh: Mesh,
                chunk_docs: int) -> LabelStats:
    """One streamed pass over `split` at `layer`: per-concept sums/counts and the neutral mean/covariance."""
    lookup = class_lookup(store, label_names)
    C, D = len(label_names), store.d_model
    rows = padded_rows(chunk_docs, mesh)
    total: dict | None = None
    shift = None
    for chunk in stream_classes(store, layer, split, lookup, chunk_docs):
        if shift is None:  # any fixed point near the data; the first chunk's mean is deterministic
            finite = chunk.acts_XD[np.isfinite(chunk.acts_XD).all(-1)]
            shift = finite.astype(np.float64).mean(0).astype(np.float32) if len(finite) else np.zeros(D, np.float32)
        x, cls = place_chunk(chunk, rows, mesh)
        part = moments_step(x, cls, jnp.asarray(shift), n_classes=C, mesh=mesh)
        part = {k: np.asarray(v, np.float64) for k, v in part.items()}
        total = part if total is None else {k: total[k] + part[k] for k in total}
    if total is None:
        return LabelStats(np.zeros((C, D)), np.zeros(C), 0, np.zeros(D), np.zeros((D, D)), 0.0)
    n_neutral = int(np.rint(total["neutral_count"]))
    if n_neutral:
        mean_c = total["neutral_sum_D"] / n_neutral
        with np.errstate(over="ignore", invalid="ignore"):  # overflow becomes inf/NaN, which the fit refuses
            cov = total["neutral_outer_DD"] / n_neutral - np.outer(mean_c, mean_c)
        neutral_mean = mean_c + shift
    else:
        cov, neutral_mean = np.zeros((D, D)), np.zeros(D)
    n_read = total["counts_C"].sum() + n_neutral
    return LabelStats(total["sums_CD"], np.round(total["counts_C"]), n_neutral, neutral_mean, (cov + cov.T) / 2,
                      float(total["norm_sum"] / max(n_read, 1)), np.round(total["nonfinite_C"]).astype(np.int64),
                      int(np.rint(total["neutral_nonfinite"])))


def _power(x_XD, class_X, shift_CD, v_CD, *, n_classes: int):
    onehot_XC = (class_X[:, None] == jnp.arange(n_classes)[None, :]).astype(jnp.float32)
    # d_i = x_i - shift_c for the row's own concept c: (d_i . v_c) d_i summed per concept.
    proj_XC = (jnp.einsum("XD,CD->XC", x_XD, v_CD, precision="highest")
               - jnp.sum(shift_CD * v_CD, -1)[None, :]) * onehot_XC
    out_CD = (jnp.einsum("XC,XD->CD", proj_XC, x_XD, precision="highest") - proj_XC.sum(0)[:, None] * shift_CD)
    return jax.lax.psum(out_CD, ROW_AXES)


@partial(jax.jit, static_argnames=("n_classes", "mesh"))
def power_step(x_XD, class_X, shift_CD, v_CD, *, n_classes: int, mesh: Mesh):
    """sum over a chunk's rows i of concept c of (d_i . v_c) d_i, d_i = x_i - shift_c: [C, D]."""
    fn = jax.shard_map(partial(_power, n_classes=n_classes), mesh=mesh,
                       in_specs=(P(ROW_AXES, None), P(ROW_AXES), P(), P()), out_specs=P(), check_vma=False)
    return fn(x_XD, class_X, shift_CD, v_CD)


def second_moment_times(store: ActivationStore, layer: int, split: str, label_names: tuple[str, ...],
                        shift_CD: np.ndarray, v_CD: np.ndarray, mesh: Mesh, chunk_docs: int) -> np.ndarray:
    """M_c v_c for every concept, M_c = sum_i (x_i - shift_c)(x_i - shift_c)^T over its rows; one pass."""
    lookup = class_lookup(store, label_names)
    rows = padded_rows(chunk_docs, mesh)
    out = np.zeros(v_CD.shape, np.float64)
    shift, v = jnp.asarray(shift_CD, jnp.float32), jnp.asarray(v_CD, jnp.float32)
    for chunk in stream_classes(store, layer, split, lookup, chunk_docs):
        x, cls = place_chunk(chunk, rows, mesh)
        out += np.asarray(power_step(x, cls, shift, v, n_classes=len(label_names), mesh=mesh), np.float64)
    return out


def mean_token_norm(store: ActivationStore, layer: int, split: str, max_tokens: int, chunk_rows: int) -> float:
    """Mean L2 norm of up to `max_tokens` token rows of the split's documents (the study's strength unit);
    NaN when the split's documents hold no token rows. Token rows holding NaN or inf are a FitError."""
    docs = store.docs
    index = store.select(split)
    total, count = 0.0, 0
    for d in index:
        start, n = int(docs.token_start[d]), int(docs.n_tokens[d])
        n = min(n, max_tokens - count)
        for a in range(start, start + n, chunk_rows):
            block = store.tokens(layer, a, min(a + chunk_rows, start + n)).astype(np.float32)
            total += float(np.linalg.norm(block, axis=-1).sum())
            count += len(block)
        if count >= max_tokens:
            break
    if count and not np.isfinite(total):
        raise FitError(f"{store.path}: token activations at layer {layer} (split {split!r}) hold NaN or inf, so the "
                       "mean residual norm (the steering strength unit) is undefined; re-dump the store from a model "
                       "whose activations are finite")
    return total / count if count else float("nan")
