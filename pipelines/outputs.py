"""What the pipelines write, each file whole: the corpus's shards (rows sorted by doc_id) with their packed twins,
rejected.jsonl and manifest.json (written only when every input row is accounted for), and the pieces the screen
pipeline shares (shard names, Parquet bytes, atomic writes on any Beam filesystem, full-disk errors).

A local path goes through emojax.fileio (temp file, fsync, rename; a full disk is a DiskFullError naming it); any
other Beam filesystem gets a temp name and a rename, so a crash leaves whole files and a rerun rewrites them.
"""

from __future__ import annotations

import hashlib
import io
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from emojax.corpus.config import CorpusConfig
from emojax.fileio import DiskFullError, disk_full, disk_full_cause, write_bytes

SHARD_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("text_sha256", pa.string()), ("label", pa.string()), ("label_id", pa.int32()),
    ("label_ids", pa.list_(pa.int32())), ("split", pa.string()), ("tokens", pa.list_(pa.int32())),
    ("n_tokens", pa.int32()), ("source", pa.string()), ("text", pa.string()),
])



def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def shard_path(out: str, index: int, n: int) -> str:
    return FileSystems.join(out, "shards", f"part-{index:05d}-of-{n:05d}.parquet")


def location_key(source: str, location: str) -> tuple:
    """Orders locations naturally ("line 9" before "line 10")."""
    return (source, *(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", location)))



PACKED_SCHEMA = pa.schema([("tokens", pa.list_(pa.int32())), ("n_real", pa.int32()),
                           ("doc_ids", pa.list_(pa.string()))])


def pack(rows: list[dict], length: int, pad_id: int) -> list[dict]:
    """Train-split token rows concatenated in doc_id order and cut into rows of exactly `length` tokens (for
    SAE training). The last row is padded with `pad_id`; `n_real` counts its real tokens."""
    if length < 1:
        raise ValueError(f"pack_length must be a positive number of tokens, got {length}")
    packed, current, ids = [], [], []
    for r in rows:
        if r["split"] != "train":
            continue
        tokens = list(r["tokens"])
        ids.append(r["doc_id"])
        while tokens:
            take = length - len(current)
            current += tokens[:take]
            tokens = tokens[take:]
            if len(current) == length:
                packed.append({"tokens": current, "n_real": length, "doc_ids": ids})
                current, ids = [], ([r["doc_id"]] if tokens else [])
    if current:
        packed.append({"tokens": current + [pad_id] * (length - len(current)), "n_real": len(current),
                       "doc_ids": ids})
    return packed


def parquet_bytes(rows: list[dict], schema: pa.Schema) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer, compression="zstd")
    return buffer.getvalue()


def write_shard(item: tuple[int, dict], out: str, n_shards: int, pack_length: int = 0, pad_id: int = 0) -> dict:
    """Writes one shard (rows sorted by doc_id), atomically, and its packed twin when pack_length > 0;
    returns the shard's name, row count and checksum."""
    index, grouped = item
    rows = sorted(grouped["rows"], key=lambda r: r["doc_id"])
    data = parquet_bytes(rows, SHARD_SCHEMA)
    path = shard_path(out, index, n_shards)
    write_atomic(path, data)
    info = {"name": path.rsplit("/", 1)[-1], "rows": len(rows), "tokens": sum(r["n_tokens"] for r in rows),
            "sha256": hashlib.sha256(data).hexdigest()}
    if pack_length:
        packed = parquet_bytes(pack(rows, pack_length, pad_id), PACKED_SCHEMA)
        write_atomic(FileSystems.join(out, "packed", info["name"]), packed)
        info["packed_sha256"] = hashlib.sha256(packed).hexdigest()
    return info


def write_atomic(path: str, data: bytes) -> None:
    if "://" not in path:  # a local file: temp + fsync + rename, a full disk is a DiskFullError naming it
        write_bytes(path, data)
        return
    tmp = path + ".tmp"
    with FileSystems.create(tmp) as f:
        f.write(data)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])


def write_rejected(rejected: list[dict], out: str) -> int:
    rejected = sorted(rejected, key=lambda r: (*location_key(r["source"], r["location"]), r["doc_id"], r["reason"]))
    write_atomic(FileSystems.join(out, "rejected.jsonl"),
                  "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejected).encode())
    return len(rejected)


def write_manifest(_, out: str, config: CorpusConfig, tokenizer_fingerprint: str, label_ids: dict[str, int],
                   shards: list[dict], counts: list[tuple[tuple[str, str], int]], rejected: list[dict],
                   n_in: int, n_truncated: int = 0) -> dict:
    """Writes manifest.json, after checking that every input row is accounted for (else `AccountingError`
    and no manifest)."""
    per_label: dict[str, dict[str, int]] = {}
    for (label, split), n in sorted(counts):
        per_label.setdefault(label, {})[split] = n
    per_split: dict[str, int] = {}
    for (_, split), n in counts:
        per_split[split] = per_split.get(split, 0) + n
    deduped = sum(1 for r in rejected if r["kind"] == "duplicate")
    written = sum(s["rows"] for s in shards)
    if n_in != written + len(rejected):
        raise AccountingError(f"{FileSystems.join(out, 'manifest.json')}: {n_in} documents in, but {written} "
                              f"written + {len(rejected) - deduped} rejected + {deduped} deduplicated = "
                              f"{written + len(rejected)}; rows were lost or duplicated inside the pipeline (a bug: "
                              "please report it). No manifest was written.")
    manifest = {
        "format": "emojax-corpus-v1",
        "config_sha256": config.fingerprint(),
        "tokenizer": config.tokenizer, "tokenizer_sha256": tokenizer_fingerprint,
        "max_tokens": config.max_tokens, "pack_length": config.pack_length,
        "label_ids": label_ids,
        "documents_in": n_in, "documents_written": written,
        "rejected": len(rejected) - deduped, "deduplicated": deduped, "documents_truncated": n_truncated,
        "tokens_written": sum(s["tokens"] for s in shards),
        "per_split": dict(sorted(per_split.items())), "per_label": per_label,
        "shards": sorted(shards, key=lambda s: s["name"]),
    }
    write_atomic(FileSystems.join(out, "manifest.json"),
                  (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return manifest


class AccountingError(RuntimeError):
    """Input rows != written + rejected + deduplicated: a bug in the pipeline or the runner, never user input."""


def disk_full_in(error: BaseException, out: str) -> DiskFullError | None:
    """The full disk behind an error a Beam runner re-raised (it wraps what a transform raised)."""
    e = disk_full_cause(error)
    if e is None or isinstance(e, DiskFullError):
        return e
    return disk_full(getattr(e, "filename", None) or out)
