"""Steering by concept-bank vectors: the vectors that strength 1 adds, and Interventions built from a bank.

The intervention vocabulary itself (add, ablate, patch, SAE clamp) is emojax.models.interventions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from emojax.concepts.bank import ConceptBank
from emojax.errors import InputError
from emojax.models.interventions import Interventions, Positions


def bank_direction(bank: ConceptBank, concept: str, layer: int, unit: Literal["norm", "absolute"]) -> np.ndarray:
    """The vector that strength 1 adds: in "norm" units the unit direction times the layer's mean residual
    norm (strength 0.05 = 5% of the typical stream norm, the study's unit); "absolute" the bank vector as is."""
    v = bank.vector(concept, layer)
    if unit == "absolute":
        return np.asarray(v, np.float32)
    if unit != "norm":
        raise InputError(f"unit must be 'norm' or 'absolute', got {unit!r}")
    norm = float(np.linalg.norm(v))
    if norm == 0:
        raise InputError(f"concept {concept!r} has a zero vector at layer {layer}")
    return (v / norm * float(bank.resid_norm[bank.layer_index(layer)])).astype(np.float32)


def from_bank(bank: ConceptBank, n_layers: int, concepts: Sequence[str], strengths, *,
              layers: Sequence[int], positions: Positions = "all",
              unit: Literal["norm", "absolute"] = "norm") -> Interventions:
    """Additive steering by bank concepts. strengths [B, V] (one column per concept) or [V] for batch 1.

    layers: residual indices (each must be in the bank; emojax.concepts.layer.bank_layer chooses one); every
    concept is added at every listed layer with its strength there measured in that layer's unit.
    """
    s = np.asarray(strengths, np.float32)
    if s.ndim == 1:
        s = s[None]
    if s.ndim != 2 or s.shape[1] != len(concepts):
        raise InputError(f"strengths must be [batch, {len(concepts)} concepts], got shape {s.shape}")
    layers = tuple(layers)
    for i in layers:
        bank.layer_index(i)
        if not 0 <= i <= n_layers:
            raise InputError(f"residual index {i} is outside 0..{n_layers}")
    iv = Interventions.empty(s.shape[0], n_layers, bank.d_model)
    for c, name in enumerate(concepts):
        bank.concept_index(name)
        # one vector per (concept, layer): the unit differs by layer in "norm" units
        for i in layers:
            iv = iv.add(bank_direction(bank, name, i, unit), layers=(i,), strengths=s[:, c], positions=positions)
    return iv
