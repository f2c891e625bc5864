"""Which stored files a completed shard needs, and which of them are absent.

TensorStore reads a unit (outer chunk) whose file is absent as the fill value (zeros), without an error: a
deleted or never-copied file would silently turn into zero activations and "train" documents of label 0. Every
unit a completed shard covers was written, and arrays.py stores every written unit as a file, so each of those
files must be there. One key listing per array (cheap: it reads no data) finds the absent ones. The reader
raises on them; the dump raises too, or with dump.verify rewrites their shards (`damaged_shards`).
"""

from __future__ import annotations

from dataclasses import dataclass

import tensorstore as ts

from emojax.store.arrays import StoreError, read_rows
from emojax.store.layout import ShardRange
from emojax.store.state import KeyValueFolder
from emojax.store.writer import array_path as path_of


@dataclass(frozen=True)
class MissingFile:
    array: str  # e.g. "layer_02/tokens"
    key: str  # the file under the array's folder, e.g. "c/3/0"
    shard: str  # the corpus shard whose rows it holds
    start: int  # its rows [start, stop)
    stop: int

    def describe(self, root: str) -> str:
        return (f"{root.rstrip('/')}/{self.array}/{self.key} is missing (rows {self.start}:{self.stop} of "
                f"{self.array}, corpus shard {self.shard}, recorded as complete)")


def chunk_key(unit: int, rank: int) -> str:
    """The file of write unit `unit` (zarr3 default key encoding; the row dimension is the only one split)."""
    return "/".join(["c", str(unit), *["0"] * (rank - 1)])


def stored_keys(array_path: str) -> set[str]:
    """The chunk files present under one array's folder (temporary `.__lock` files of a write are not keys)."""
    try:
        return set(KeyValueFolder(array_path).list("c/"))
    except ValueError as e:
        raise StoreError(f"{array_path}: cannot list the stored files ({e})") from None


def shard_rows(shard: ShardRange, per: str) -> tuple[int, int]:
    """The rows [start, stop) an array of kind `per` ("token" or "document") holds for `shard`."""
    if per == "token":
        return shard.token_start, shard.token_start + shard.n_tokens
    return shard.doc_start, shard.doc_start + shard.n_docs


def missing_files(array_path: str, name: str, array: ts.TensorStore, per: str,
                  shards: list[ShardRange]) -> list[MissingFile]:
    """The absent files among the units that the (completed) `shards` cover in one array."""
    unit = array.chunk_layout.write_chunk.shape[0]
    present = None
    out = []
    for shard in shards:
        start, stop = shard_rows(shard, per)
        for u in range(start // unit, -(-stop // unit)):
            if present is None:
                present = stored_keys(array_path)
            key = chunk_key(u, array.rank)
            if key not in present:
                out.append(MissingFile(name, key, shard.name, u * unit, min((u + 1) * unit, array.shape[0])))
    return out


def damaged_shards(out: str, verify: bool, complete: list[ShardRange], arrays: dict, specs, log) -> set[str]:
    """Complete shards to rewrite. A file absent from one is always found (one listing per array); without
    dump.verify that is an error, since only verify rewrites finished work. With it, every row is also read
    back (checksums verified) and any damaged shard is rewritten."""
    lost: dict[str, list[MissingFile]] = {}
    for spec in specs:
        for m in missing_files(path_of(out, spec.name), spec.name, arrays[spec.name], spec.per, complete):
            lost.setdefault(m.shard, []).append(m)
    if lost and not verify:
        files = [m for ms in lost.values() for m in ms]
        more = f" (and {len(files) - 1} more files, in shard(s) {', '.join(sorted(lost))})" if len(files) > 1 else ""
        raise StoreError(f"{files[0].describe(out)}{more}; rerun the dump with dump.verify=true to "
                         "rewrite what is missing")
    damaged = set()
    for shard in complete:
        if shard.name in lost:
            log(f"dump: verify: {shard.name} will be rewritten: {lost[shard.name][0].describe(out)}")
            damaged.add(shard.name)
        elif verify and not readable(shard, arrays, specs, log):
            damaged.add(shard.name)
    return damaged


def readable(where: ShardRange, arrays: dict, specs, log) -> bool:
    """Reads every row of a complete shard back (checksums verified); False if any is damaged."""
    for spec in specs:
        start, stop = shard_rows(where, spec.per)
        unit = spec.write_rows
        try:
            read_rows(arrays[spec.name], start, start + -(-(stop - start) // unit) * unit, spec.name)
        except StoreError as e:
            log(f"dump: verify: {where.name} will be rewritten: {e}")
            return False
    return True
