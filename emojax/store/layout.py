"""Where every corpus shard's rows go in the activation store, computed from the corpus manifest alone.

Each corpus shard owns a range of token rows and a range of document rows. Both start on a write-unit
boundary (token_chunk_rows, doc_chunk_rows), so no two shards ever write the same stored shard file: writers
(processes, hosts) need no coordination, and a shard can be rewritten without touching its neighbours. The
rows between one shard's end and the next boundary are gaps: token id -1 and split -1, never read as data.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShardRange:
    index: int
    name: str
    n_docs: int
    n_tokens: int
    doc_start: int
    token_start: int


@dataclass(frozen=True)
class StoreLayout:
    shards: tuple[ShardRange, ...]
    n_doc_rows: int  # including gaps
    n_token_rows: int

    @property
    def n_docs(self) -> int:
        return sum(s.n_docs for s in self.shards)

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.shards)

    def shard(self, name: str) -> ShardRange:
        for s in self.shards:
            if s.name == name:
                return s
        raise KeyError(name)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plan_layout(manifest: dict, token_chunk_rows: int, doc_chunk_rows: int) -> StoreLayout:
    """Row ranges of every shard listed in the manifest (in manifest order)."""
    shards, doc, tok = [], 0, 0
    for i, s in enumerate(manifest["shards"]):
        shards.append(ShardRange(i, s["name"], int(s["rows"]), int(s["tokens"]), doc, tok))
        doc += _round_up(int(s["rows"]), doc_chunk_rows)
        tok += _round_up(int(s["tokens"]), token_chunk_rows)
    # Arrays are never empty (zarr needs a positive extent for its chunk grid).
    return StoreLayout(tuple(shards), max(doc, doc_chunk_rows), max(tok, token_chunk_rows))
