"""The geometry of a layer's concept vectors: PCA, cosine similarities, k-means clusters, and the
correlation of PC1/PC2 with the catalogue's valence and arousal annotations (the study: PC1 ~ valence,
PC2 ~ arousal)."""

from __future__ import annotations

import numpy as np

AROUSAL_CODES = {"high": 1.0, "low": -1.0}


def pca(vectors_CD: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(explained variance ratio [Q], PC scores [C, Q], axes [Q, D]) of the centred vectors, Q = min(C, D)."""
    x = vectors_CD - vectors_CD.mean(0, keepdims=True)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    var = s ** 2
    ratio = var / var.sum() if var.sum() > 0 else np.zeros_like(var)
    # Sign convention: each axis points towards its largest-magnitude score's side.
    sign = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])])
    sign[sign == 0] = 1
    return ratio, u * s * sign, vt * sign[:, None]


def cosine_matrix(vectors_CD: np.ndarray) -> np.ndarray:
    v = vectors_CD / np.maximum(np.linalg.norm(vectors_CD, axis=-1, keepdims=True), 1e-12)
    return v @ v.T


def kmeans(points_CQ: np.ndarray, k: int, seed: int = 0, iters: int = 100) -> np.ndarray:
    """Cluster index [C] per point (k-means++ seeding, Lloyd iterations); k is capped at the number of points."""
    n = len(points_CQ)
    k = min(k, n)
    rng = np.random.default_rng(seed)
    centers = [points_CQ[rng.integers(n)]]
    for _ in range(1, k):
        d2 = np.min(((points_CQ[:, None] - np.array(centers)[None]) ** 2).sum(-1), axis=1)
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1 / n)
        centers.append(points_CQ[rng.choice(n, p=p)])
    centers = np.array(centers)
    assign = np.zeros(n, int)
    for _ in range(iters):
        new = np.argmin(((points_CQ[:, None] - centers[None]) ** 2).sum(-1), axis=1)
        if _ and np.array_equal(new, assign):
            break
        assign = new
        for j in range(k):
            if np.any(assign == j):
                centers[j] = points_CQ[assign == j].mean(0)
    return assign


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def annotation_correlations(names: tuple[str, ...], scores_CQ: np.ndarray) -> dict:
    """Pearson r of PC1/PC2 scores with the catalogue's valence (+1/0/-1) and arousal (high 1 / low -1) over
    the concepts the catalogue annotates."""
    from emojax.corpus.catalogue import load_catalogue

    known = load_catalogue().by_name
    idx = [i for i, n in enumerate(names) if n in known and known[n].arousal in AROUSAL_CODES]
    out: dict = {"n_annotated": len(idx)}
    if not idx:
        return out
    valence = np.array([known[names[i]].valence for i in idx], float)
    arousal = np.array([AROUSAL_CODES[known[names[i]].arousal] for i in idx])
    for pc in range(min(2, scores_CQ.shape[1])):
        out[f"pc{pc + 1}_valence_r"] = pearson(scores_CQ[idx, pc], valence)
        out[f"pc{pc + 1}_arousal_r"] = pearson(scores_CQ[idx, pc], arousal)
    return out


def layer_geometry(names: tuple[str, ...], vectors_CD: np.ndarray, k: int, seed: int) -> dict:
    """The geometry summary of one layer (JSON-ready)."""
    ratio, scores, _ = pca(vectors_CD)
    cos = cosine_matrix(vectors_CD)
    clusters = kmeans(scores, k, seed)
    return {
        "explained_variance": [float(r) for r in ratio[:10]],
        "pc_scores": {n: [float(s) for s in scores[i, :3]] for i, n in enumerate(names)},
        "clusters": {n: int(clusters[i]) for i, n in enumerate(names)},
        "cosine": [[round(float(c), 5) for c in row] for row in cos],
        "annotations": annotation_correlations(names, scores),
    }
