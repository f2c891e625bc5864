"""Statistics of behavioural rates: Wilson intervals, a logistic dose-response fit (profile-likelihood interval)
and Elo ratings from pairwise choices (Bradley-Terry)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import special, stats

Z95 = float(stats.norm.ppf(0.975))


def wilson(k: int, n: int, z: float = Z95) -> list[float] | None:
    """The Wilson score 95% interval of a rate k/n (None when n = 0): unlike the normal approximation it stays
    inside [0, 1] and is honest at 0/n and n/n, the cases a dozen samples per condition produce."""
    if n <= 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo, hi = (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))
    return [float(lo), float(hi)]


def bootstrap_mean(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> list[float] | None:
    """95% percentile-bootstrap interval of the mean of `values` (None under two values)."""
    if len(values) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(axis=1)
    return [float(v) for v in np.percentile(means, [2.5, 97.5])]


def _log_lik(X, y, w) -> float:
    z = X @ w
    return float(np.sum(y * z - np.logaddexp(0.0, z)))


def _newton(X, y, w, free, ridge: float, iterations: int = 100) -> np.ndarray:
    """Maximum likelihood over the coordinates `free` of w (the others held), with a tiny ridge."""
    w = w.copy()
    for _ in range(iterations):
        p = special.expit(X @ w)
        Xf = X[:, free]
        grad = Xf.T @ (y - p) - ridge * w[free]
        hess = (Xf * (p * (1 - p))[:, None]).T @ Xf + ridge * np.eye(len(free))
        step = np.linalg.solve(hess, grad)
        w[free] += step
        if np.abs(step).max() < 1e-10:
            break
    return w


def logistic_fit(x: Sequence[float], y: Sequence[int]) -> dict | None:
    """Logistic regression y ~ sigmoid(a + b x) by maximum likelihood, the slope's 95% profile-likelihood interval
    and the likelihood-ratio p-value of b = 0. Profile intervals stay honest when the strengths separate the
    outcomes (a planted effect, a saturated dose): the bound on the open side is then None (unbounded), where a
    Wald interval would cover 0. None when x or y has no spread."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 3 or np.ptp(x) == 0 or y.min() == y.max():
        return None
    X = np.stack([np.ones_like(x), x], axis=1)
    ridge = 1e-8 * len(x)
    w = _newton(X, y, np.zeros(2), [0, 1], ridge)
    best = _log_lik(X, y, w)
    cut = float(stats.chi2.ppf(0.95, 1)) / 2

    def drop(b: float) -> float:  # log-likelihood lost by fixing the slope at b
        return best - _log_lik(X, y, _newton(X, y, np.array([w[0], b]), [0], ridge))

    def bound(direction: int) -> float | None:
        span = max(abs(w[1]), 1.0 / max(np.ptp(x), 1e-12))
        for _ in range(40):
            edge = w[1] + direction * span
            if drop(edge) > cut:
                inner, outer = w[1], edge
                for _ in range(60):
                    mid = (inner + outer) / 2
                    inner, outer = (mid, outer) if drop(mid) <= cut else (inner, mid)
                return float((inner + outer) / 2)
            span *= 2
        return None

    return {"intercept": float(w[0]), "slope": float(w[1]), "slope_ci95": [bound(-1), bound(+1)],
            "p_value": float(stats.chi2.sf(2 * drop(0.0), 1)), "n": int(len(x))}


def elo(pairs: Sequence[tuple[str, str, float]], items: Sequence[str], iterations: int = 200) -> dict[str, float]:
    """Elo ratings (400 log10 odds, mean 0) of `items` from pairwise outcomes (a, b, score of a: 1 win, 0 loss,
    fractional allowed): the Bradley-Terry maximum-likelihood strengths by the MM algorithm, with one virtual
    draw against the average so an item that always wins or loses stays finite."""
    index = {name: i for i, name in enumerate(items)}
    n = len(items)
    wins = np.full(n, 0.5)  # the virtual draw
    games = np.zeros((n, n))
    for a, b, s in pairs:
        i, j = index[a], index[b]
        wins[i] += s
        wins[j] += 1 - s
        games[i, j] += 1
        games[j, i] += 1
    strength = np.ones(n)
    for _ in range(iterations):
        denom = (games / (strength[:, None] + strength[None, :])).sum(axis=1) + 1 / (strength + 1.0)
        new = wins / denom
        new /= np.exp(np.mean(np.log(new)))
        if np.abs(np.log(new / strength)).max() < 1e-9:
            strength = new
            break
        strength = new
    ratings = 400 * np.log10(strength)
    ratings -= ratings.mean()
    return {name: float(ratings[index[name]]) for name in items}
