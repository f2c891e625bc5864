"""Nothing silently wrong between a model and what was made from it: a concept bank knows the model it was fitted
on (by content, never by path) and steer/monitor refuse it on another; the fit refuses NaN/inf statistics; a
prompt that does not fit the model's positions is refused before decoding; the bank's files are written so that
bank.json never describes another tensor file."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from synthetic_store import write_synthetic_store

import emojax
from emojax.cli import main
from emojax.concepts import BankError, BankModelError, ConceptBank, FitConfig, FitError, check_model, fit, load_bank
from emojax.errors import InputError
from emojax.models.config import ModelConfig
from emojax.models.identity import model_identity
from emojax.models.presets import SHAPES
from emojax.steer.generate import monitor, steer
from emojax.steer.decode import check_positions

# vocab 260 holds the byte tokenizer; max_position_embeddings 24 makes the position limit cheap to reach
CONFIG = ModelConfig(architecture="llama", vocab_size=260, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1,
                     head_dim=8, d_mlp=24, max_position_embeddings=24)
NAMES = ("calm", "tense")


def _bank(identity=None, **info) -> ConceptBank:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(len(NAMES), 1, CONFIG.d_model)).astype(np.float32)
    if identity is not None:
        info["model_identity"] = identity
    return ConceptBank(names=NAMES, layers=(1,), vectors=vectors, raw=vectors.copy(),
                       resid_norm=np.ones(1, np.float32), info=info)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two checkpoints of the same shape with different weights (seeds 1 and 2), a copy of the first in another
    folder, and a bank fitted (as far as bank.json says) on the first."""
    root = tmp_path_factory.mktemp("identity")
    emojax.random_model(CONFIG, seed=1).save(root / "one")
    emojax.random_model(CONFIG, seed=2).save(root / "two")
    shutil.copytree(root / "one", root / "moved" / "one-copy")
    _bank(model_identity(root / "one"), store_model=str(root / "one")).save(root / "bank")
    return root


def test_bank_records_and_loads_the_model_identity(folders):
    bank = load_bank(folders / "bank")
    assert bank.model_identity == model_identity(folders / "one")
    assert bank.source == str(folders / "bank")
    assert emojax.load_model(folders / "moved" / "one-copy").identity["id"] == bank.model_identity["id"]
    assert emojax.load_model("random:tiny").identity == model_identity("random:tiny")
    assert emojax.random_model(CONFIG, seed=3).identity is None  # built in memory: nothing to identify it by


def _steer_argv(folders, model, *extra):
    return ["steer", "--model", str(model), "--bank", str(folders / "bank"), "--concept", "calm", "--strength",
            "0.5", "--prompt", "Hi", "--max-new-tokens", "2", "--scan-layers", *extra]


def test_steer_and_monitor_refuse_a_bank_of_another_model(folders, capsys):
    for argv in (_steer_argv(folders, folders / "two"),
                 ["monitor", "--model", str(folders / "two"), "--bank", str(folders / "bank"), "--prompt", "Hi",
                  "--out", str(folders / "m.jsonl")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "emojax: error:" in err
        assert str(folders / "bank") in err and str(folders / "two") in err and str(folders / "one") in err
        assert "same shapes but different weights" in err and "--force" in err
    assert not (folders / "m.jsonl").exists()


def test_force_proceeds_with_a_warning_and_a_moved_copy_is_accepted(folders, capsys):
    out = folders / "forced.jsonl"
    assert main(_steer_argv(folders, folders / "two", "--force", "--out", str(out))) == 0
    err = capsys.readouterr().err
    assert "emojax: warning:" in err and "different weights" in err and "--force" in err
    assert len(out.read_text().splitlines()) == 1
    assert main(_steer_argv(folders, folders / "moved" / "one-copy")) == 0
    assert "warning" not in capsys.readouterr().err  # same content in another folder: the same model


def test_library_functions_refuse_and_old_banks_only_warn(folders):
    lm = emojax.load_model(folders / "two")
    bank = load_bank(folders / "bank")
    with pytest.raises(BankModelError, match="different weights"):
        steer(lm, bank, ["Hi"], ["calm"], [[0.5]], max_new_tokens=2)
    with pytest.raises(BankModelError, match="different weights"):
        monitor(lm, bank, ["Hi"], max_new_tokens=2)
    assert "--force" in check_model(bank, lm.identity, "two", force=True)
    old = _bank()  # fitted before banks recorded their model: a warning, not a refusal
    assert "records no model identity" in check_model(old, lm.identity, "two")
    assert check_model(bank, None, "in-memory model") is not None  # cannot check: says so
    assert check_model(bank, model_identity(folders / "moved" / "one-copy"), "copy") is None


def test_position_limit_is_refused_before_decoding():
    lm = emojax.random_model(CONFIG, seed=0)
    prompt = "x" * 20  # 20 byte tokens (+ BOS) of the 24 positions
    for call in (lambda: steer(lm, _bank(), [prompt], ["calm"], [[0.1]], max_new_tokens=8),
                 lambda: monitor(lm, _bank(), ["Hi", prompt], max_new_tokens=8)):
        with pytest.warns(UserWarning, match="records no model identity"), \
                pytest.raises(InputError, match=r"has 2\d tokens and max_new_tokens is 8.*limit of 24 positions"):
            call()
    gpt2 = ModelConfig(architecture="gpt2", vocab_size=260, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                       head_dim=8, d_mlp=32, rope=None, learned_positions=24, max_position_embeddings=24)
    with pytest.raises(InputError, match="limit of 24 learned positions"):
        check_positions(gpt2, np.array([3, 20]), 8, beyond_max_positions=True)  # a table has no rows past 24
    with pytest.raises(InputError, match="prompt 2 of 2 has 20 tokens"):
        check_positions(CONFIG, np.array([3, 20]), 8)
    check_positions(CONFIG, np.array([3, 20]), 8, beyond_max_positions=True)  # RoPE: the user asked for it
    check_positions(CONFIG, np.array([16]), 8)  # exactly at the limit


def _store_with(tmp_path, x, labels, split, **extra):
    path = write_synthetic_store(tmp_path / "store", {2: x}, labels, split, label_ids={"a": 0, "b": 1, "c": 2})
    if extra:
        state = json.loads((tmp_path / "store" / "store.json").read_text())
        (tmp_path / "store" / "store.json").write_text(json.dumps({**state, **extra}))
    return path


def _rows(seed=0, n=60, D=6):
    rng = np.random.default_rng(seed)
    labels = np.array([0, 1, 2, -1] * (n // 4))
    x = (rng.normal(size=(n, D)) + labels[:, None]).astype(np.float32)
    return x, labels, np.array(["train"] * n)


def _fit(path, out, **kw):
    return fit(FitConfig(store=path, out=str(out), probe=False, eval_splits=(), mesh=(1, 1, 1), norm_tokens=0, **kw))


def test_fit_records_the_store_model_identity_and_refuses_another_fit_model(tmp_path, folders):
    recorded = model_identity("random:tiny")
    x, labels, split = _rows(D=64)
    path = _store_with(tmp_path, x, labels, split, model_identity=recorded)
    bank = _fit(path, tmp_path / "bank")
    assert bank.model_identity == recorded and load_bank(tmp_path / "bank").model_identity == recorded
    other = tmp_path / "other"  # d_model 64 like random:tiny, other weights
    emojax.random_model(SHAPES["tiny"], seed=4).save(other)
    with pytest.raises(FitError, match=r"fit\.model=.*other.*is not the model .*store was dumped with"):
        _fit(path, tmp_path / "bank2", model=str(other))
    # no identity in the store: the fit.model's
    (tmp_path / "plain").mkdir()
    plain = _store_with(tmp_path / "plain", x, labels, split)
    assert _fit(plain, tmp_path / "bank3", model=str(other)).model_identity == model_identity(other)


@pytest.mark.parametrize("row,named", [(1, "b (1 docs)"), (3, "neutral (1 docs)")])
def test_fit_refuses_nan_activations_naming_layer_and_label(tmp_path, row, named):
    x, labels, split = _rows()
    x[row, 2] = np.nan
    path = _store_with(tmp_path, x, labels, split)
    with pytest.raises(FitError, match=rf"layer 2 .*NaN or inf for label\(s\) {re.escape(named)}"):
        _fit(path, tmp_path / "bank")
    assert not (tmp_path / "bank").exists()  # nothing written


def test_fit_refuses_overflowing_statistics(tmp_path):
    x, labels, split = _rows()
    x[labels == 0] = 3e38  # every row finite, but their float32 sum is not
    path = _store_with(tmp_path, x, labels, split)
    with pytest.raises(FitError, match=r"label mean at layer 2, label\(s\) \['a'\] is not finite"):
        _fit(path, tmp_path / "bank")


def test_bank_json_never_describes_another_tensor_file(tmp_path):
    bank = _bank()
    bank.save(tmp_path / "b")
    assert load_bank(tmp_path / "b").names == NAMES
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["bank.json", "bank.safetensors"]  # no temp
    meta = json.loads((tmp_path / "b" / "bank.json").read_text())
    newer = ConceptBank(names=("x", "y"), layers=(1,), vectors=bank.vectors * 2, raw=bank.raw,
                        resid_norm=bank.resid_norm)
    newer.save(tmp_path / "c")
    # a fit interrupted after the tensor file and before bank.json: the old bank.json beside new tensors
    shutil.copy(tmp_path / "c" / "bank.safetensors", tmp_path / "b" / "bank.safetensors")
    with pytest.raises(BankError, match="does not match .*bank.json.*rerun `emojax fit`"):
        load_bank(tmp_path / "b")
    assert meta["tensors_sha256"]
