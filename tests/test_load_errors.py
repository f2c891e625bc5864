"""A checkpoint emojax cannot load exactly is refused with one clear message naming what is wrong."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import emojax
from emojax.errors import CheckpointError
from emojax.models.config import ModelConfig

CONFIG = ModelConfig(architecture="llama", vocab_size=53, d_model=24, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=6, d_mlp=40)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "ckpt"
    emojax.random_model(CONFIG).save(path)
    return path


@pytest.fixture
def ckpt(good, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(good, path)
    return path


def _edit_tensors(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def _edit_config(path, edit):
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_good_checkpoint_loads(good):
    assert emojax.load_model(good).num_params > 0


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        emojax.load_model(ckpt)


def test_unknown_architecture_lists_supported(ckpt):
    _edit_config(ckpt, lambda c: c.update(model_type="bert", architectures=["BertModel"]))
    with pytest.raises(CheckpointError, match=r"unknown architecture model_type='bert'.*llama, mistral, qwen2, qwen3"):
        emojax.load_model(ckpt)


def test_missing_tensor_is_named(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        emojax.load_model(ckpt)


def test_extra_tensor_is_named(ckpt):
    _edit_tensors(ckpt, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.0\.mlp\.extra\.weight"):
        emojax.load_model(ckpt)


def test_wrong_shape_is_named(ckpt):
    _edit_tensors(ckpt, lambda t: t.update({"model.norm.weight": np.ones(25, np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has shape \(25,\), expected \(24,\)"):
        emojax.load_model(ckpt)


def test_pickled_weights_are_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*safetensors only.*save_pretrained"):
        emojax.load_model(ckpt)


def test_unhandled_math_key_is_refused(ckpt):
    _edit_config(ckpt, lambda c: c.update(quantization_config={"quant_method": "gptq"}))
    with pytest.raises(CheckpointError, match=r"\['quantization_config'\].*may change the model's math"):
        emojax.load_model(ckpt)


def test_unsupported_rope_type_is_refused(ckpt):
    _edit_config(ckpt, lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}))
    with pytest.raises(CheckpointError, match="rope type 'yarn' is not supported"):
        emojax.load_model(ckpt)


def test_unsupported_activation_is_refused(ckpt):
    _edit_config(ckpt, lambda c: c.update(hidden_act="relu"))
    with pytest.raises(CheckpointError, match="hidden_act='relu'"):
        emojax.load_model(ckpt)


def test_unknown_preset_lists_presets(tmp_path):
    with pytest.raises(CheckpointError, match="random:llama-56m"):
        emojax.load_model(tmp_path / "does-not-exist")
    with pytest.raises(CheckpointError, match="unknown preset 'random:nope'"):
        emojax.load_model("random:nope")


def test_legacy_rope_layout_is_read(ckpt):
    def legacy(c):
        c.pop("rope_parameters")
        c.update(rope_theta=5e5, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    _edit_config(ckpt, legacy)
    rope = emojax.load_model(ckpt).config.rope
    assert (rope.kind, rope.theta, rope.factor, rope.original_max_position) == ("llama3", 5e5, 8.0, 64)
