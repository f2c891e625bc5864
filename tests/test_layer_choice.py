"""One layer-choice policy (emojax.concepts.layer): a requested bank layer, else the fit's best layer, else the
bank layer nearest two-thirds of the depth; steering, monitoring, the run and the report all use it."""

import json

import numpy as np
import pytest

from emojax.concepts.bank import BankError, ConceptBank, load_bank
from emojax.concepts.layer import bank_layer, best_layer, choose_layer
from emojax.report.inputs import best_layer as report_layer


def _bank(layers=(1, 3, 5)) -> ConceptBank:
    vectors = np.ones((2, len(layers), 4), np.float32)
    return ConceptBank(names=("a", "b"), layers=layers, vectors=vectors, raw=vectors,
                       resid_norm=np.ones(len(layers), np.float32))


def test_requested_then_evaluation_then_two_thirds_of_the_depth():
    assert choose_layer((1, 3, 5), 6, {"best_layer": 1}, requested=5) == 5
    assert choose_layer((1, 3, 5), 6, {"best_layer": 1}) == 1
    assert choose_layer((1, 3, 5), 6, {"best_layer": None}) == 3  # nearest 4
    assert choose_layer((1, 3, 5), 8) == 5  # nearest 5.33
    assert choose_layer((1, 3, 5), None) == 5  # no model at hand: two-thirds of the way through the bank's layers
    with pytest.raises(BankError, match=r"layer 2 is not in the bank \(layers: \[1, 3, 5\]\)"):
        choose_layer((1, 3, 5), 6, requested=2)


def test_the_fit_picks_the_most_accurate_layer_on_val_and_the_others_read_it_from_eval_json(tmp_path):
    per_layer = {1: {"val": {"nearest": {"top1": 0.4}}}, 3: {"val": {"nearest": {"top1": 0.9}}}, 5: {}}
    assert best_layer(per_layer) == 3 and best_layer({5: {}}) is None
    _bank().save(tmp_path)
    bank = load_bank(tmp_path)
    assert bank_layer(bank, 8) == 5  # no eval.json beside the bank
    (tmp_path / "eval.json").write_text(json.dumps({"best_layer": 3, "per_layer": {}}))
    assert bank_layer(bank, 8) == 3 and bank_layer(bank, 8, requested=1) == 1
    assert report_layer({"best_layer": 3}, bank) == 3 and report_layer({"per_layer": {"2": {}}}, None) == 2
