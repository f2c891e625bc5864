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


# config.json values that are malformed: each names the file and the key, instead of int("big") crashing,
# int(24.5) silently becoming 24, or a zero head count dividing by zero.
MALFORMED = {
    "non-numeric size": (dict(hidden_size="big"), r"hidden_size='big' must be a whole number"),
    "fractional size": (dict(intermediate_size=40.5), r"intermediate_size=40\.5 must be a whole number"),
    "bool as a size": (dict(vocab_size=True), r"vocab_size=True must be a whole number"),
    "zero heads": (dict(num_attention_heads=0), r"num_attention_heads=0 must be >= 1"),
    "negative kv heads": (dict(num_key_value_heads=-2), r"num_key_value_heads=-2 must be >= 1"),
    "zero layers": (dict(num_hidden_layers=0), r"num_hidden_layers=0 must be >= 1"),
    "heads not divisible by kv heads": (dict(num_key_value_heads=3),
                                        r"num_attention_heads=4 is not divisible by num_key_value_heads=3"),
    "hidden not divisible by heads without head_dim": (
        dict(head_dim=None, num_attention_heads=5, num_key_value_heads=5),
        r"hidden_size=24 is not divisible by num_attention_heads=5 and there is no head_dim"),
    "non-numeric eps": (dict(rms_norm_eps="tiny"), r"rms_norm_eps='tiny' must be a finite number"),
    "string bool": (dict(tie_word_embeddings="false"), r"tie_word_embeddings='false' must be true or false"),
    "negative rope theta": (dict(rope_parameters={"rope_type": "default", "rope_theta": -1.0}),
                            r"rope_parameters\.rope_theta=-1\.0 must be > 0"),
    "zero positions": (dict(max_position_embeddings=0), r"max_position_embeddings=0 must be >= 1"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_config_value_names_file_and_key(ckpt, case):
    changes, message = MALFORMED[case]
    _edit_config(ckpt, lambda c: c.update(changes))
    with pytest.raises(CheckpointError, match=r"config\.json: " + message):
        emojax.load_model(ckpt)
