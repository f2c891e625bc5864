"""Where the trainer's token batches come from: the activation store, or arrays in memory (tests, benches).

A source yields batches with `acts [B, D]`, `rows [B]` (where each token came from, for error reports) and
`index`; `batches(start)` restarts exactly at batch `start` (the data position kept in checkpoints).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from emojax.store.reader import ActivationStore, TokenBatch


class BatchSource(Protocol):
    d_model: int
    batch_size: int

    def batches(self, start: int = 0) -> Iterator[TokenBatch]: ...


@dataclass
class ArraySource:
    """Batches of rows of an in-memory array [N, D], in a seeded permutation per epoch."""

    acts: np.ndarray
    batch_size: int
    seed: int = 0

    @property
    def d_model(self) -> int:
        return int(self.acts.shape[1])

    def batches(self, start: int = 0) -> Iterator[TokenBatch]:
        per_epoch = len(self.acts) // self.batch_size
        if per_epoch == 0:
            raise ValueError(f"{len(self.acts)} rows are fewer than batch_size={self.batch_size}")
        index = start
        while True:
            epoch, k = divmod(index, per_epoch)
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.acts))
            rows = perm[k * self.batch_size:(k + 1) * self.batch_size]
            yield TokenBatch(self.acts[rows], rows, index)
            index += 1


@dataclass
class StoreSource:
    """Token batches of one layer of an activation store (chunk-aligned, seeded, resumable)."""

    store: ActivationStore
    layer: int
    batch_size: int
    seed: int = 0
    buffer_chunks: int = 64

    @property
    def d_model(self) -> int:
        return self.store.d_model

    def batches(self, start: int = 0) -> Iterator[TokenBatch]:
        return iter(self.store.token_batches(self.layer, self.batch_size, seed=self.seed,
                                             buffer_chunks=self.buffer_chunks, start_batch=start))


def sample_rows(source: BatchSource, n: int) -> np.ndarray:
    """About n tokens [n', D] float32 from the start of the source's sequence (for initial statistics)."""
    out, have = [], 0
    for batch in source.batches(0):
        acts = np.asarray(batch.acts, np.float32)
        out.append(acts[np.isfinite(acts).all(axis=1)])
        have += len(acts)
        if have >= n:
            break
    return np.concatenate(out)[:n]
