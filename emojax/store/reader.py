"""Reading an activation store: pooled rows by label and split, and shuffled token batches for SAE training.

    store = ActivationStore("runs/demo/activations")
    for chunk in store.iter_pooled(layer=4, split="train"):     # PooledChunk: acts [n, D] float32, labels, rows
        ...
    batches = store.token_batches(layer=4, batch_size=4096, seed=0)  # resumable: start_batch=k
    for batch in batches: ...                                   # TokenBatch: acts [batch_size, D], rows, index

Token batches come from whole read chunks (the store's inner chunks) taken in a seeded permutation, a group of
`buffer_chunks` at a time, whose valid rows (gap rows are skipped) are shuffled in memory. The sequence is a
pure function of (seed, batch_size, buffer_chunks, split), so a run restarted at batch k sees exactly the
batches it would have seen. Read throughput is counted in `read_stats`.

Only completed shards are data. A file absent from one (deleted, never copied) is a StoreError naming it, found
by one key listing per array on its first read (completeness.py), since TensorStore would return zeros. With
`allow_incomplete`, the documents of shards still being written are left out of `docs` and everything built
on it, so no unwritten row is ever read as a document.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from emojax.store.arrays import StoreError, open_array, read_rows
from emojax.store.completeness import MissingFile, missing_files
from emojax.store.layout import ShardRange
from emojax.store.state import SPLIT_CODES, KeyValueFolder
from emojax.store.writer import DOC_ARRAYS, array_path, layer_name, rows_kind

NEUTRAL_ID = -1


@dataclass
class ReadStats:
    bytes: int = 0
    seconds: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)


@dataclass(frozen=True)
class DocTable:
    """Per-document metadata of the stored documents (gap rows removed), in store order."""

    rows: np.ndarray  # [n] int64 store document rows
    label_id: np.ndarray  # [n] int32 (-1 neutral)
    split: np.ndarray  # [n] int8 codes (SPLIT_CODES)
    token_start: np.ndarray  # [n] int64 first token row
    n_tokens: np.ndarray  # [n] int32
    n_pooled: np.ndarray  # [n] int32 positions averaged into the pooled row


@dataclass(frozen=True)
class PooledChunk:
    acts: np.ndarray  # [n, D] float32
    label_id: np.ndarray  # [n]
    split: np.ndarray  # [n]
    rows: np.ndarray  # [n] store document rows


@dataclass(frozen=True)
class TokenBatch:
    acts: np.ndarray  # [batch_size, D] in the store dtype
    rows: np.ndarray  # [batch_size] store token rows (to trace a bad value back to its document)
    index: int  # position in the batch sequence (resume with start_batch=index + 1)


class ActivationStore:
    def __init__(self, path: str, allow_incomplete: bool = False):
        self.path = str(path)
        self.stats = ReadStats()
        folder = KeyValueFolder(self.path)
        state = folder.read_json("store.json")
        if state is None:
            raise StoreError(f"{self.path}: no store.json; not an activation store (run the dump stage first)")
        if not state.get("complete") and not allow_incomplete:
            missing = len(state["shards"]) - len(state["complete_shards"])
            raise StoreError(f"{self.path}: the dump is incomplete ({missing} of {len(state['shards'])} shards "
                             "missing); rerun the dump stage to finish it")
        self.state = state
        self.layers: tuple[int, ...] = tuple(state["layers"])
        self.d_model: int = state["d_model"]
        self.dtype: str = state["dtype"]
        self.label_ids: dict[str, int] = dict(state["label_ids"])
        self.label_names: dict[int, str] = {v: k for k, v in self.label_ids.items()}
        self._folder = folder
        self._arrays: dict = {}
        self._missing: dict[str, list[MissingFile]] = {}
        self._docs: DocTable | None = None
        done = set(state["complete_shards"])
        if not state.get("complete"):  # a dump in progress records shards here before store.json lists them
            done |= folder.recorded_shards()
        self.complete_shards = [ShardRange(*(s[f] for f in ShardRange.__dataclass_fields__))
                                for s in state["shards"] if s["name"] in done]  # in store order

    # ---- arrays and metadata

    def _array(self, name: str):
        if name not in self._arrays:
            array = open_array(array_path(self.path, name))
            self._missing[name] = missing_files(array_path(self.path, name), name, array, rows_kind(name),
                                                self.complete_shards)
            self._arrays[name] = array
        return self._arrays[name]

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        self._array(name)
        for m in self._missing[name]:
            if m.start < stop and start < m.stop:
                raise StoreError(f"{m.describe(self.path)}: its rows would read as zeros; rerun the dump with "
                                 "dump.verify=true to rewrite them")
        t = time.perf_counter()
        out = read_rows(self._array(name), start, stop, f"{self.path}/{name}")
        self.stats.seconds += time.perf_counter() - t
        self.stats.bytes += out.nbytes
        return out

    def check_layer(self, layer: int) -> str:
        if int(layer) not in self.layers:
            raise StoreError(f"{self.path}: layer {layer} is not in the store (layers: {list(self.layers)}); "
                             "dump it first (dump.layers)")
        return layer_name(int(layer))

    @property
    def docs(self) -> DocTable:
        if self._docs is None:
            n = self.state["n_doc_rows"]
            cols = {name: self._read(name, 0, n) for name in DOC_ARRAYS}
            written = np.zeros(n, bool)  # rows of completed shards; the rest may never have been written
            for shard in self.complete_shards:
                written[shard.doc_start:shard.doc_start + shard.n_docs] = True
            keep = written & (cols["doc_split"] >= 0)
            self._docs = DocTable(rows=np.flatnonzero(keep), label_id=cols["doc_label_id"][keep],
                                  split=cols["doc_split"][keep], token_start=cols["doc_token_start"][keep],
                                  n_tokens=cols["doc_n_tokens"][keep], n_pooled=cols["doc_n_pooled"][keep])
        return self._docs

    def doc_ids(self) -> list[str]:
        """Document ids in store order (the order of `docs`)."""
        ids: list[str] = []
        for shard in self.complete_shards:
            record = self._folder.read_json(f"shards/{shard.name}.json")
            if record is None:
                raise StoreError(f"{self.path}/shards/{shard.name}.json is missing, but store.json lists shard "
                                 f"{shard.name} as complete; rerun the dump with dump.verify=true")
            ids += record["doc_ids"]
        return ids

    def select(self, split: str | tuple[str, ...] | None = None, labels=None) -> np.ndarray:
        """Indices into `docs` of the documents in `split` (name or names) with a label in `labels` (names)."""
        docs = self.docs
        keep = np.ones(len(docs.rows), bool)
        if split is not None:
            names = (split,) if isinstance(split, str) else tuple(split)
            unknown = [s for s in names if s not in SPLIT_CODES]
            if unknown:
                raise StoreError(f"unknown split(s) {unknown}; splits: {list(SPLIT_CODES)}")
            keep &= np.isin(docs.split, [SPLIT_CODES[s] for s in names])
        if labels is not None:
            unknown = [name for name in labels if name not in self.label_ids]
            if unknown:
                raise StoreError(f"{self.path}: label(s) {unknown} are not in the store's label table")
            keep &= np.isin(docs.label_id, [self.label_ids[name] for name in labels])
        return np.flatnonzero(keep)

    # ---- pooled rows

    def pooled(self, layer: int, rows: np.ndarray) -> np.ndarray:
        """Pooled means [len(rows), D] float32 of the given store document rows (read in contiguous runs)."""
        name = f"{self.check_layer(layer)}/pooled"
        rows = np.asarray(rows, np.int64)
        if not len(rows):
            return np.zeros((0, self.d_model), np.float32)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        return self._read(name, lo, hi)[rows - lo]

    def iter_pooled(self, layer: int, split=None, labels=None, chunk_docs: int = 4096) -> Iterator[PooledChunk]:
        """The selected documents' pooled means, `chunk_docs` at a time (memory stays bounded)."""
        docs = self.docs
        index = self.select(split, labels)
        for i in range(0, len(index), chunk_docs):
            part = index[i:i + chunk_docs]
            rows = docs.rows[part]
            yield PooledChunk(self.pooled(layer, rows), docs.label_id[part], docs.split[part], rows)

    # ---- token rows

    def tokens(self, layer: int, start: int, stop: int) -> np.ndarray:
        """Token-level activations of store rows [start, stop) in the store dtype."""
        return self._read(f"{self.check_layer(layer)}/tokens", start, stop)

    def token_ids(self, start: int, stop: int) -> np.ndarray:
        return self._read("token_ids", start, stop)

    def document_tokens(self, layer: int, doc: int) -> np.ndarray:
        """All token activations [n_tokens, D] of the document at index `doc` of `docs`."""
        start = int(self.docs.token_start[doc])
        return self.tokens(layer, start, start + int(self.docs.n_tokens[doc]))

    def token_batches(self, layer: int, batch_size: int, seed: int = 0, buffer_chunks: int = 64,
                      start_batch: int = 0, split=("train",), prefetch: bool = True) -> TokenBatches:
        return TokenBatches(self, layer, batch_size, seed, buffer_chunks, start_batch, split, prefetch)


@dataclass
class TokenBatches:
    """An endless, resumable stream of shuffled token batches (epochs follow each other)."""

    store: ActivationStore
    layer: int
    batch_size: int
    seed: int = 0
    buffer_chunks: int = 64
    start_batch: int = 0
    split: tuple[str, ...] | str | None = ("train",)
    prefetch: bool = True
    _counts: dict = field(default_factory=dict)

    def __post_init__(self):
        self.name = f"{self.store.check_layer(self.layer)}/tokens"
        array = self.store._array(self.name)
        self.chunk = array.chunk_layout.read_chunk.shape[0]
        self.n_chunks = -(-array.shape[0] // self.chunk)
        docs = self.store.docs
        self._doc_index = self.store.select(self.split)
        if not len(self._doc_index):
            raise StoreError(f"{self.store.path}: no documents in split {self.split!r} to sample tokens from")
        # A BOS never enters SAE training: stores that record leaving it out of the pooled means (the dump names
        # the tokenizer's BOS) start every document one row later.
        pooling = (self.store.state.get("fingerprints", {}).get("capture") or {}).get("pooling") or {}
        skip = int(pooling.get("bos_id_left_out") is not None)
        self._starts = docs.token_start[self._doc_index] + skip
        self._ends = docs.token_start[self._doc_index] + docs.n_tokens[self._doc_index]
        # Chunks that hold at least one selected token.
        first = self._starts // self.chunk
        last = (self._ends - 1) // self.chunk
        useful = np.zeros(self.n_chunks, bool)
        for a, b in zip(first, last):
            useful[a:b + 1] = True
        self.chunks = np.flatnonzero(useful)

    def _valid(self, start: int, stop: int) -> np.ndarray:
        """Which rows of [start, stop) belong to a selected document."""
        rows = np.arange(start, stop)
        d = np.searchsorted(self._starts, rows, side="right") - 1
        ok = d >= 0
        ok[ok] &= rows[ok] < self._ends[d[ok]]
        return ok

    def _group_chunks(self, epoch: int, group: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.chunks)
        return np.sort(perm[group * self.buffer_chunks:(group + 1) * self.buffer_chunks])

    def _groups_per_epoch(self) -> int:
        return -(-len(self.chunks) // self.buffer_chunks)

    def _batches_in(self, epoch: int, group: int) -> int:
        key = (epoch, group)
        if key not in self._counts:
            n = sum(int(self._valid(c * self.chunk, (c + 1) * self.chunk).sum())
                    for c in self._group_chunks(epoch, group))
            self._counts[key] = n // self.batch_size
        return self._counts[key]

    def _load(self, epoch: int, group: int) -> tuple[np.ndarray, np.ndarray]:
        """The group's valid rows, shuffled: (acts [n, D], rows [n])."""
        acts, rows = [], []
        for c in self._group_chunks(epoch, group):
            a, b = int(c * self.chunk), int(min((c + 1) * self.chunk, self.store.state["n_token_rows"]))
            valid = self._valid(a, b)
            acts.append(self.store._read(self.name, a, b)[valid])
            rows.append(np.arange(a, b)[valid])
        acts_n, rows_n = np.concatenate(acts), np.concatenate(rows)
        order = np.random.default_rng([self.seed, epoch, group, 1]).permutation(len(rows_n))
        return acts_n[order], rows_n[order]

    def __iter__(self) -> Iterator[TokenBatch]:
        if not any(self._batches_in(0, g) for g in range(self._groups_per_epoch())):
            raise StoreError(f"{self.store.path}: no group of {self.buffer_chunks} chunks holds batch_size="
                             f"{self.batch_size} selected tokens; lower batch_size or raise buffer_chunks")
        epoch, group, skip = 0, 0, self.start_batch
        index = self.start_batch
        while skip >= self._batches_in(epoch, group):  # find where start_batch falls (token ids only)
            skip -= self._batches_in(epoch, group)
            epoch, group = self._next(epoch, group)
        pool = ThreadPoolExecutor(max_workers=1) if self.prefetch else None
        try:
            current = self._load(epoch, group)
            while True:
                nxt = self._next(epoch, group)
                upcoming = pool.submit(self._load, *nxt) if pool else None
                acts, rows = current
                for k in range(skip, self._batches_in(epoch, group)):
                    s = slice(k * self.batch_size, (k + 1) * self.batch_size)
                    yield TokenBatch(acts[s], rows[s], index)
                    index += 1
                skip = 0
                epoch, group = nxt
                current = upcoming.result() if upcoming else self._load(epoch, group)
        finally:
            if pool:
                pool.shutdown(wait=False)

    def _next(self, epoch: int, group: int) -> tuple[int, int]:
        group += 1
        return (epoch + 1, 0) if group >= self._groups_per_epoch() else (epoch, group)
