"""Bucketed batches: documents grouped by padded length so each bucket compiles once and pads little."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emojax.errors import EmojaxError


@dataclass(frozen=True)
class Batch:
    length: int  # T: the bucket's padded length
    rows: int  # B: the bucket's batch size (documents beyond len(docs) are empty filler rows)
    docs: np.ndarray  # positions of this batch's documents in their corpus shard, in store order


def rows_per_bucket(buckets: tuple[int, ...], tokens_per_batch: int, multiple: int) -> dict[int, int]:
    """Batch size of each bucket: about tokens_per_batch tokens, a multiple of the mesh's batch divisor."""
    return {T: max(multiple, tokens_per_batch // T // multiple * multiple) for T in buckets}


def plan_batches(lengths: np.ndarray, buckets: tuple[int, ...], rows: dict[int, int],
                 shard: str = "") -> list[Batch]:
    """Documents sorted by bucket (stably, so by shard row within a bucket) and cut into batches.

    The concatenated `docs` of the returned batches is the order of the shard's documents in the store.
    """
    lengths = np.asarray(lengths)
    if len(lengths) and lengths.max() > buckets[-1]:
        i = int(np.argmax(lengths))
        raise EmojaxError(f"{shard}: document at row {i} has {int(lengths[i])} tokens, more than the largest "
                          f"bucket ({buckets[-1]}); add a larger bucket or rebuild the corpus with a lower "
                          "max_tokens")
    bucket_of = np.searchsorted(np.asarray(buckets), lengths)  # the smallest bucket that holds the document
    order = np.argsort(bucket_of, kind="stable")
    batches = []
    for b, T in enumerate(buckets):
        docs = order[bucket_of[order] == b]
        B = rows[T]
        batches += [Batch(T, B, docs[i:i + B]) for i in range(0, len(docs), B)]
    return batches


def batch_arrays(batch: Batch, tokens: np.ndarray, offsets: np.ndarray,
                 pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded tokens [B, T] int32 and mask [B, T] int32 (causal attention: padding after a document
    never reaches it, and positions count from 0 as in an unpadded call)."""
    out = np.full((batch.rows, batch.length), pad_id, np.int32)
    mask = np.zeros((batch.rows, batch.length), np.int32)
    for r, d in enumerate(batch.docs):
        ids = tokens[offsets[d]:offsets[d + 1]]
        out[r, :len(ids)] = ids
        mask[r, :len(ids)] = 1
    return out, mask
