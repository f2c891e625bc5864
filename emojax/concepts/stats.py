"""Streamed, sharded sufficient statistics of the pooled activations (and of the neutral documents' tokens).

The store is read `chunk_docs` documents (or token rows) at a time; each chunk is padded to a fixed row count,
split over the mesh's ("data", "fsdp") axes, reduced on every device to partial sums, and the partials are combined with
psum. The host only adds the per-chunk totals (float64), so no more than one chunk of activations is ever in
memory and the result does not depend on how many devices share the work (up to float32 summation order).

Axes (the glossary in emojax/__init__.py): X rows of a chunk, C concepts, D d_model.
Row classes: 0..C-1 a concept, NEUTRAL_CLASS a neutral document or token, IGNORED_CLASS anything else (padding,
labels not being fitted).

A row holding NaN or inf is counted per class and contributes zeros to the sums: one bad row must not turn every
concept's mean into NaN (0 x NaN is NaN in the one-hot matmul), so that the fit can name the label at fault.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from emojax.concepts.recipe import FitError
from emojax.models.sharding import make_mesh
from emojax.store.reader import NEUTRAL_ID, ActivationStore, DocTable

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
    chunks = stream_classes(store, layer, split, class_lookup(store, label_names), chunk_docs)
    return _reduce(chunks, len(label_names), store.d_model, mesh, chunk_docs)


def neutral_token_stats(store: ActivationStore, layer: int, split: str, mesh: Mesh, chunk_rows: int) -> LabelStats:
    """One streamed pass over the token rows of `split`'s neutral documents at `layer`, each document's first
    token left out (a BOS where the tokenizer adds one; the store does not record whether it does, and on a
    model without BOS the first token is an attention sink of outlying norm): their mean and covariance
    (neutral_*), the token count in neutral_count."""
    docs = store.docs
    index = store.select(split)
    starts, ends = _non_bos_ranges(docs, index[docs.label_id[index] == NEUTRAL_ID])
    blocks = np.flatnonzero(_rows_per_run(starts, ends, chunk_rows))
    chunks = (ChunkClasses(_read_rows(store, layer, rows), np.full(len(rows), NEUTRAL_CLASS, np.int32))
              for rows in (_run_rows(starts, ends, int(k), chunk_rows) for k in blocks))
    return _reduce(chunks, 0, store.d_model, mesh, chunk_rows)


def _reduce(chunks: Iterable[ChunkClasses], n_classes: int, d_model: int, mesh: Mesh, chunk_rows: int) -> LabelStats:
    """The moments of `chunks` (each at most `chunk_rows` rows), summed on the mesh chunk by chunk."""
    C, D = n_classes, d_model
    rows = padded_rows(chunk_rows, mesh)
    total: dict | None = None
    shift = None
    for chunk in chunks:
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


# Rows in a run of the steering-unit sample: 65536 tokens come from 256 places in the store, and a run costs
# about one compressed chunk read (the per-token alternative reads a chunk for every token drawn).
NORM_RUN_ROWS = 256


def mean_token_norm(store: ActivationStore, layer: int, max_tokens: int, seed: int = 0,
                    run_rows: int = NORM_RUN_ROWS) -> float:
    """Mean L2 norm of the token rows at `layer` (the study's steering strength unit) over a uniform sample of
    the whole store's tokens, each document's first token (BOS) left out: aligned runs of `run_rows` token rows
    are read in a seeded random order until `max_tokens` rows are in, so every token is (nearly) equally likely
    to be drawn. NaN when the store holds no such rows; rows holding NaN or inf are a FitError."""
    starts, ends = _non_bos_ranges(store.docs, np.arange(len(store.docs.rows)))
    counts = _rows_per_run(starts, ends, run_rows)
    runs = np.random.default_rng(seed).permutation(np.flatnonzero(counts))
    runs = np.sort(runs[:int(np.searchsorted(np.cumsum(counts[runs]), max_tokens)) + 1])
    total, count = 0.0, 0
    for k in runs:
        block = _read_rows(store, layer, _run_rows(starts, ends, int(k), run_rows))
        total += float(np.linalg.norm(block, axis=-1).sum())
        count += len(block)
    if count and not np.isfinite(total):
        raise FitError(f"{store.path}: token activations at layer {layer} hold NaN or inf, so the mean residual norm "
                       "(the steering strength unit) is undefined; re-dump the store from a model whose activations "
                       "are finite")
    return total / count if count else float("nan")


def _non_bos_ranges(docs: DocTable, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token row ranges [starts, ends) of the documents at `index` of `docs` without their first token, sorted,
    empty ones dropped."""
    starts = docs.token_start[index].astype(np.int64) + 1
    ends = docs.token_start[index].astype(np.int64) + docs.n_tokens[index]
    keep = ends > starts
    order = np.argsort(starts[keep], kind="stable")
    return starts[keep][order], ends[keep][order]


def _rows_per_run(starts: np.ndarray, ends: np.ndarray, run_rows: int) -> np.ndarray:
    """How many rows of the ranges fall in each aligned run [k * run_rows, (k + 1) * run_rows)."""
    if not len(starts):
        return np.zeros(0, np.int64)
    edges = np.arange(0, int(ends[-1]) + run_rows, run_rows)
    before = np.concatenate([[0], np.cumsum(ends - starts)])  # rows of the ranges before range i
    i = np.maximum(np.searchsorted(starts, edges, side="right") - 1, 0)
    below = before[i] + np.clip(edges - starts[i], 0, ends[i] - starts[i])  # rows of the ranges under each edge
    return np.diff(below)


def _run_rows(starts: np.ndarray, ends: np.ndarray, k: int, run_rows: int) -> np.ndarray:
    """The store rows of the ranges inside run k."""
    lo, hi = k * run_rows, (k + 1) * run_rows
    i0, i1 = np.searchsorted(ends, lo, side="right"), np.searchsorted(starts, hi)
    return np.concatenate([np.arange(max(a, lo), min(b, hi)) for a, b in zip(starts[i0:i1], ends[i0:i1])])


def _read_rows(store: ActivationStore, layer: int, rows: np.ndarray) -> np.ndarray:
    """Token activations [len(rows), D] float32 of sorted store rows, read as one span."""
    return store.tokens(layer, int(rows[0]), int(rows[-1]) + 1)[rows - rows[0]].astype(np.float32)
