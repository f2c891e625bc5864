"""Reading the corpus stage's manifest and Parquet shards for the dump, with errors that name the file."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from emojax.errors import EmojaxError

COLUMNS = ["doc_id", "label_id", "split", "tokens", "n_tokens"]


class CorpusReadError(EmojaxError):
    """A corpus manifest or shard the dump cannot use."""


@dataclass(frozen=True)
class CorpusShard:
    name: str
    doc_ids: list[str]
    label_ids: np.ndarray  # [n] int32 (-1 neutral)
    splits: list[str]
    offsets: np.ndarray  # [n + 1] int64 into `tokens`
    tokens: np.ndarray  # [total] int32

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def read_bytes(path: str) -> bytes:
    fs, p = _filesystem(path)
    try:
        with fs.open_input_stream(p) as f:
            return f.read()
    except OSError as e:
        raise CorpusReadError(f"{path}: cannot read ({e})") from None


def read_manifest(corpus: str) -> dict:
    path = join(corpus, "manifest.json")
    try:
        manifest = json.loads(read_bytes(path))
    except CorpusReadError:
        raise CorpusReadError(f"{path}: missing; run the corpus stage first (emojax corpus build)") from None
    except ValueError as e:
        raise CorpusReadError(f"{path}: not valid JSON ({e}); rebuild the corpus") from None
    for key in ("shards", "tokenizer_sha256", "label_ids", "max_tokens"):
        if key not in manifest:
            raise CorpusReadError(f"{path}: missing key {key!r}; not a corpus manifest of this emojax version")
    return manifest


def read_lengths(corpus: str, info: dict) -> tuple[list[str], np.ndarray]:
    """One shard's document ids and token counts, reading only those two columns (a cheap check before any
    compute: which documents are longer than the model can take)."""
    path = join(corpus, "shards", info["name"])
    fs, p = _filesystem(path)
    try:
        table = pq.read_table(p, columns=["doc_id", "n_tokens"], filesystem=fs)
    except Exception as e:  # pyarrow raises several types for missing or damaged files
        raise CorpusReadError(f"{path}: not a readable corpus shard ({e}); rebuild the corpus") from None
    return table.column("doc_id").to_pylist(), np.asarray(table.column("n_tokens"), np.int64)


def read_shard(corpus: str, info: dict) -> CorpusShard:
    """One shard, checked against the manifest's checksum and counts."""
    path = join(corpus, "shards", info["name"])
    data = read_bytes(path)
    if info.get("sha256") and hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise CorpusReadError(f"{path}: content does not match the manifest's checksum (changed or corrupted "
                              "after the corpus was built); rebuild the corpus")
    try:
        table = pq.read_table(pa.BufferReader(data), columns=COLUMNS)
    except Exception as e:  # pyarrow raises several types for damaged files
        raise CorpusReadError(f"{path}: not a readable corpus shard ({e}); rebuild the corpus") from None
    tokens_col = table.column("tokens").combine_chunks()
    offsets = np.asarray(tokens_col.offsets, np.int64)
    tokens = np.asarray(tokens_col.values, np.int32)
    shard = CorpusShard(
        name=info["name"],
        doc_ids=table.column("doc_id").to_pylist(),
        label_ids=np.asarray(table.column("label_id"), np.int32),
        splits=table.column("split").to_pylist(),
        offsets=offsets - offsets[0],
        tokens=tokens[offsets[0]:offsets[-1]],
    )
    if len(shard.doc_ids) != int(info["rows"]) or int(shard.lengths.sum()) != int(info["tokens"]):
        raise CorpusReadError(f"{path}: holds {len(shard.doc_ids)} documents / {int(shard.lengths.sum())} tokens, "
                              f"the manifest says {info['rows']} / {info['tokens']}; rebuild the corpus")
    return shard
