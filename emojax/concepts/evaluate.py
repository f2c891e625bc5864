"""Held-out evaluation of a fitted layer: readout accuracy and AUROC, and the logit lens.

Readouts (concept documents only; neutral documents are not scored):
    nearest-vector: score_c = cos(x - center, v_c), center = the mean of the fit split's concept means
                    (`concept_readout`, the readout the monitor and its alerts show, so the fit's accuracy
                    describes what the monitor reads)
    probe:          score_c = x . w_c + b_c
Metrics: top-1 / top-5 accuracy (ties broken towards the lower concept index) and the macro average over
concepts of the one-vs-rest AUROC (Mann-Whitney, ties counted half).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from emojax.concepts.stats import class_lookup, stream_classes
from emojax.errors import InputError
from emojax.store.reader import ActivationStore

Metric = Literal["cosine", "dot"]


def concept_readout(x_D, vectors_CD, center_D=None, metric: Metric = "cosine"):
    """Scores [..., C] of activations x [..., D] on concept directions [C, D], measured from `center_D` (the
    bank's center at the layer; None: the origin): "cosine" cos(x - center, v_c), "dot" (x - center) . v_c.
    The one readout of fit evaluation, the monitor and its alerts. numpy inputs are scored in float64, jax
    arrays (inside the decode loop) in float32."""
    if metric not in ("cosine", "dot"):
        raise InputError(f"metric must be 'cosine' or 'dot', got {metric!r}")
    on_device = any(isinstance(a, jax.Array) for a in (x_D, vectors_CD, center_D))
    xp, dtype = (jnp, jnp.float32) if on_device else (np, np.float64)
    x = x_D.astype(dtype)
    if center_D is not None:
        x = x - center_D.astype(dtype)
    v = vectors_CD.astype(dtype)
    dots = xp.einsum("...D,CD->...C", x, v)
    if metric == "dot":
        return dots
    return dots / xp.maximum(xp.linalg.norm(x, axis=-1, keepdims=True) * xp.linalg.norm(v, axis=-1), 1e-12)


def split_scores(store: ActivationStore, layer: int, split: str, names: tuple[str, ...], readouts: dict,
                 chunk_docs: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Streams `split`; returns ({readout: scores [X, C]}, true concept [X]). `readouts` maps a name to a
    function acts [X, D] -> scores [X, C]. Only scores (X x C), never activations, are kept."""
    lookup = {k: v for k, v in class_lookup(store, names).items() if v >= 0}
    out: dict[str, list] = {r: [] for r in readouts}
    labels = []
    for chunk in stream_classes(store, layer, split, lookup, chunk_docs):
        keep = chunk.class_X >= 0
        if not keep.any():
            continue
        for r, fn in readouts.items():
            out[r].append(fn(chunk.acts_XD[keep]))
        labels.append(chunk.class_X[keep])
    C = len(names)
    return ({r: np.concatenate(v) if v else np.zeros((0, C)) for r, v in out.items()},
            np.concatenate(labels) if labels else np.zeros((0,), np.int32))


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """One-vs-rest AUROC from average ranks; None without both positives and negatives."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def readout_metrics(scores_XC: np.ndarray, labels_X: np.ndarray) -> dict:
    n, C = scores_XC.shape
    if not n:
        return {"n": 0}
    order = np.argsort(-scores_XC, axis=1, kind="stable")
    k5 = min(5, C)
    per_class = [auroc(scores_XC[:, c], labels_X == c) for c in range(C)]
    valid = [a for a in per_class if a is not None]
    return {"n": int(n), "top1": float(np.mean(order[:, 0] == labels_X)),
            "top5": float(np.mean((order[:, :k5] == labels_X[:, None]).any(1))),
            "macro_auroc": float(np.mean(valid)) if valid else None, "auroc_classes": len(valid)}


# ---- logit lens


def logit_lens(lm, vectors_CD: np.ndarray, names: tuple[str, ...], top_k: int) -> dict:
    """Each vector through the model's final norm and unembedding: top/bottom tokens and the rank (0 = top) of
    the concept's own word (the first non-blank token of " " + name); `lm`'s tokenizer names the tokens."""
    logits = lm.logit_lens(vectors_CD)
    tok = lm.tokenizer
    out = {}
    for c, name in enumerate(names):
        order = np.argsort(-logits[c], kind="stable")
        entry = {"top": [_token(tok, int(t)) for t in order[:top_k]],
                 "bottom": [_token(tok, int(t)) for t in order[::-1][:top_k]]}
        ids = tok.encode(" " + name, add_special_tokens=False) if tok is not None else []
        while ids and not _token(tok, ids[0]).strip():  # byte-level tokenizers split off the space
            ids = ids[1:]
        if ids:
            own = int(ids[0])
            entry["own_token"] = _token(tok, own)
            entry["own_rank"] = int(np.sum(logits[c] > logits[c, own]))
        out[name] = entry
    return out


def _token(tok, t: int) -> str:
    return tok.decode([t], skip_special_tokens=False) if tok is not None else str(t)
