"""The store's arrays and the asynchronous, bounded writes that fill them.

Rows are written in whole write units (outer chunks): a shard's last, partly filled unit is padded with gap
values, so a rewritten shard leaves the same bytes whatever an interrupted earlier run left there.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import tensorstore as ts

from emojax.store import arrays
from emojax.store.arrays import StoreError

DOC_ARRAYS = {  # name -> (dtype, gap value)
    "doc_token_start": ("int64", -1),
    "doc_n_tokens": ("int32", 0),
    "doc_n_pooled": ("int32", 0),
    "doc_label_id": ("int32", -2),
    "doc_split": ("int8", -1),
    "doc_shard_row": ("int32", -1),
}
TOKEN_ID_GAP = -1


def layer_name(layer: int) -> str:
    return f"layer_{layer:02d}"


@dataclass(frozen=True)
class ArraySpec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    write_rows: int
    read_rows: int
    per: str  # "token" or "document": which row range of a shard the array uses


def array_specs(n_token_rows: int, n_doc_rows: int, d_model: int, layers: tuple[int, ...], dtype: str,
                token_rows: tuple[int, int], doc_rows: tuple[int, int]) -> list[ArraySpec]:
    specs = [ArraySpec("token_ids", (n_token_rows,), "int32", *token_rows, rows_kind("token_ids"))]
    specs += [ArraySpec(name, (n_doc_rows,), dt, *doc_rows, rows_kind(name)) for name, (dt, _) in DOC_ARRAYS.items()]
    for layer in layers:
        name = f"{layer_name(layer)}/tokens"
        specs.append(ArraySpec(name, (n_token_rows, d_model), dtype, *token_rows, rows_kind(name)))
        name = f"{layer_name(layer)}/pooled"
        specs.append(ArraySpec(name, (n_doc_rows, d_model), "float32", *doc_rows, rows_kind(name)))
    return specs


def rows_kind(name: str) -> str:
    """Whether an array has a row per token ("token") or per document ("document")."""
    return "document" if name in DOC_ARRAYS or name.endswith("/pooled") else "token"


def array_path(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def create_arrays(root: str, specs: list[ArraySpec]) -> dict[str, ts.TensorStore]:
    """Creates every array, replacing any left by a run that died before it recorded its store.json."""
    return {s.name: arrays.create(array_path(root, s.name), s.shape, s.dtype, s.write_rows, s.read_rows,
                                  replace=True) for s in specs}


def open_arrays(root: str, specs: list[ArraySpec]) -> dict[str, ts.TensorStore]:
    out = {}
    for s in specs:
        a = arrays.open_array(array_path(root, s.name))
        if tuple(a.shape) != s.shape or a.dtype.name != s.dtype:
            raise StoreError(f"{array_path(root, s.name)}: shape {tuple(a.shape)} {a.dtype.name}, expected "
                             f"{s.shape} {s.dtype}; the store does not match its store.json")
        out[s.name] = a
    return out


class Writes:
    """Array writes in flight, at most `limit`; waiting on one that failed raises a StoreError (a DiskFullError
    when the disk is full)."""

    def __init__(self, limit: int, root: str = ""):
        self.limit = limit
        self.root = root  # the store, so that an error names the array's full path
        self.pending: deque = deque()
        self.bytes_written = 0

    def write(self, array: ts.TensorStore, start: int, values: np.ndarray, what: str) -> None:
        stop = min(start + len(values), array.shape[0])
        future = array[start:stop].write(values[: stop - start])
        self.pending.append((future, what, start, stop, values.nbytes))
        while len(self.pending) > self.limit:
            self._wait_oldest()

    def wait_all(self) -> None:
        while self.pending:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        future, what, start, stop, nbytes = self.pending.popleft()
        try:
            future.commit.result()
        except Exception as e:  # tensorstore reports I/O failures as ValueError or OSError
            self.pending.clear()
            path = array_path(self.root, what) if self.root else what
            raise arrays.write_error(path, e, f"writing rows {start}:{stop} failed") from None
        self.bytes_written += nbytes


class ChunkedRows:
    """Rows appended in order to one array from `start`, written a whole write unit at a time."""

    def __init__(self, array: ts.TensorStore, start: int, unit: int, writes: Writes, what: str, gap=0):
        self.array, self.unit, self.writes, self.what, self.gap = array, unit, writes, what, gap
        self.next_start = start
        self.buffer = self._new()
        self.filled = 0

    def _new(self) -> np.ndarray:
        return np.full((self.unit, *self.array.shape[1:]), self.gap, self.array.dtype.numpy_dtype)

    def append(self, rows: np.ndarray) -> None:
        while len(rows):
            take = min(len(rows), self.unit - self.filled)
            self.buffer[self.filled:self.filled + take] = rows[:take]
            self.filled += take
            rows = rows[take:]
            if self.filled == self.unit:
                self._flush()

    def close(self) -> None:
        if self.filled:
            self._flush()

    def _flush(self) -> None:
        self.writes.write(self.array, self.next_start, self.buffer, self.what)
        self.next_start += self.unit
        self.buffer, self.filled = self._new(), 0
