"""A seeded random stream that records the log-probability of every draw it makes.

Each world document is generated from its own stream, seeded by sha256 of (seed, *key), so a document is the
same whatever else is generated and in whatever order. The sum of the recorded log-probabilities is the
log-probability of the document's generation path: its negation is what the world "paid" to write it, the
quantity emojax.world.entropy averages.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np


def stream_seed(seed: int, *key) -> int:
    digest = hashlib.sha256(repr((seed,) + key).encode()).digest()
    return int.from_bytes(digest[:16], "little")


class Draws:
    """Random draws with their log-probabilities (natural log) summed in `log_prob`; `n` counts the draws."""

    def __init__(self, seed: int, *key):
        self.rng = np.random.default_rng(stream_seed(seed, *key))
        self.log_prob = 0.0
        self.n = 0

    def _record(self, p: float) -> None:
        self.log_prob += math.log(p)
        self.n += 1

    def index(self, n: int, p: Sequence[float] | np.ndarray | None = None) -> int:
        """An index in [0, n): uniform, or with probabilities p (summing to 1)."""
        if n < 1:
            raise ValueError("nothing to draw from")
        if p is None:
            i = int(self.rng.integers(n))
            if n > 1:
                self._record(1.0 / n)
            return i
        p = np.asarray(p, np.float64)
        i = int(self.rng.choice(n, p=p))
        if p[i] < 1.0:
            self._record(float(p[i]))
        return i

    def index_logp(self, log_p: np.ndarray) -> int:
        """An index drawn from normalised log-probabilities [n] (for long, peaked distributions)."""
        cdf = np.cumsum(np.exp(log_p - log_p.max()))
        i = min(int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right")), len(log_p) - 1)
        self.log_prob += float(log_p[i])
        self.n += 1
        return i

    def pick(self, seq: Sequence, p=None):
        return seq[self.index(len(seq), p)]

    def chance(self, p: float) -> bool:
        """True with probability p."""
        hit = bool(self.rng.random() < p)
        if 0.0 < p < 1.0:
            self._record(p if hit else 1.0 - p)
        return hit

    def sample(self, seq: Sequence, k: int) -> list:
        """k distinct items in the order drawn (the order is part of the text, so its probability counts)."""
        if k > len(seq):
            raise ValueError(f"cannot draw {k} distinct items from {len(seq)}")
        order = self.rng.permutation(len(seq))[:k]
        for j in range(k):
            if len(seq) - j > 1:
                self._record(1.0 / (len(seq) - j))
        return [seq[i] for i in order]
