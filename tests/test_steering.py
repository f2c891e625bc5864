"""Steering semantics: row i of the vectors is added at residual index i, before it is read."""

import jax.numpy as jnp
import numpy as np
import pytest

import emojax
from emojax.models.config import ModelConfig
from emojax.models.transformer import Steering

CONFIG = ModelConfig(architecture="llama", vocab_size=97, d_model=40, n_layers=3, n_heads=4, n_kv_heads=2,
                     head_dim=10, d_mlp=64)
L, D = CONFIG.n_layers, CONFIG.d_model


@pytest.fixture(scope="module")
def lm():
    return emojax.random_model(CONFIG, seed=1)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, CONFIG.vocab_size, (3, 6)).astype(np.int32)


def _vectors(row: int, value: np.ndarray) -> jnp.ndarray:
    v = np.zeros((L + 1, D), np.float32)
    v[row] = value
    return jnp.asarray(v)


def test_row_is_added_where_it_is_read(lm, tokens):
    base = lm(tokens, capture=(0, 1, 2))
    v = np.random.default_rng(2).normal(size=D).astype(np.float32)
    out = lm(tokens, capture=(0, 1, 2), steering=Steering(vectors=_vectors(2, v)))
    np.testing.assert_allclose(np.asarray(out.hidden[0]), np.asarray(base.hidden[0]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.hidden[1]), np.asarray(base.hidden[1]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.hidden[2]), np.asarray(base.hidden[2]) + v, atol=1e-5)
    assert not np.allclose(np.asarray(out.logits), np.asarray(base.logits), atol=1e-4)


def test_zero_vectors_change_nothing(lm, tokens):
    base = lm(tokens, capture=(2,))
    out = lm(tokens, capture=(2,), steering=Steering(vectors=jnp.zeros((L + 1, D))))
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(base.logits), atol=1e-6)


def test_scale_and_mask_act_per_example_and_position(lm, tokens):
    v = np.random.default_rng(3).normal(size=D).astype(np.float32)
    base = lm(tokens, capture=(1,))
    mask = np.zeros(tokens.shape, np.float32)
    mask[:, 4:] = 1.0
    scale = np.array([0.0, 1.0, -2.0], np.float32)
    out = lm(tokens, capture=(1,), steering=Steering(vectors=_vectors(1, v), scale=scale, mask=mask))
    delta = np.asarray(out.hidden[0]) - np.asarray(base.hidden[0])
    expected = scale[:, None, None] * mask[:, :, None] * v[None, None, :]
    np.testing.assert_allclose(delta, expected, atol=1e-5)


def test_matches_a_transformers_forward_hook(tmp_path, tokens):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "ckpt"
    emojax.random_model(CONFIG, seed=4).save(path)
    lm = emojax.load_model(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    v = np.random.default_rng(5).normal(size=D).astype(np.float32)

    def add_v(module, args, output):  # the usual hook: add to block 0's output = residual index 1
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden + torch.from_numpy(v)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = hf.model.layers[0].register_forward_hook(add_v)
    with torch.no_grad():
        want = hf(torch.from_numpy(tokens).long()).logits.numpy()
    handle.remove()
    got = lm(tokens, steering=Steering(vectors=_vectors(1, v))).logits
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def test_patch_replaces_the_stream_where_it_is_read(lm, tokens):
    base = lm(tokens, capture=(1, 2, 3))
    full = lm(tokens, capture=(L,))
    values = np.random.default_rng(6).normal(size=(*tokens.shape, D)).astype(np.float32)
    out = lm(tokens, capture=(1, 2, 3), patch=emojax.Patch(values=jnp.asarray(values), index=2))
    np.testing.assert_array_equal(np.asarray(out.hidden[0]), np.asarray(base.hidden[0]))
    np.testing.assert_array_equal(np.asarray(out.hidden[1]), values)
    # Patching a stream with its own values is the identity: the run from index 2 on is the same computation.
    same = lm(tokens, capture=(3,), patch=emojax.Patch(values=base.hidden[1], index=2))
    np.testing.assert_allclose(np.asarray(same.logits), np.asarray(base.logits), atol=1e-6)
    assert not np.allclose(np.asarray(out.logits), np.asarray(base.logits), atol=1e-3)
    embed = lm(tokens, capture=(0,), patch=emojax.Patch(values=jnp.asarray(values), index=0))
    np.testing.assert_array_equal(np.asarray(embed.hidden[0]), values)
    # Index L is the final normed stream: the logits are the unembedding of the patch.
    last = lm(tokens, capture=(L,), patch=emojax.Patch(values=jnp.asarray(values), index=L))
    np.testing.assert_array_equal(np.asarray(last.hidden[0]), values)
    head = np.asarray(lm.params["lm_head"][...]) if "lm_head" in lm.params else np.asarray(lm.params["embed"][...]).T
    np.testing.assert_allclose(np.asarray(last.logits), values @ head, rtol=1e-4, atol=1e-4)
    same_last = lm(tokens, capture=(L,), patch=emojax.Patch(values=full.hidden[0], index=L))
    np.testing.assert_allclose(np.asarray(same_last.logits), np.asarray(base.logits), atol=1e-6)


def test_patch_of_a_wrong_shape_or_index_is_refused(lm, tokens):
    with pytest.raises(emojax.errors.InputError, match="patch.values"):
        lm(tokens, patch=emojax.Patch(values=jnp.zeros((1, 2, D)), index=1))
    with pytest.raises(emojax.errors.InputError, match="patch index"):
        lm(tokens, patch=emojax.Patch(values=jnp.zeros((*tokens.shape, D)), index=L + 1))


def test_hidden_only_forward_equals_the_full_forward(lm, tokens):
    full = lm(tokens, capture=(1, 2, L))
    for capture in [(1,), (2, 1), (L,), (0,)]:
        out = lm(tokens, capture=capture, logits=False)
        assert out.logits is None
        for i, h in zip(capture, out.hidden):
            np.testing.assert_array_equal(np.asarray(h), np.asarray(lm(tokens, capture=(i,)).hidden[0]))
    assert full.logits is not None
