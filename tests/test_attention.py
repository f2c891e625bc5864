"""The attention kernels: emojax's blocked XLA path and jax.nn.dot_product_attention (the call the cuDNN path
makes on a GPU, run here with its XLA implementation, attention="xla-fused", so the plumbing is checked on CPU),
in the forward and in the KV-cached decode alike. On a GPU (scripts/gpu_check.sh runs this file there) the cuDNN
kernel itself is checked against the blocked path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import emojax
from emojax.errors import InputError
from emojax.models.config import ModelConfig
from emojax.models.layers import Attention, attention_kernel
from emojax.steer import DecodeConfig, Decoder


def _attention(n_heads=8, n_kv_heads=2, head_dim=16, d_model=64, dtype=jnp.float32):
    return Attention(d_model, n_heads, n_kv_heads, head_dim, qkv_bias=False, o_bias=False, qk_norm=False,
                     fused_qkv=False, norm_eps=1e-6, norm_offset=False, scale=head_dim ** -0.5, softcap=None,
                     dtype=dtype, rngs=nnx.Rngs(0))


def _mask(lengths, T, left: bool):
    valid = np.zeros((len(lengths), T), bool)
    for b, n in enumerate(lengths):
        valid[b, slice(T - n, None) if left else slice(0, n)] = True
    causal = np.tril(np.ones((T, T), bool))
    return jnp.asarray(causal[None] & valid[:, None, :]), valid


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_fused_attention_equals_the_blocked_path(left):
    attn = _attention()
    B, T = 3, 150  # T > 64: the blocked path splits the queries into several blocks
    x = jax.random.normal(jax.random.key(1), (B, T, 64), jnp.float32)
    mask, valid = _mask([150, 97, 5], T, left)
    blocked, _ = attn(x, None, None, mask, None)
    fused, _ = attn(x, None, None, mask, None, kernel="xla-fused")
    np.testing.assert_allclose(np.asarray(fused)[valid], np.asarray(blocked)[valid], atol=2e-5, rtol=1e-5)
    # Queries with no visible key (left padding) are zeros on the fused path: finite whatever the kernel does.
    assert np.isfinite(np.asarray(fused)).all()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's kernel runs on a GPU only")
@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_cudnn_attention_equals_the_blocked_path(left):
    attn = _attention(dtype=jnp.bfloat16)
    B, T = 3, 150
    x = jax.random.normal(jax.random.key(1), (B, T, 64), jnp.bfloat16)
    mask, valid = _mask([150, 97, 5], T, left)
    blocked = np.asarray(attn(x, None, None, mask, None)[0], np.float32)
    cudnn = np.asarray(attn(x, None, None, mask, None, kernel="cudnn")[0], np.float32)
    np.testing.assert_allclose(cudnn[valid], blocked[valid], atol=2e-2, rtol=2e-2)  # bf16 rounding
    assert np.isfinite(cudnn).all()


def test_the_kernel_follows_the_setting():
    assert attention_kernel("xla", jnp.bfloat16, 64, None) == "blocked"
    assert attention_kernel("xla-fused", jnp.float32, 64, None) == "xla-fused"
    expected = "cudnn" if jax.default_backend() == "gpu" else "blocked"
    assert attention_kernel("auto", jnp.bfloat16, 64, None) == expected  # cuDNN only where it can run
    with pytest.raises(ValueError, match="float32.*head_dim 100.*soft-caps"):
        attention_kernel("cudnn", jnp.float32, 100, 50.0)
    with pytest.raises(ValueError, match="attention='flash': expected one of xla, cudnn, auto, xla-fused"):
        attention_kernel("flash", jnp.bfloat16, 64, None)
    with pytest.raises(InputError, match="attention='flash'"):
        emojax.load_model("random:tiny", attention="flash")


CONFIG = ModelConfig(architecture="llama", vocab_size=97, d_model=40, n_layers=3, n_heads=4, n_kv_heads=2,
                     head_dim=10, d_mlp=64, layer_windows=(0, 4, 0))


@pytest.mark.parametrize("unroll", [True, False], ids=["unrolled", "scanned"])
def test_decode_runs_the_models_attention_kernel(unroll):
    """The fused kernel in the KV-cached decode (a sliding-window layer included) gives the blocked kernel's
    tokens and logits; each model's kernel is its own, so their compiled loops are separate."""
    blocked, fused = (emojax.random_model(CONFIG, seed=2, attention=a) for a in ("xla", "xla-fused"))
    assert (blocked.kernel, fused.kernel) == ("blocked", "xla-fused")
    tokens = np.random.default_rng(0).integers(1, 97, (2, 9)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :4] = 0
    config = DecodeConfig(prompt_buckets=(16,), new_token_buckets=(8,), unroll_layers=unroll)
    a, b = (Decoder(lm, config).generate(tokens, mask, max_new_tokens=8, return_logits=True)
            for lm in (blocked, fused))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_allclose(np.asarray(a.logits), np.asarray(b.logits), atol=2e-5)
    np.testing.assert_allclose(np.asarray(fused(tokens, mask).logits)[mask > 0],
                               np.asarray(blocked(tokens, mask).logits)[mask > 0], atol=2e-5)
