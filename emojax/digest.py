"""The one fingerprint function: sha256 of a value's canonical JSON (sorted keys; non-JSON values such as paths
or numpy scalars written with str()). Equal settings give equal digests in any process, on any machine."""

from __future__ import annotations

import hashlib
import json


def digest(value) -> str:
    """Hex sha256 of `value` as canonical JSON."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


__all__ = ["digest"]
