"""The fingerprint functions: sha256 of a value's canonical JSON (sorted keys; non-JSON values such as paths
or numpy scalars written with str()), and of named arrays (names, dtypes, shapes and bytes). Equal settings or
arrays give equal digests in any process, on any machine."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np


def digest(value) -> str:
    """Hex sha256 of `value` as canonical JSON."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def fingerprinted(config) -> dict:
    """A config as the plain data its fingerprint hashes: dataclasses.asdict, except that a nested config with a
    `recorded()` method gives what that returns (WorldConfig: `concepts` only when it leaves an emotion out)."""
    def plain(value):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            if callable(getattr(value, "recorded", None)):
                return value.recorded()
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    """Hex sha256 of named arrays: each name, dtype, shape and its bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype}:{a.shape}".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


__all__ = ["arrays_digest", "digest", "fingerprinted"]
