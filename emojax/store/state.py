"""store.json and the per-shard completion records, read and written through a TensorStore kvstore.

A shard's record (shards/NAME.json) is written by the process that owns the shard, and only after every
array write of that shard has committed; store.json carries the layout and fingerprints and the list of
complete shards (rewritten by the single process after each shard, or by process 0 at the end of a
multi-process run). Both are written atomically, so a killed run leaves either the old or the new file: for a
local folder TensorStore's file driver writes `<key>.__lock`, fsyncs it, renames it over `<key>` and fsyncs
the folder (seen with strace, tensorstore 0.1.86; a failed write removes the temporary file), and object
stores (gs://, s3://) replace an object whole. So these go through the kvstore, not emojax.fileio, and work
the same for every location.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import tensorstore as ts

from emojax.digest import digest
from emojax.store.arrays import StoreError, kvstore, write_error

STORE_FORMAT = "emojax-activations-v1"
SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "implicit": 3}  # -1: gap rows between shards


class KeyValueFolder:
    """Small JSON files under a store folder or URL."""

    def __init__(self, path: str):
        self.path = path
        spec = kvstore(path)
        if isinstance(spec, dict):
            spec = {**spec, "path": str(spec["path"]).rstrip("/") + "/"}
        else:
            spec = spec.rstrip("/") + "/"
        try:
            self.kv = ts.KvStore.open(spec).result()
        except ValueError as e:
            raise StoreError(f"{path}: cannot open the store location ({e})") from None

    def read_json(self, key: str) -> dict | None:
        try:
            result = self.kv.read(key).result()
        except ValueError as e:
            raise StoreError(f"{self.path}/{key}: cannot read ({e})") from None
        if result.state != "value":
            return None
        try:
            return json.loads(result.value)
        except ValueError as e:
            raise StoreError(f"{self.path}/{key}: not valid JSON ({e}); the file is corrupted") from None

    def write_json(self, key: str, value: dict) -> None:
        data = (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()
        try:
            self.kv.write(key, data).result()
        except ValueError as e:
            raise write_error(f"{self.path.rstrip('/')}/{key}", e) from None

    def delete(self, key: str) -> None:
        self.kv.delete_range(ts.KvStore.KeyRange(key, key + "\x00")).result()

    def list(self, prefix: str) -> list[str]:
        """The keys under `prefix`, without the temporary files of writes in flight (or killed)."""
        keys = self.kv.list(ts.KvStore.KeyRange(prefix, prefix + "\xff")).result()
        return sorted(k.decode() for k in keys if not k.endswith(b".__lock"))
    def recorded_shards(self) -> set[str]:
        """The shards whose completion record (shards/NAME.json) exists: written only after all their writes."""
        return {key[len("shards/"):-len(".json")] for key in self.list("shards/") if key.endswith(".json")}


def corpus_fingerprint(manifest: dict) -> str:
    """Changes when any shard's content, the corpus settings or its tokenizer change."""
    key = {"config": manifest.get("config_sha256"), "tokenizer": manifest.get("tokenizer_sha256"),
           "shards": [(s["name"], s.get("sha256")) for s in manifest["shards"]]}
    return digest(key)


def checkpoint_fingerprint(source: str, config_json: dict) -> str:
    """The model fingerprint of stores written before store.json held a model identity (compared only when
    resuming one of those): config.json plus every safetensors file's size and header, and the path."""
    h = hashlib.sha256(json.dumps(config_json, sort_keys=True, default=str).encode())
    h.update(source.encode())
    folder = Path(source)
    if folder.is_dir():
        for f in sorted(folder.glob("*.safetensors")):
            with f.open("rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                h.update(f.name.encode() + f.stat().st_size.to_bytes(8, "little") + fh.read(min(n, 1 << 24)))
    return h.hexdigest()


def describe_mismatch(stored: dict, current: dict, prefix: str = "") -> list[str]:
    """The fingerprint entries that differ (nested settings by their dotted key), as readable lines."""
    lines = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            lines += describe_mismatch(a, b, f"{prefix}{key}.")
        else:
            lines.append(f"{prefix}{key}: store has {_short(a)}, this run has {_short(b)}")
    return lines


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."
