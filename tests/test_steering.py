"""The intervention vocabulary in the forward pass: an edit at residual index i acts where index i is read."""

import numpy as np
import pytest

import emojax
from emojax.errors import InputError
from emojax.models import Interventions
from emojax.models.config import ModelConfig

CONFIG = ModelConfig(architecture="llama", vocab_size=97, d_model=40, n_layers=3, n_heads=4, n_kv_heads=2,
                     head_dim=10, d_mlp=64)
L, D = CONFIG.n_layers, CONFIG.d_model


@pytest.fixture(scope="module")
def lm():
    return emojax.random_model(CONFIG, seed=1)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, CONFIG.vocab_size, (3, 6)).astype(np.int32)


def _add(v, index, strengths=1.0, positions="all", batch=3):
    return Interventions.empty(batch, L, D).add(v, layers=(index,), strengths=strengths, positions=positions)


def test_a_vector_is_added_where_it_is_read(lm, tokens):
    base = lm(tokens, capture=(0, 1, 2))
    v = np.random.default_rng(2).normal(size=D).astype(np.float32)
    out = lm(tokens, capture=(0, 1, 2), interventions=_add(v, 2))
    np.testing.assert_allclose(np.asarray(out.hidden[0]), np.asarray(base.hidden[0]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.hidden[1]), np.asarray(base.hidden[1]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.hidden[2]), np.asarray(base.hidden[2]) + v, atol=1e-5)
    assert not np.allclose(np.asarray(out.logits), np.asarray(base.logits), atol=1e-4)


def test_zero_strength_changes_nothing(lm, tokens):
    base = lm(tokens, capture=(2,))
    out = lm(tokens, capture=(2,), interventions=_add(np.ones(D), 2, strengths=0.0))
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(base.logits), atol=1e-6)


def test_strengths_act_per_example_and_positions_per_column(lm, tokens):
    v = np.random.default_rng(3).normal(size=D).astype(np.float32)
    base = lm(tokens, capture=(1,))
    generated = np.zeros(tokens.shape, np.float32)
    generated[:, 4:] = 1.0
    strengths = np.array([0.0, 1.0, -2.0], np.float32)
    out = lm(tokens, capture=(1,), interventions=_add(v, 1, strengths, positions="generated"), generated=generated)
    delta = np.asarray(out.hidden[0]) - np.asarray(base.hidden[0])
    np.testing.assert_allclose(delta, strengths[:, None, None] * generated[:, :, None] * v[None, None, :], atol=1e-5)
    # built for batch 1: the same edit on every row
    one = lm(tokens, capture=(1,), interventions=_add(v, 1, batch=1))
    np.testing.assert_allclose(np.asarray(one.hidden[0]) - np.asarray(base.hidden[0]),
                               np.broadcast_to(v, delta.shape), atol=1e-5)


def test_ablation_sets_the_projection_to_its_mean(lm, tokens):
    u = np.random.default_rng(7).normal(size=D).astype(np.float32)
    unit = u / np.linalg.norm(u)
    out = lm(tokens, capture=(2,), interventions=Interventions.empty(3, L, D).ablate(u, layers=(2,), mean=0.25))
    np.testing.assert_allclose(np.asarray(out.hidden[0]) @ unit, 0.25, atol=1e-5)
    two = Interventions.empty(3, L, D).ablate(u, layers=(2,)).ablate(np.ones(D), layers=(2,))
    h = np.asarray(lm(tokens, capture=(2,), interventions=two).hidden[0])
    np.testing.assert_allclose(h @ unit, 0.0, atol=1e-5)
    np.testing.assert_allclose(h @ np.ones(D), 0.0, atol=1e-4)  # the span of both is removed


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
    got = lm(tokens, interventions=_add(v, 1)).logits
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def _patch(values, index, mask=None):
    return Interventions.empty(3, L, D).patch_at(values, index, mask)


def test_patch_replaces_the_stream_where_it_is_read(lm, tokens):
    base = lm(tokens, capture=(1, 2, 3))
    full = lm(tokens, capture=(L,))
    values = np.random.default_rng(6).normal(size=(*tokens.shape, D)).astype(np.float32)
    out = lm(tokens, capture=(1, 2, 3), interventions=_patch(values, 2))
    np.testing.assert_array_equal(np.asarray(out.hidden[0]), np.asarray(base.hidden[0]))
    np.testing.assert_array_equal(np.asarray(out.hidden[1]), values)
    # Patching a stream with its own values is the identity: the run from index 2 on is the same computation.
    same = lm(tokens, capture=(3,), interventions=_patch(base.hidden[1], 2))
    np.testing.assert_allclose(np.asarray(same.logits), np.asarray(base.logits), atol=1e-6)
    assert not np.allclose(np.asarray(out.logits), np.asarray(base.logits), atol=1e-3)
    embed = lm(tokens, capture=(0,), interventions=_patch(values, 0))
    np.testing.assert_array_equal(np.asarray(embed.hidden[0]), values)
    # Index L is the final normed stream: the logits are the unembedding of the patch.
    last = lm(tokens, capture=(L,), interventions=_patch(values, L))
    np.testing.assert_array_equal(np.asarray(last.hidden[0]), values)
    head = np.asarray(lm.params["lm_head"][...]) if "lm_head" in lm.params else np.asarray(lm.params["embed"][...]).T
    np.testing.assert_allclose(np.asarray(last.logits), values @ head, rtol=1e-4, atol=1e-4)
    same_last = lm(tokens, capture=(L,), interventions=_patch(full.hidden[0], L))
    np.testing.assert_allclose(np.asarray(same_last.logits), np.asarray(base.logits), atol=1e-6)
    # a mask patches only its positions
    mask = np.zeros(tokens.shape, np.float32)
    mask[:, 2] = 1
    some = np.asarray(lm(tokens, capture=(2,), interventions=_patch(values, 2, mask)).hidden[0])
    np.testing.assert_array_equal(some[:, 2], values[:, 2])
    np.testing.assert_array_equal(some[:, 3:], np.asarray(base.hidden[1])[:, 3:])


def test_a_wrong_shape_or_index_is_refused(lm, tokens):
    with pytest.raises(InputError, match="patch values cover 2 positions"):
        lm(tokens, interventions=_patch(np.zeros((3, 2, D)), 1))
    with pytest.raises(InputError, match="residual index 4 is outside 0..3"):
        _patch(np.zeros((*tokens.shape, D)), L + 1)
    with pytest.raises(InputError, match="built for batch 2"):
        lm(tokens, interventions=Interventions.empty(2, L, D))
    with pytest.raises(InputError, match="2 layers x d_model 40"):
        lm(tokens, interventions=Interventions.empty(3, 2, D))


def test_hidden_only_forward_equals_the_full_forward(lm, tokens):
    full = lm(tokens, capture=(1, 2, L))
    for capture in [(1,), (2, 1), (L,), (0,)]:
        out = lm(tokens, capture=capture, logits=False)
        assert out.logits is None
        for i, h in zip(capture, out.hidden):
            np.testing.assert_array_equal(np.asarray(h), np.asarray(lm(tokens, capture=(i,)).hidden[0]))
    assert full.logits is not None
