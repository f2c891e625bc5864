"""Ranking and flagging: which samples of a screen stand out on a concept, by one score per sample.

Samples rank by score, highest first, ties by sample id, so the ranking is a pure function of the scores. The
rules (emojax.screen.config.FlagRule): threshold (score >= value), zscore ((score - mean) / std >= value, std over
all samples, n - 1 in the denominator) and top (the highest `value` fraction, at least one sample).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from emojax.screen.config import FlagRule


@dataclasses.dataclass(frozen=True)
class Flags:
    order: np.ndarray  # [X] sample indices, highest score first
    n_flagged: int  # the first n_flagged of `order` are flagged
    cutoff: float  # the score a sample needs to be flagged (for top: the last flagged sample's)
    z: np.ndarray  # [X] z-scores against all samples (0 when every score is the same)
    mean: float
    std: float

    @property
    def flagged(self) -> np.ndarray:
        return self.order[:self.n_flagged]


def rank(scores_X: np.ndarray, ids_X: np.ndarray) -> np.ndarray:
    """Sample indices by score, highest first; equal scores by sample id."""
    return np.lexsort((np.asarray(ids_X, str), -np.asarray(scores_X, np.float64)))


def flag(scores_X: np.ndarray, ids_X: np.ndarray, rule: FlagRule) -> Flags:
    """The samples `rule` flags among scores [X] (one concept's `rule.by` score)."""
    scores = np.asarray(scores_X, np.float64)
    X = len(scores)
    order = rank(scores, ids_X)
    mean = float(scores.mean()) if X else 0.0
    std = float(scores.std(ddof=1)) if X > 1 else 0.0
    z = (scores - mean) / std if std > 0 else np.zeros(X)
    if rule.method == "threshold":
        cutoff = rule.value
        n = int((scores >= cutoff).sum())
    elif rule.method == "zscore":
        cutoff = mean + rule.value * std
        n = int((z >= rule.value).sum())
    else:
        n = min(X, max(1, math.ceil(rule.value * X)))
        cutoff = float(scores[order[n - 1]]) if X else math.nan
    return Flags(order=order, n_flagged=n, cutoff=float(cutoff), z=z, mean=mean, std=std)
