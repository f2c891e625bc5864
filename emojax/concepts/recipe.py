"""The study's recipe, from the streamed statistics of stats.py.

Per layer: mean of each concept's pooled rows; vector = concept mean minus the mean of the concept means
(one-vs-mean); denoising: the top principal components of the centred neutral token rows (each document's first
token left out; fit.denoise_on=documents: the neutral documents' pooled rows) that together explain
`denoise_variance` of their variance are projected out of every vector. Raw and denoised are both kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emojax.errors import EmojaxError


class FitError(EmojaxError):
    """Inputs the fit stage cannot use (a concept without examples, no neutral set, a missing layer...)."""


@dataclass(frozen=True)
class LayerVectors:
    raw_CD: np.ndarray  # before denoising
    vectors_CD: np.ndarray  # denoised (and unit-normalised when asked)
    center_D: np.ndarray  # the mean of the concept means (readouts use x - center)
    neutral_pcs_PD: np.ndarray  # the components projected out (P may be 0)


def check_counts(counts_C: np.ndarray, names: tuple[str, ...], split: str, layer: int) -> None:
    empty = [names[i] for i in np.flatnonzero(np.asarray(counts_C) == 0)]
    if empty:
        raise FitError(f"label(s) {empty} have no examples in split {split!r} (layer {layer}); add documents for "
                       "them or leave them out with fit.labels")


def check_finite_rows(stats, names: tuple[str, ...], split: str, layer: int, source: str,
                      neutral_rows: str = "docs") -> None:
    """Refuses a split whose rows hold NaN or inf (stats: a LabelStats; its neutral rows are `neutral_rows`,
    docs or tokens), naming the labels at fault."""
    bad = [] if stats.nonfinite_C is None else \
        [f"{names[i]} ({int(stats.nonfinite_C[i])} docs)" for i in np.flatnonzero(stats.nonfinite_C)]
    if stats.neutral_nonfinite:
        bad.append(f"neutral ({stats.neutral_nonfinite} {neutral_rows})")
    if bad:
        raise FitError(f"{source}: activations at layer {layer} (split {split!r}) hold NaN or inf for label(s) "
                       f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}; a vector fitted from them would be "
                       "NaN: re-dump the store (a diverged model or a corrupt dump?) or leave those labels out "
                       "with fit.labels")


def check_finite(values, what: str, layer: int, source: str, names: tuple[str, ...] | None = None) -> None:
    """Refuses non-finite statistics (NaN/inf from overflow or from the data) before they become a bank;
    with `names`, values is [C, ...] and the labels whose rows are non-finite are named."""
    values = np.asarray(values)
    if np.isfinite(values).all():
        return
    at = f"layer {layer}"
    if names is not None:
        rows = ~np.isfinite(values.reshape(len(names), -1)).all(-1)
        at += f", label(s) {[names[i] for i in np.flatnonzero(rows)][:8]}"
    raise FitError(f"{source}: the {what} at {at} is not finite (NaN or inf); the activations are too large for "
                   "float32 or corrupt: re-dump the store or leave the layer/labels out (fit.layers, fit.labels)")


def neutral_components(cov_DD: np.ndarray, fraction: float) -> np.ndarray:
    """The fewest top principal axes [Q, D] of a covariance that explain at least `fraction` of its variance."""
    evals, evecs = np.linalg.eigh(cov_DD)
    order = np.argsort(evals)[::-1]
    evals, evecs = np.clip(evals[order], 0, None), evecs[:, order]
    total = evals.sum()
    if total <= 0:
        return np.zeros((0, cov_DD.shape[0]))
    k = int(np.searchsorted(np.cumsum(evals) / total, fraction - 1e-12) + 1)
    return evecs[:, :k].T


def project_out(vectors_CD: np.ndarray, pcs_QD: np.ndarray) -> np.ndarray:
    """vectors minus their components along the (orthonormal) rows of pcs."""
    return vectors_CD - (vectors_CD @ pcs_QD.T) @ pcs_QD


def unit(vectors_CD: np.ndarray) -> np.ndarray:
    return vectors_CD / np.maximum(np.linalg.norm(vectors_CD, axis=-1, keepdims=True), 1e-12)


def finish(raw_CD: np.ndarray, center_D: np.ndarray, neutral_cov_DD: np.ndarray | None, denoise: bool,
           fraction: float, unit_norm: bool) -> LayerVectors:
    """Denoising and normalisation shared by every method."""
    pcs = neutral_components(neutral_cov_DD, fraction) if denoise else np.zeros((0, raw_CD.shape[1]))
    vectors = project_out(raw_CD, pcs) if len(pcs) else raw_CD.copy()
    if unit_norm:
        vectors = unit(vectors)
    return LayerVectors(raw_CD, vectors, center_D, pcs)


def mean_diff(means_CD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(concept mean minus mean of concept means [C, D], the mean of concept means [D])."""
    center = means_CD.mean(0)
    return means_CD - center[None, :], center
