"""The geometry of a layer's concept vectors: PCA, cosine similarities, k-means clusters, and the
correlation of the leading PCs with the concepts' graded valence and arousal (the world's coordinates,
emojax/world/data/coordinates.csv; the study: PC1 ~ valence, PC2 or a mix of PC2 and PC3 ~ arousal)."""

from __future__ import annotations

import numpy as np

from emojax.world import load_coordinates


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


def abs_r_interval(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0) -> list[float] | None:
    """Bootstrap 95% interval of abs(Pearson r) of a and b over resampled concepts (percentile method, seeded);
    resamples without variance on a side are skipped. None with fewer than 3 pairs."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3:
        return None
    rows = np.random.default_rng(seed).integers(0, len(a), (n_boot, len(a)))
    x, y = a[rows] - a[rows].mean(1, keepdims=True), b[rows] - b[rows].mean(1, keepdims=True)
    denom = np.sqrt((x * x).sum(1) * (y * y).sum(1))
    r = np.abs((x * y).sum(1)[denom > 0] / denom[denom > 0])
    return [float(v) for v in np.percentile(r, [2.5, 97.5])] if len(r) else None


def annotation_correlations(names: tuple[str, ...], scores_CQ: np.ndarray) -> tuple[np.ndarray, dict]:
    """(scores [C, Q] with PC1 oriented so that positive valence scores positive, the correlation summary).

    A PC's sign is arbitrary, so every correlation is reported as abs(Pearson r) (`pcK_valence_abs_r`,
    `pcK_arousal_abs_r` for PC1..PC3, each with a bootstrap 95% interval `..._ci95`) over the concepts that have
    graded coordinates (the 171 of the catalogue; valence and arousal in [-1, 1], `load_coordinates`).
    `pc1_flipped` says whether PC1's sign was flipped to orient it; `arousal_pc` names PC2 or PC3, whichever
    tracks arousal more closely (the study found arousal on PC2 or a mix of PC2 and PC3)."""
    coords = load_coordinates()
    known = set(coords.names)
    idx = [i for i, n in enumerate(names) if n in known]
    out: dict = {"n_annotated": len(idx), "source": "graded coordinates (emojax/world/data/coordinates.csv)"}
    if not idx:
        return scores_CQ, out
    rows = [coords.index(names[i]) for i in idx]
    valence, arousal = coords.column("valence")[rows], coords.column("arousal")[rows]
    flip = (pearson(scores_CQ[idx, 0], valence) or 0.0) < 0
    sign_Q = np.ones(scores_CQ.shape[1])
    sign_Q[0] = -1.0 if flip else 1.0
    scores_CQ = scores_CQ * sign_Q
    out["pc1_flipped"] = bool(flip)
    for pc in range(min(3, scores_CQ.shape[1])):
        for key, values in (("valence", valence), ("arousal", arousal)):
            r = pearson(scores_CQ[idx, pc], values)
            out[f"pc{pc + 1}_{key}_abs_r"] = None if r is None else abs(r)
            out[f"pc{pc + 1}_{key}_abs_r_ci95"] = None if r is None else abs_r_interval(scores_CQ[idx, pc], values)
    candidates = [k for k in ("pc2", "pc3") if out.get(f"{k}_arousal_abs_r") is not None]
    if candidates:
        out["arousal_pc"] = max(candidates, key=lambda k: out[f"{k}_arousal_abs_r"])
    return scores_CQ, out


def layer_geometry(names: tuple[str, ...], vectors_CD: np.ndarray, k: int, seed: int) -> dict:
    """The geometry summary of one layer (JSON-ready); PC1 is oriented by valence (annotation_correlations)."""
    ratio, scores, _ = pca(vectors_CD)
    scores, annotations = annotation_correlations(names, scores)
    cos = cosine_matrix(vectors_CD)
    clusters = kmeans(scores, k, seed)
    return {
        "explained_variance": [float(r) for r in ratio[:10]],
        "pc_scores": {n: [float(s) for s in scores[i, :3]] for i, n in enumerate(names)},
        "clusters": {n: int(clusters[i]) for i, n in enumerate(names)},
        "cosine": [[round(float(c), 5) for c in row] for row in cos],
        "annotations": annotations,
    }
