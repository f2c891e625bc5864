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

import warnings
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import rankdata

from emojax.concepts.stats import class_lookup, stream_classes
from emojax.errors import InputError
from emojax.store.reader import NEUTRAL_ID, ActivationStore

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


def neutral_calibration(store: ActivationStore, layer: int, vectors_CD: np.ndarray, center_D: np.ndarray,
                        split: str, max_docs: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """Each concept's readout over neutral text: the mean and standard deviation [C] of the centred cosine over
    the tokens of up to `max_docs` neutral documents of `split` (drawn uniformly, seeded; each document's first
    token, a BOS where the tokenizer adds one, left out), and the token count. Monitor readings are z-scores
    against these, so an alert threshold of 3 means 3 standard deviations above neutral text."""
    docs = store.select(split)
    docs = docs[store.docs.label_id[docs] == NEUTRAL_ID]
    if len(docs) > max_docs:
        docs = np.sort(np.random.default_rng(seed).choice(docs, max_docs, replace=False))
    C = len(vectors_CD)
    total, total_sq, n = np.zeros(C), np.zeros(C), 0
    for doc in docs:
        acts = store.document_tokens(layer, int(doc))[1:].astype(np.float32)
        scores = concept_readout(acts, vectors_CD, center_D)
        total, total_sq, n = total + scores.sum(0), total_sq + (scores ** 2).sum(0), n + len(scores)
    if n < 2:
        return np.zeros(C), np.ones(C), n
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean ** 2, 0.0) * n / (n - 1))
    return mean, np.maximum(std, 1e-6), n


def last_token_scores(store: ActivationStore, layer: int, split: str, names: tuple[str, ...], readouts: dict,
                      ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Like split_scores, read at each document's last token instead of its pooled mean: for implicit scenarios
    framed as a Human turn, the ':' after "Assistant" (the study's position)."""
    lookup = {store.label_ids[n]: c for c, n in enumerate(names)}
    docs = store.select(split)
    docs = docs[np.isin(store.docs.label_id[docs], list(lookup))]
    docs = docs[store.docs.n_tokens[docs] > 0]
    if not len(docs):
        return {r: np.zeros((0, len(names))) for r in readouts}, np.zeros((0,), np.int32)
    last_XD = np.stack([store.document_tokens(layer, int(d))[-1] for d in docs]).astype(np.float32)
    labels = np.array([lookup[int(i)] for i in store.docs.label_id[docs]], np.int32)
    return {r: fn(last_XD) for r, fn in readouts.items()}, labels


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


def class_aurocs(scores_XC: np.ndarray, labels_X: np.ndarray) -> np.ndarray:
    """One-vs-rest AUROC [C] of each class's score column from average ranks (ties share their rank); NaN for a
    class without both positives and negatives."""
    X, C = scores_XC.shape
    ranks = rankdata(scores_XC, axis=0)
    positive = labels_X[:, None] == np.arange(C)[None, :]
    n_pos = positive.sum(0).astype(np.float64)
    n_neg = X - n_pos
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = ((ranks * positive).sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def readout_metrics(scores_XC: np.ndarray, labels_X: np.ndarray, n_boot: int = 200, seed: int = 0) -> dict:
    """Top-1, top-5 and macro one-vs-rest AUROC of scores [X, C] for true classes [X], each with a bootstrap 95%
    interval (`n_boot` resamples of the documents, seeded; percentile method) and its chance level."""
    n, C = scores_XC.shape
    if not n:
        return {"n": 0}
    k5 = min(5, C)
    order = np.argsort(-scores_XC, axis=1, kind="stable")
    hit1, hit5 = order[:, 0] == labels_X, (order[:, :k5] == labels_X[:, None]).any(1)
    aucs = class_aurocs(scores_XC, labels_X)
    valid = ~np.isnan(aucs)
    out = {"n": int(n), "top1": float(hit1.mean()), "top5": float(hit5.mean()),
           "macro_auroc": float(aucs[valid].mean()) if valid.any() else None, "auroc_classes": int(valid.sum()),
           "chance": {"top1": 1 / C, "top5": k5 / C, "macro_auroc": 0.5}}
    if n_boot and n > 1:
        rows = np.random.default_rng(seed).integers(0, n, (n_boot, n))
        draws = {"top1": hit1[rows].mean(1), "top5": hit5[rows].mean(1)}
        if valid.any():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a resample may miss a class: nanmean skips it
                draws["macro_auroc"] = np.array([np.nanmean(class_aurocs(scores_XC[r], labels_X[r])) for r in rows])
        for k, v in draws.items():
            lo, hi = np.nanpercentile(v, [2.5, 97.5])
            out[f"{k}_ci95"] = [float(lo), float(hi)]
    return out


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
