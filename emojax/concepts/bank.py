"""The concept bank: the fitted concept directions of one model, as the steering and monitoring loop loads them.

A bank is a folder with
    bank.safetensors  vectors [C, L, D] float32   the directions used for steering and readout (denoised)
                      raw     [C, L, D] float32   before neutral denoising
                      resid_norm [L] float32      mean residual-stream norm at each layer (the strength unit)
                      neutral_pcs [L, P, D]       the neutral components projected out (optional; zero rows pad P)
                      center  [L, D] float32      the point readouts measure from (optional): x - center
    bank.json         concept names (C), residual indices (L), method, d_model, fingerprints, notes
    eval.json         the held-out evaluation of the fit stage (optional here)

Indices in `layers` are residual-stream indices as in `lm(..., capture=...)`: 0 = embeddings, i = output of
layer i - 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from emojax.errors import EmojaxError

BANK_FORMAT = 1


class BankError(EmojaxError):
    """A concept bank that cannot be read, or a concept/layer it does not hold."""


@dataclass(frozen=True)
class ConceptBank:
    names: tuple[str, ...]
    layers: tuple[int, ...]
    vectors: np.ndarray  # [C, L, D] float32
    raw: np.ndarray  # [C, L, D] float32
    resid_norm: np.ndarray  # [L] float32
    neutral_pcs: np.ndarray | None = None  # [L, P, D] float32
    method: str = "mean_diff"
    info: dict = field(default_factory=dict)  # fingerprints, settings; written to bank.json as is
    center: np.ndarray | None = None  # [L, D] float32: the mean of the concept means (readout origin)

    def __post_init__(self):
        C, L = len(self.names), len(self.layers)
        if self.vectors.ndim != 3 or self.vectors.shape[:2] != (C, L):
            raise BankError(f"vectors must be [concepts={C}, layers={L}, d_model], got {self.vectors.shape}")
        if self.raw.shape != self.vectors.shape:
            raise BankError(f"raw {self.raw.shape} and vectors {self.vectors.shape} differ in shape")
        if self.resid_norm.shape != (L,):
            raise BankError(f"resid_norm must be [layers={L}], got {self.resid_norm.shape}")
        if self.center is not None and self.center.shape != (L, self.vectors.shape[2]):
            raise BankError(f"center must be [layers={L}, d_model], got {self.center.shape}")
        if len(set(self.names)) != C:
            raise BankError("concept names must be unique")

    @property
    def d_model(self) -> int:
        return int(self.vectors.shape[2])

    def concept_index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            close = [n for n in self.names if n.startswith(name[:3])][:5]
            hint = f" (similar: {', '.join(close)})" if close else ""
            raise BankError(f"concept {name!r} is not in the bank{hint}") from None

    def layer_index(self, layer: int) -> int:
        try:
            return self.layers.index(int(layer))
        except ValueError:
            raise BankError(f"layer {layer} is not in the bank (layers: {list(self.layers)})") from None

    def vector(self, name: str, layer: int, unit: bool = False) -> np.ndarray:
        """The direction [D] of concept `name` at residual index `layer` (unit=True: normalised)."""
        v = self.vectors[self.concept_index(name), self.layer_index(layer)]
        return v / max(float(np.linalg.norm(v)), 1e-12) if unit else v

    def at_layer(self, layer: int) -> np.ndarray:
        """All concept directions [C, D] at residual index `layer`."""
        return self.vectors[:, self.layer_index(layer)]

    def save(self, out_dir: str | Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {"vectors": self.vectors.astype(np.float32), "raw": self.raw.astype(np.float32),
                   "resid_norm": self.resid_norm.astype(np.float32)}
        if self.neutral_pcs is not None:
            tensors["neutral_pcs"] = self.neutral_pcs.astype(np.float32)
        if self.center is not None:
            tensors["center"] = self.center.astype(np.float32)
        tmp = out_dir / "bank.safetensors.tmp"
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
        tmp.replace(out_dir / "bank.safetensors")
        meta = {"format": BANK_FORMAT, "names": list(self.names), "layers": list(self.layers),
                "d_model": self.d_model, "method": self.method, **self.info}
        (out_dir / "bank.json").write_text(json.dumps(meta, indent=2) + "\n")
        return out_dir


def load_bank(path: str | Path) -> ConceptBank:
    """Reads a bank folder (or its bank.json / bank.safetensors)."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    meta_file, weights = path / "bank.json", path / "bank.safetensors"
    for f in (meta_file, weights):
        if not f.is_file():
            raise BankError(f"{f}: missing; a concept bank folder holds bank.json and bank.safetensors "
                            "(written by `emojax fit`)")
    try:
        meta = json.loads(meta_file.read_text())
        tensors = load_file(str(weights))
    except (ValueError, OSError) as e:
        raise BankError(f"{path}: unreadable concept bank ({e})") from None
    missing = [k for k in ("vectors", "raw", "resid_norm") if k not in tensors]
    if missing:
        raise BankError(f"{weights}: missing tensors {missing}")
    for key in ("names", "layers"):
        if key not in meta:
            raise BankError(f"{meta_file}: missing key {key!r}")
    info = {k: v for k, v in meta.items() if k not in ("format", "names", "layers", "d_model", "method")}
    return ConceptBank(names=tuple(meta["names"]), layers=tuple(int(i) for i in meta["layers"]),
                       vectors=tensors["vectors"], raw=tensors["raw"], resid_norm=tensors["resid_norm"],
                       neutral_pcs=tensors.get("neutral_pcs"), method=meta.get("method", "mean_diff"), info=info,
                       center=tensors.get("center"))
