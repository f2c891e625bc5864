"""The one policy for "the layer": the fit's best layer (`best_layer`, written to eval.json), and the layer
steering, monitoring, the run and the report use (`choose_layer`; `bank_layer` for a loaded bank)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from emojax.concepts.bank import BankError, ConceptBank


def best_layer(per_layer: dict[int, dict], key=("val", "nearest", "top1")) -> int | None:
    """The layer with the highest metric at `key` (split, readout, metric; the validation split, so the test
    figures reported at that layer are not the ones it was chosen on); None when no layer has it."""
    best, best_value = None, -np.inf
    for layer, metrics in per_layer.items():
        value = metrics.get(key[0], {}).get(key[1], {}).get(key[2])
        if value is not None and value > best_value:
            best, best_value = layer, value
    return best


def choose_layer(layers: Sequence[int], n_layers: int | None = None, evaluation: dict | None = None,
                 requested: int | None = None) -> int:
    """The residual index to steer, monitor and report at, one of `layers` (a bank's).

    `requested` when given (it must be one of `layers`); else the evaluation's best layer (eval.json's
    `best_layer`, chosen by the fit); else the layer nearest two-thirds of the depth `n_layers` (where the study
    did most of its analyses). n_layers None (no model at hand, as in the report): the layer two-thirds of the
    way through `layers`, which the dump spreads over the depth.
    """
    layers = sorted(int(i) for i in layers)
    if requested is not None:
        if int(requested) not in layers:
            raise BankError(f"layer {requested} is not in the bank (layers: {layers})")
        return int(requested)
    best = (evaluation or {}).get("best_layer")
    if best is not None and int(best) in layers:
        return int(best)
    if n_layers is None:
        return layers[(2 * len(layers)) // 3 if len(layers) > 1 else 0]
    return min(layers, key=lambda i: (abs(i - 2 * n_layers / 3), i))


def bank_layer(bank: ConceptBank, n_layers: int, requested: int | None = None) -> int:
    """choose_layer over a bank's layers, with the fit's evaluation saved beside it (eval.json, when there is one)."""
    evaluation = None
    file = Path(bank.source) / "eval.json" if bank.source else None
    if file is not None and file.is_file():
        try:
            evaluation = json.loads(file.read_text())
        except ValueError as e:
            raise BankError(f"{file}: not valid JSON ({e}); rerun `emojax fit` to rewrite it") from None
    return choose_layer(bank.layers, n_layers, evaluation, requested)
