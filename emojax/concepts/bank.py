"""The concept bank: the fitted concept directions of one model, as the steering and monitoring loop loads them.

A bank is a folder with
    bank.safetensors  vectors [C, L, D] float32   the directions used for steering and readout (denoised)
                      raw     [C, L, D] float32   before neutral denoising
                      resid_norm [L] float32      mean residual-stream norm at each layer (the strength unit)
                      neutral_pcs [L, Q, D]       the neutral components projected out (optional; zero rows pad Q)
                      center  [L, D] float32      the point readouts measure from (optional): x - center
                      neutral_mean, neutral_std [L, C]  each concept's readout over neutral tokens (optional):
                                                  monitor readings are z-scores against them
    bank.json         concept names (C), residual indices (L), method, d_model, fingerprints, notes, the
                      sha256 of bank.safetensors, and `model_identity`: the content identity
                      (emojax.models.identity) of the model the bank was fitted on
    eval.json         the held-out evaluation of the fit stage (optional here)

bank.safetensors is written (atomically) before bank.json, and bank.json names its checksum, so a bank.json
never describes a missing or older tensor file: a fit interrupted between the two is caught on load.
`check_model` refuses a bank used with a model it was not fitted on (the directions would be silently wrong).

Indices in `layers` are residual-stream indices as in `lm(..., capture=...)`: 0 = embeddings, i = output of
layer i - 1.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from emojax.errors import EmojaxError
from emojax.fileio import atomic_path, write_json
from emojax.models.identity import describe_difference, same_model

BANK_FORMAT = 1


class BankError(EmojaxError):
    """A concept bank that cannot be read, or a concept/layer it does not hold."""


class BankModelError(BankError):
    """A concept bank used with a model other than the one it was fitted on."""


@dataclass(frozen=True)
class ConceptBank:
    names: tuple[str, ...]
    layers: tuple[int, ...]
    vectors: np.ndarray  # [C, L, D] float32
    raw: np.ndarray  # [C, L, D] float32
    resid_norm: np.ndarray  # [L] float32
    neutral_pcs: np.ndarray | None = None  # [L, Q, D] float32
    method: str = "mean_diff"
    info: dict = field(default_factory=dict)  # fingerprints, settings; written to bank.json as is
    center: np.ndarray | None = None  # [L, D] float32: the mean of the concept means (readout origin)
    neutral_mean: np.ndarray | None = None  # [L, C] float32: mean readout over neutral tokens
    neutral_std: np.ndarray | None = None  # [L, C] float32: its standard deviation (> 0)
    source: str = field(default="", compare=False)  # the folder it was loaded from ("" when built in memory)

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
        for name in ("neutral_mean", "neutral_std"):
            value = getattr(self, name)
            if value is not None and value.shape != (L, C):
                raise BankError(f"{name} must be [layers={L}, concepts={C}], got {value.shape}")
        if (self.neutral_mean is None) != (self.neutral_std is None):
            raise BankError("neutral_mean and neutral_std come together")

    @property
    def model_identity(self) -> dict | None:
        """The content identity of the model the bank was fitted on (None for banks fitted before it was kept)."""
        recorded = self.info.get("model_identity")
        return recorded if isinstance(recorded, dict) and recorded else None

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

    def calibration(self, layer: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Each concept's mean and standard deviation [C] of the readout over neutral tokens at `layer` (what a
        z-score measures against), or None for a bank fitted without neutral text."""
        if self.neutral_mean is None:
            return None
        i = self.layer_index(layer)
        return self.neutral_mean[i], self.neutral_std[i]

    def save(self, out_dir: str | Path) -> Path:
        """Writes bank.safetensors, then bank.json naming its checksum (each atomically: temp file + rename)."""
        out_dir = Path(out_dir)
        tensors = {"vectors": self.vectors.astype(np.float32), "raw": self.raw.astype(np.float32),
                   "resid_norm": self.resid_norm.astype(np.float32)}
        if self.neutral_pcs is not None:
            tensors["neutral_pcs"] = self.neutral_pcs.astype(np.float32)
        for name in ("center", "neutral_mean", "neutral_std"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name).astype(np.float32)
        with atomic_path(out_dir / "bank.safetensors") as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
            checksum = _sha256(tmp)
        meta = {"format": BANK_FORMAT, "names": list(self.names), "layers": list(self.layers),
                "d_model": self.d_model, "method": self.method, "tensors_sha256": checksum, **self.info}
        write_json(out_dir / "bank.json", meta, indent=2)
        return out_dir


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


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
    checksum = meta.get("tensors_sha256")
    if checksum and checksum != _sha256(weights):
        raise BankError(f"{weights}: does not match {meta_file} (a fit interrupted between writing the two?); "
                        "rerun `emojax fit` to rewrite the bank")
    missing = [k for k in ("vectors", "raw", "resid_norm") if k not in tensors]
    if missing:
        raise BankError(f"{weights}: missing tensors {missing}")
    for key in ("names", "layers"):
        if key not in meta:
            raise BankError(f"{meta_file}: missing key {key!r}")
    info = {k: v for k, v in meta.items()
            if k not in ("format", "names", "layers", "d_model", "method", "tensors_sha256")}
    return ConceptBank(names=tuple(meta["names"]), layers=tuple(int(i) for i in meta["layers"]),
                       vectors=tensors["vectors"], raw=tensors["raw"], resid_norm=tensors["resid_norm"],
                       neutral_pcs=tensors.get("neutral_pcs"), method=meta.get("method", "mean_diff"), info=info,
                       center=tensors.get("center"), neutral_mean=tensors.get("neutral_mean"),
                       neutral_std=tensors.get("neutral_std"), source=str(path))


def check_model(bank: ConceptBank, identity: dict | None, model: str, force: bool = False) -> str | None:
    """Refuses `bank` for a model it was not fitted on; returns a warning to show, or None when all is well.

    identity: the model's content identity (`lm.identity`; None when it has none, e.g. built in memory);
    model: how to name the model in messages. Weights are compared by content, never by path, so a copied or
    moved checkpoint passes and a same-shaped checkpoint with other weights does not. force=True turns the
    refusal into a warning. A bank without a recorded identity (fitted by an older emojax) only warns.
    """
    where = bank.source or "the concept bank"
    fitted = bank.model_identity
    if fitted is None:
        return (f"{where}: bank.json records no model identity (fitted by an older emojax, or from a store that "
                f"did not record its model), so emojax cannot "
                f"check that it was fitted on {model}; refit it with `emojax fit` to have it checked")
    if identity is None:
        return f"{where}: {model} was built in memory and has no checkpoint identity to check the bank against"
    if same_model(fitted, identity):
        return None
    fitted_on = bank.info.get("store_model") or fitted.get("preset") or f"model {fitted.get('id', '?')[:12]}"
    if str(fitted_on) == str(model):  # the same path, its weights changed since (retrained in place)
        fitted_on = f"the weights {model} held then"
    problem = (f"{where}: fitted on {fitted_on}, not on {model} ({describe_difference(fitted, identity)}), "
               "so its directions do not apply to this model")
    if force:
        return f"{problem}; used anyway because of --force"
    raise BankModelError(f"{problem}; use the model it was fitted on, refit the bank on this model (emojax fit), "
                         "or pass --force to use it anyway")
