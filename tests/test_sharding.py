"""The same model on a device mesh gives the 1-device results; parameters land in their sharded layout."""

import jax
import numpy as np
import pytest

import emojax
from emojax.models.config import ModelConfig
from emojax.models.sharding import logical_to_spec, make_mesh

# Odd where it does not matter, divisible where the mesh should really split something (heads, mlp, embed).
CONFIG = ModelConfig(architecture="qwen3", vocab_size=104, d_model=72, n_layers=3, n_heads=8, n_kv_heads=4,
                     head_dim=12, d_mlp=100, qkv_bias=True, o_bias=True, qk_norm=True, layer_windows=(0, 5, 0))
MESH_SHAPES = [(8, 1, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharding") / "ckpt"
    emojax.random_model(CONFIG, seed=3).save(path)
    return path


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CONFIG.vocab_size, (8, 11)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :3] = 0
    mask[6, :7] = 0
    return tokens, mask


@pytest.fixture(scope="module")
def reference(checkpoint, inputs):
    assert len(jax.devices()) >= 8, "tests/conftest.py must give 8 CPU devices"
    lm = emojax.load_model(checkpoint)
    out = lm(*inputs, capture=(0, 1, 3))
    return jax.tree.map(np.asarray, out)


@pytest.mark.parametrize("shape", MESH_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_mesh_matches_single_device(checkpoint, inputs, reference, shape):
    mesh = make_mesh(shape)
    lm = emojax.load_model(checkpoint, mesh=mesh)
    out = lm(*inputs, capture=(0, 1, 3))
    np.testing.assert_allclose(np.asarray(out.logits), reference.logits, atol=1e-5, rtol=0)
    for got, want in zip(out.hidden, reference.hidden):
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_parameters_are_loaded_sharded(checkpoint):
    mesh = make_mesh((1, 2, 4))
    lm = emojax.load_model(checkpoint, mesh=mesh)
    q = lm.params["layers"]["attn"]["q_proj"].get_value()  # [L, D, N, H]: embed over fsdp, heads over tensor
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    # every device holds 1/8 of the tensor, never the whole of it
    assert {s.data.shape for s in q.addressable_shards} == {(3, 36, 2, 12)}


def test_batch_not_divisible_by_mesh_is_padded_and_trimmed(checkpoint, inputs, reference):
    lm = emojax.load_model(checkpoint, mesh=make_mesh((4, 2, 1)))
    tokens, mask = inputs
    out = lm(tokens[:5], mask[:5], capture=(3,))
    assert out.logits.shape == (5, 11, CONFIG.vocab_size)
    np.testing.assert_allclose(np.asarray(out.logits), reference.logits[:5], atol=1e-5, rtol=0)


def test_one_device_of_the_default_backend_matches_a_cpu_mesh(checkpoint, inputs):
    """The sharded path on a 1-device mesh of the default backend gives an 8-device CPU mesh's results. In the
    suite both are CPU; scripts/gpu_check.sh runs it with one GPU as the default backend, where the meshes
    above cannot be built (float32 on both sides: the suite's parity tolerance)."""
    cpu = emojax.load_model(checkpoint, mesh=make_mesh((1, 2, 4), jax.devices("cpu")))(*inputs, capture=(0, 1, 3))
    one = emojax.load_model(checkpoint, mesh=make_mesh((1, 1, 1), jax.devices()[:1]))(*inputs, capture=(0, 1, 3))
    assert one.logits.devices() == {jax.devices()[0]}
    np.testing.assert_allclose(np.asarray(one.logits), np.asarray(cpu.logits), atol=1e-4, rtol=0)
    for got, want in zip(one.hidden, cpu.hidden):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=0)


def test_indivisible_dimensions_are_replicated():
    mesh = make_mesh((1, 2, 4))
    assert logical_to_spec(("vocab", "embed"), (101, 72), mesh) == jax.sharding.PartitionSpec(None, "fsdp")
    assert logical_to_spec(("heads", "head_dim"), (6, 12), mesh) == jax.sharding.PartitionSpec(None, None)
    assert logical_to_spec(("batch", "seq"), (8, 3), make_mesh((2, 2, 2))) == jax.sharding.PartitionSpec(
        ("data", "fsdp"), None)


# One transformers-built checkpoint per family, on two mesh shapes.
FAMILY_CASES = ["llama_gqa", "mistral_window", "qwen2", "gemma", "gemma2_window", "gemma3", "gpt2_full_context",
                "gpt_neox_parallel"]


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    from hf_checkpoints import CheckpointCache

    # plain init: activations of order 1, so 1e-5 is a real bound (decisive checkpoints reach logits near 80)
    return CheckpointCache(tmp_path_factory.mktemp("hf_sharding"), decisive=False)


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 2, 4)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", FAMILY_CASES)
def test_every_family_sharded_matches_single_device(hf_checkpoints, name, shape):
    ckpt = hf_checkpoints.get(name)
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, ckpt.vocab_size, (8, 13)).astype(np.int32)
    capture = (0, 2, ckpt.n_layers)
    want = emojax.load_model(ckpt.path)(tokens, capture=capture)
    got = emojax.load_model(ckpt.path, mesh=make_mesh(shape))(tokens, capture=capture)
    np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits), atol=1e-5, rtol=0)
    for g, w in zip(got.hidden, want.hidden):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=0)
