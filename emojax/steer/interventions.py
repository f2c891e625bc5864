"""Steering by concept-bank vectors: the vectors that strength 1 adds, and Interventions built from a bank.

The intervention vocabulary itself (add, ablate, patch, SAE clamp) is emojax.models.interventions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from emojax.concepts.bank import ConceptBank
from emojax.errors import InputError
from emojax.models.interventions import Interventions, Positions

if TYPE_CHECKING:
    from emojax.models.lm import LanguageModel
    from emojax.train.finetune import Steer, Steering


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


def bank_steering(bank: str | Path, lm: LanguageModel, steers: Sequence[Steer]) -> Steering:
    """Steering during a fine-tune of `lm` from `--bank` and the parsed `--steer` arguments: each concept's bank
    vector in the study's "norm" unit at its residual index, on every position. A bank fitted on another model,
    an unknown concept or a layer the bank lacks is an InputError naming the argument.

    Here rather than in emojax.train.finetune: it reads a concept bank, and train sits below concepts."""
    from emojax.concepts.bank import BankError, check_model, load_bank
    from emojax.progress import log
    from emojax.train.finetune import Steering

    try:
        concept_bank = load_bank(bank)
        warning = check_model(concept_bank, lm.identity, str(lm.source))
    except BankError as e:
        raise InputError(f"--bank: {e}") from None
    if warning:
        log(f"train-lm: warning: --bank: {warning}")
    iv = Interventions.empty(1, lm.config.n_layers, lm.config.d_model)
    for s in steers:
        try:
            iv = iv.add(bank_direction(concept_bank, s.concept, s.layer, "norm"), layers=(s.layer,),
                        strengths=s.strength, positions="all")
        except (BankError, InputError) as e:
            raise InputError(f"--steer {s}: {e}") from None
    fitted_on = (concept_bank.model_identity or {}).get("id")
    return Steering(iv, tuple(steers), {"path": str(bank), "model_identity": fitted_on})
