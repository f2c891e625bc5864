"""The attention kernels of the full forward: emojax's blocked XLA path and jax.nn.dot_product_attention (the
call the cuDNN path makes on a GPU, run here with its XLA implementation so the plumbing is checked on CPU). On a
GPU (scripts/gpu_check.sh runs this file there) the cuDNN kernel itself is checked against the blocked path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emojax.models.layers import ATTENTION_ENV, Attention, attention_implementation, fused_attention


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
    blocked = attn(x, None, None, mask, None)  # $EMOJAX_ATTENTION unset: the blocked path
    q, k, v = attn._project(x)
    fused = attn._output(fused_attention(q, k, v, mask, attn.scale, "xla"))
    np.testing.assert_allclose(np.asarray(fused)[valid], np.asarray(blocked)[valid], atol=2e-5, rtol=1e-5)
    # Queries with no visible key (left padding) are zeros on the fused path: finite whatever the kernel does.
    assert np.isfinite(np.asarray(fused)).all()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's kernel runs on a GPU only")
@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_cudnn_attention_equals_the_blocked_path(left, monkeypatch):
    attn = _attention(dtype=jnp.bfloat16)
    B, T = 3, 150
    x = jax.random.normal(jax.random.key(1), (B, T, 64), jnp.bfloat16)
    mask, valid = _mask([150, 97, 5], T, left)
    monkeypatch.setenv(ATTENTION_ENV, "xla")
    blocked = np.asarray(attn(x, None, None, mask, None), np.float32)
    monkeypatch.setenv(ATTENTION_ENV, "cudnn")
    cudnn = np.asarray(attn(x, None, None, mask, None), np.float32)
    np.testing.assert_allclose(cudnn[valid], blocked[valid], atol=2e-2, rtol=2e-2)  # bf16 rounding
    assert np.isfinite(cudnn).all()


def test_the_choice_follows_the_environment(monkeypatch):
    monkeypatch.delenv(ATTENTION_ENV, raising=False)
    assert attention_implementation(jnp.bfloat16, 64, None) == "blocked"
    monkeypatch.setenv(ATTENTION_ENV, "auto")
    assert attention_implementation(jnp.bfloat16, 64, None) == "blocked"  # CPU: cuDNN cannot run here
    monkeypatch.setenv(ATTENTION_ENV, "cudnn")
    with pytest.raises(ValueError, match="backend is cpu.*float32.*head_dim 100.*soft-caps"):
        attention_implementation(jnp.float32, 100, 50.0)
    monkeypatch.setenv(ATTENTION_ENV, "flash")
    with pytest.raises(ValueError, match="EMOJAX_ATTENTION='flash': expected one of xla, cudnn, auto"):
        attention_implementation(jnp.bfloat16, 64, None)
