"""A checkpoint's identity by content, not by path: what the run records, the activation store and the concept
bank keep, so that a bank fitted on one model is never silently used with another, and a moved checkpoint
(same content, new folder) still resumes.

    ident = model_identity("/ckpt/llama")     # {"id", "config", "tensors", "content", "content_kind", ...}
    same_model(ident, other)                  # compares the content-derived fields, never the path

- `config`: sha256 of config.json parsed and re-serialised with sorted keys (formatting does not matter);
- `tensors`: sha256 of every tensor's name, dtype and shape, from the safetensors headers (no weight is read);
- `content`: sha256 of the weight files' bytes when they total at most FULL_HASH_BYTES ("full"), else of the
  headers plus SAMPLES evenly spaced 64 KiB blocks of each file ("sampled": two checkpoints of the same shape
  with different weights differ there with overwhelming probability, and it costs a few ms per file);
- `tokenizer`: sha256 of tokenizer.json, or None when the folder has none;
- `id`: sha256 of the four. Random presets (`random:SHAPE`) are identified by name, since their weights are a
  deterministic function of it (seed 0).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from emojax.digest import digest
from emojax.errors import CheckpointError
from emojax.models.presets import RANDOM_PREFIX

FULL_HASH_BYTES = 512 * 2**20
SAMPLES = 64
BLOCK = 64 * 2**10
_FIELDS = ("config", "tensors", "content", "tokenizer")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _header(file: Path) -> tuple[bytes, int]:
    """A safetensors file's JSON header bytes and the offset where its data starts."""
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{file}: not a safetensors file (shorter than its header length)")
        (n,) = struct.unpack("<Q", raw)
        header = f.read(n)
    if len(header) != n:
        raise CheckpointError(f"{file}: truncated safetensors header")
    return header, 8 + n


def _file_content(file: Path, digest, full: bool) -> None:
    size = os.path.getsize(file)
    digest.update(f"{file.name}:{size}".encode())
    with open(file, "rb") as f:
        if full:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
            return
        for i in range(SAMPLES):
            f.seek((size - BLOCK) * i // max(SAMPLES - 1, 1) if size > BLOCK else 0)
            digest.update(f.read(BLOCK))


def model_identity(path_or_preset: str | Path) -> dict:
    """The content identity of a checkpoint folder (or a random preset). Raises CheckpointError if unreadable."""
    from emojax.models.checkpoint import weight_files  # checkpoint.py imports jax; keep this module light

    name = str(path_or_preset)
    if name.startswith(RANDOM_PREFIX) and not Path(name).exists():
        ident = {"config": _sha(name.encode()), "tensors": _sha(name.encode()), "content": _sha(b"seed 0"),
                 "tokenizer": None, "content_kind": "preset"}
        return {"id": digest([ident[k] for k in _FIELDS]), **ident, "preset": name}
    folder = Path(path_or_preset)
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except OSError as e:
        raise CheckpointError(f"{config_file}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    files = weight_files(folder)
    tensors = []
    for file in files:
        header, _ = _header(file)
        try:
            entries = json.loads(header)
        except ValueError as e:
            raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
        tensors += [(k, v["dtype"], v["shape"]) for k, v in entries.items() if k != "__metadata__"]
    total = sum(os.path.getsize(f) for f in files)
    full = total <= FULL_HASH_BYTES
    content = hashlib.sha256()
    for file in files:
        _file_content(file, content, full)
    ident = {"config": digest(config), "tensors": digest(sorted(tensors)),
             "content": content.hexdigest(), "content_kind": "full" if full else "sampled",
             "tokenizer": _sha((folder / "tokenizer.json").read_bytes()) if (folder / "tokenizer.json").is_file()
             else None}
    return {"id": digest([ident[k] for k in _FIELDS]), **ident, "bytes": total}


def same_model(a: dict | None, b: dict | None) -> bool:
    """True when two identities name the same weights (paths are never compared)."""
    return bool(a) and bool(b) and all(a.get(k) == b.get(k) for k in _FIELDS)


def describe_difference(a: dict, b: dict) -> str:
    """Which part differs, for error messages: 'config', 'tensor shapes' or 'weights'."""
    if a.get("config") != b.get("config"):
        return "config.json differs"
    if a.get("tensors") != b.get("tensors"):
        return "tensor names, dtypes or shapes differ"
    if a.get("tokenizer") != b.get("tokenizer"):
        return "tokenizer.json differs"
    return "same shapes but different weights"


__all__ = ["describe_difference", "model_identity", "same_model"]
