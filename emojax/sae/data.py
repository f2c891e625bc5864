"""Where the trainer's token batches come from: the activation store, or arrays in memory (tests, benches).

A source yields batches with `acts [B, D]`, `rows [B]` (where each token came from, for error reports) and
`index`; `batches(start)` restarts exactly at batch `start` (the data position kept in checkpoints).
`identity()` names the data by content (a resumed run must read the same tokens; a moved store still does).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from emojax.digest import digest
from emojax.store.reader import ActivationStore, TokenBatch


class BatchSource(Protocol):
    d_model: int
    batch_size: int

    def batches(self, start: int = 0) -> Iterator[TokenBatch]: ...

    def identity(self) -> str: ...


def source_identity(source: BatchSource) -> str:
    """The source's content identity; "" for a source that has none (then a resume cannot check its data)."""
    identity = getattr(source, "identity", None)
    return identity() if callable(identity) else ""


@dataclass
class ArraySource:
    """Batches of rows of an in-memory array [rows, D], in a seeded permutation per epoch."""

    acts: np.ndarray
    batch_size: int
    seed: int = 0

    @property
    def d_model(self) -> int:
        return int(self.acts.shape[1])

    def identity(self) -> str:
        """sha256 of the array's shape, dtype, bytes and the permutation seed."""
        acts = np.ascontiguousarray(self.acts)
        h = hashlib.sha256(f"{acts.shape}:{acts.dtype}:{self.seed}".encode())
        h.update(acts.reshape(-1).view(np.uint8))
        return h.hexdigest()

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

    def identity(self) -> str:
        """sha256 of what store.json says about the content (fingerprints of model, tokenizer, corpus and capture
        settings, shapes), never its path: a moved store keeps its identity, a re-dumped one does not."""
        state = self.store.state
        record = {"fingerprints": state.get("fingerprints"), "d_model": state.get("d_model"),
                  "dtype": state.get("dtype"), "n_docs": state.get("n_docs"), "n_tokens": state.get("n_tokens")}
        return digest(record)

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
