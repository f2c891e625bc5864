"""Building blocks of the decoder: RMSNorm, rotary embeddings, grouped-query attention, gated MLP.

Numerics follow the Hugging Face reference so that checkpoints load exactly: norms are computed in float32 and
cast back before the weight multiply, rotary tables are computed in float32 and cast to the activation dtype,
attention scores and softmax are float32.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

from emojax.models.config import RopeConfig
from emojax.models.sharding import constrain

_INIT_STD = 0.02


def param(rngs: nnx.Rngs | None, shape: tuple[int, ...], dtype, logical_axes: tuple[str, ...],
          init: str = "normal") -> nnx.Param:
    """A parameter with its logical axes as metadata (random normal, zeros or ones)."""
    if init == "normal":
        value = _INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value.astype(dtype), logical_axes=logical_axes)


class Norm(nnx.Module):
    """RMSNorm (Llama: w * normed cast back first; Gemma: (1 + w) * normed in float32) or LayerNorm with bias.

    Statistics are always computed in float32, as the references do.
    """

    def __init__(self, dim: int, eps: float, *, kind: str = "rms", offset: bool = False, dtype,
                 logical_axis: str = "norm"):
        self.eps, self.kind, self.offset = eps, kind, offset
        self.scale = param(None, (dim,), dtype, (logical_axis,), init="zeros" if offset else "ones")
        if kind == "layer":
            self.bias = param(None, (dim,), dtype, (logical_axis,), init="zeros")

    def __call__(self, x: jax.Array, bias: bool = True) -> jax.Array:
        """bias=False leaves out a LayerNorm's bias: a direction's logit lens goes through the scale only."""
        x32 = x.astype(jnp.float32)
        if self.kind == "layer":
            centered = x32 - jnp.mean(x32, axis=-1, keepdims=True)
            normed = centered * jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + self.eps)
            out = normed * self.scale[...].astype(jnp.float32)
            return (out + self.bias[...].astype(jnp.float32) if bias else out).astype(x.dtype)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        return self.scale[...] * normed.astype(x.dtype)


def rope_inv_freq(rope: RopeConfig, rot_dim: int) -> np.ndarray:
    """Inverse frequencies [rot_dim // 2] in float32, with linear or llama3 scaling applied."""
    exponents = np.arange(0, rot_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rot_dim)
    inv_freq = (np.float32(1.0) / (np.float32(rope.theta) ** exponents)).astype(np.float32)
    if rope.kind == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32)
    if rope.kind == "llama3":
        low_wavelen = rope.original_max_position / rope.low_freq_factor
        high_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_tables(positions_BT: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables [B, T, 2 * len(inv_freq)] in float32 (the half-split layout of Hugging Face)."""
    freqs = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BTNH: jax.Array, cos_BTR: jax.Array, sin_BTR: jax.Array) -> jax.Array:
    """Rotates the first R = cos.shape[-1] dims of each head (all of them unless rotary is partial)."""
    R = cos_BTR.shape[-1]
    x_rot, x_pass = x_BTNH[..., :R], x_BTNH[..., R:]
    cos = cos_BTR[:, :, None, :].astype(x_BTNH.dtype)
    sin = sin_BTR[:, :, None, :].astype(x_BTNH.dtype)
    x1, x2 = jnp.split(x_rot, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x_rot * cos + rotated * sin
    return out if R == x_BTNH.shape[-1] else jnp.concatenate([out, x_pass], axis=-1)


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": partial(jax.nn.gelu, approximate=True),
    "gelu": partial(jax.nn.gelu, approximate=False),
}


ATTENTION_CHOICES = ("xla", "cudnn", "auto", "xla-fused")
# A decode loop's attention reads the shortest of this many static spans of its cache that holds the columns
# written so far (scripts/bench_decode.py, 56M model, batch 32, prompt 16 + 128 new tokens on a 2-core CPU: 38.3 ms
# a step over the whole cache, 35.5 ms with 4 spans, 35.2 with 8).
CACHE_SPANS = 4


def attention_kernel(choice: str, dtype, head_dim: int, softcap: float | None) -> str:
    """The attention kernel a model runs with (forward, dump and decode alike), from the `attention` setting:

        xla        (default) "blocked": emojax's causal query-block attention, plain XLA
        cudnn      "cudnn": jax.nn.dot_product_attention's fused cuDNN kernel; an error where it cannot run (not a
                   GPU, not bf16/fp16, head_dim not a multiple of 8 up to 128, or tanh soft-capping)
        auto       cuDNN where it can run, else the blocked path
        xla-fused  "xla-fused": the same jax.nn.dot_product_attention call with its XLA implementation (any
                   backend; checks the fused path's plumbing where there is no GPU)

    The default stays "xla" until a GPU benchmark (scripts/gpu_check.sh runs the forward both ways) shows
    cuDNN faster on the anchor shape. The kernel is part of every compile cache key (LanguageModel, Decoder).
    """
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"attention={choice!r}: expected one of {', '.join(ATTENTION_CHOICES)}")
    if choice in ("xla", "xla-fused"):
        return "blocked" if choice == "xla" else "xla-fused"
    reasons = []
    if jax.default_backend() != "gpu":
        reasons.append(f"the backend is {jax.default_backend()}, not gpu")
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        reasons.append(f"activations are {jnp.dtype(dtype).name}, not bfloat16/float16")
    if head_dim % 8 or head_dim > 128:
        reasons.append(f"head_dim {head_dim} is not a multiple of 8 up to 128")
    if softcap is not None:
        reasons.append("the model soft-caps attention scores")
    if not reasons:
        return "cudnn"
    if choice == "cudnn":
        raise ValueError(f"attention=cudnn cannot run here: {'; '.join(reasons)}")
    return "blocked"


def fused_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale: float, kernel: str) -> jax.Array:
    """jax.nn.dot_product_attention (grouped heads, boolean mask) -> [B, T, N, H], with cuDNN ("cudnn") or XLA
    ("xla-fused"). Queries that see no key (left padding) get zeros rather than whatever the kernel leaves there,
    so nothing non-finite can reach later layers through the padded positions."""
    out = jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None], scale=scale,
                                       implementation="cudnn" if kernel == "cudnn" else "xla")
    return jnp.where(jnp.any(mask_BTS, axis=-1)[:, :, None, None], out, jnp.zeros((), out.dtype))


@struct.dataclass
class LayerCache:
    """One layer's slot in a KV cache, as the attention reads and writes it.

    keys [Ls, B, K, H, S] and values [Ls, B, K, S, H] of a segment of Ls layers (the layouts the score and value
    products read); `layer` this layer's row in them (an int for an unrolled layer, traced inside a scan), or None
    for one layer's keys [B, K, H, S] and values [B, K, S, H] without the layer axis, [K, H, S] and [K, S, H] at
    batch 1 (the decode loop's layout); `start` the cache column of the first new token.
    """

    keys: jax.Array
    values: jax.Array
    layer: jax.Array | int | None
    start: jax.Array | int


class Attention(nnx.Module):
    """Grouped-query attention (MHA when n_kv_heads == n_heads, MQA when 1).

    Optional: q/k/v and output biases, a fused [D, 3, N, H] q/k/v projection, per-head q/k norm, a custom
    query scale and tanh soft-capping of the scores.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *, qkv_bias: bool,
                 o_bias: bool, qk_norm: bool, fused_qkv: bool, norm_eps: float, norm_offset: bool, scale: float,
                 softcap: float | None, dtype, rngs: nnx.Rngs):
        D, N, K, H = d_model, n_heads, n_kv_heads, head_dim
        self.n_kv_heads, self.scale, self.softcap = K, scale, softcap
        self.has_qkv_bias, self.has_o_bias, self.has_qk_norm, self.fused = qkv_bias, o_bias, qk_norm, fused_qkv
        if fused_qkv:
            self.qkv_proj = param(rngs, (D, 3, N, H), dtype, ("embed", None, "heads", "head_dim"))
            if qkv_bias:
                self.qkv_bias = param(rngs, (3, N, H), dtype, (None, "heads", "head_dim"), init="zeros")
        else:
            self.q_proj = param(rngs, (D, N, H), dtype, ("embed", "heads", "head_dim"))
            self.k_proj = param(rngs, (D, K, H), dtype, ("embed", "kv_heads", "head_dim"))
            self.v_proj = param(rngs, (D, K, H), dtype, ("embed", "kv_heads", "head_dim"))
            if qkv_bias:
                self.q_bias = param(rngs, (N, H), dtype, ("heads", "head_dim"), init="zeros")
                self.k_bias = param(rngs, (K, H), dtype, ("kv_heads", "head_dim"), init="zeros")
                self.v_bias = param(rngs, (K, H), dtype, ("kv_heads", "head_dim"), init="zeros")
        self.o_proj = param(rngs, (N, H, D), dtype, ("heads", "head_dim", "embed"))
        if o_bias:
            self.o_bias = param(rngs, (D,), dtype, ("norm",), init="zeros")
        if qk_norm:
            self.q_norm = Norm(H, norm_eps, offset=norm_offset, dtype=dtype, logical_axis="head_dim")
            self.k_norm = Norm(H, norm_eps, offset=norm_offset, dtype=dtype, logical_axis="head_dim")

    def project(self, x_BTD: jax.Array, cos: jax.Array | None, sin: jax.Array | None,
                mesh: Mesh | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries [B, T, N, H], keys and values [B, T, K, H]: projected, q/k-normed and rotated."""
        if self.fused:
            qkv = jnp.einsum("BTD,D...NH->...BTNH", x_BTD, self.qkv_proj[...])  # ...: the q/k/v triple
            if self.has_qkv_bias:
                qkv = qkv + self.qkv_bias[...][:, None, None]
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            q = jnp.einsum("BTD,DNH->BTNH", x_BTD, self.q_proj[...])
            k = jnp.einsum("BTD,DKH->BTKH", x_BTD, self.k_proj[...])
            v = jnp.einsum("BTD,DKH->BTKH", x_BTD, self.v_proj[...])
            if self.has_qkv_bias:
                q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        if self.has_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = constrain(q, ("batch", "seq", "act_heads", "head_dim"), mesh)
        k = constrain(k, ("batch", "seq", "act_kv_heads", "head_dim"), mesh)
        v = constrain(v, ("batch", "seq", "act_kv_heads", "head_dim"), mesh)
        return q, k, v

    def __call__(self, x_BTD: jax.Array, cos: jax.Array | None, sin: jax.Array | None, mask_BTS: jax.Array,
                 mesh: Mesh | None, kernel: str = "blocked",
                 cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
        """The attention output [B, T, D] and, with a cache, the cache with this pass's keys and values written.

        mask_BTS: which keys each query sees (causal, real tokens, sliding window); without a cache the keys are
        the T new tokens, with one they are the cache's first S columns (the new tokens at `start`).
        """
        q, k, v = self.project(x_BTD, cos, sin, mesh)
        if cache is not None:
            return self._attend_cached(q, k, v, mask_BTS, cache, kernel)
        if kernel != "blocked":
            out = fused_attention(q, k, v, mask_BTS, self.scale, kernel)
            return self._output(constrain(out, ("batch", "seq", "act_heads", "head_dim"), mesh)), None
        B, T, N, H = q.shape
        K = self.n_kv_heads
        # Heads-major layout before the score and value matmuls: both become plain batched matmuls over
        # (B, K) with contiguous operands (about 1.8x faster on CPU than contracting in the [B, T, ...] layout).
        q_BKGTH = q.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)  # query head n uses kv head n // G
        k_BKSH, v_BKSH = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        # Causal attention in query blocks: block [start, end) only sees keys [0, end), which skips the
        # masked upper triangle and keeps each block's scores in cache (2x faster at T=256 and 1024 on CPU;
        # the same values, since the skipped keys are masked for every query of the block).
        block = max(64, -(-T // 16))
        outs = []
        for start in range(0, T, block):
            end = min(start + block, T)
            scores = jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGTH[:, :, :, start:end], k_BKSH[:, :, :end],
                                preferred_element_type=jnp.float32)
            probs = self._probs(scores, mask_BTS[:, start:end, :end], v.dtype)
            outs.append(jnp.einsum("BKGTS,BKSH->BKGTH", probs, v_BKSH[:, :, :end]))
        out = jnp.concatenate(outs, axis=3).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
        return self._output(constrain(out, ("batch", "seq", "act_heads", "head_dim"), mesh)), None

    def _attend_cached(self, q, k, v, mask_BTS, cache: LayerCache, kernel: str):
        """Attention of T new tokens over a KV cache, writing their keys and values at column `start`.

        How the write and the reads are ordered decides what XLA's CPU backend copies on each step of a decode loop,
        which carries the cache. A layer's own arrays (`layer` None, the decode loop's layout: keys [B, K, H, S],
        values [B, K, S, H], without the batch axis at batch 1): the write comes first and the products read the
        updated cache, which XLA updates in place (no copy; on the 56M model at batch 32 the unit-axis layout below
        copied every layer's cache twice a step: 44 vs 33 ms a step with 144 cache columns, 149 vs 90 ms with 640).
        A unit batch axis did the same: at batch 1 XLA fused the write once for the loop's carry and once for the
        products' squeezed view, and copied each cache array four times a step. An unrolled layer in a stacked array
        with a unit layer axis (an int `layer`: the server's slots) attends to the cache as it was (columns < start)
        and to the new keys and values, written only for later passes: reading the updated cache there made XLA fuse
        the write into every reader and copy the cache four times a step, this form twice. Inside a scan over layers
        (a traced `layer`) the old-cache form copies the whole stacked cache, so there too the write comes first; so
        does the fused kernel, which reads keys as [B, S, K, H].
        """
        B, T, N, H = q.shape
        K, S = self.n_kv_heads, mask_BTS.shape[-1]
        G = N // K
        k_BKHT, v_BKTH = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
        if cache.layer is None:  # the decode loop's own arrays: [B, K, H, S], or [K, H, S] at batch 1
            lead = cache.keys.shape[:-2]
            cache = _write(cache, k_BKHT.reshape(*lead, H, T), v_BKTH.reshape(*lead, T, H))
            keys, values = cache.keys[..., :S], cache.values[..., :S, :]
            if kernel != "blocked":
                out = fused_attention(q, keys.reshape(B, K, H, S).transpose(0, 3, 1, 2).astype(q.dtype),
                                      values.reshape(B, K, S, H).transpose(0, 2, 1, 3).astype(q.dtype),
                                      mask_BTS, self.scale, kernel)
                return self._output(out), cache
            q_LQH = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(*lead, G * T, H)

            def attend(n, q_LQH, keys, values, mask_BTS):
                scores = jnp.einsum("...QH,...HS->...QS", q_LQH, keys[..., :n].astype(q.dtype),
                                    preferred_element_type=jnp.float32)
                probs = self._probs(scores.reshape(B, K, G, T, n), mask_BTS[..., :n], q.dtype)
                return jnp.einsum("...QS,...SH->...QH", probs.reshape(*lead, G * T, n),
                                  values[..., :n, :].astype(q.dtype))

            # Attend over the shortest span of the cache that holds every written column, not over all S: a
            # decode loop's early steps skip the unwritten columns. In a loop the span is one of CACHE_SPANS
            # static lengths (a switch). On CPU only: elsewhere a conditional costs a host round trip.
            needed = cache.start + T
            spans = sorted({min(S, _round_up(_round_up(S * i, CACHE_SPANS) // CACHE_SPANS, 8))
                            for i in range(1, CACHE_SPANS + 1)})
            args = (q_LQH, keys, values, mask_BTS)
            if isinstance(needed, int):
                out = attend(min(n for n in spans if n >= needed), *args)
            elif len(spans) == 1 or jax.default_backend() != "cpu":
                out = attend(S, *args)
            else:
                out = jax.lax.switch(jnp.sum(jnp.asarray(spans) < needed), [partial(attend, n) for n in spans],
                                     *args)
            return self._output_heads_major(out.reshape(B, K, G, T, H)), cache
        if kernel != "blocked" or not isinstance(cache.layer, int):
            cache = _write(cache, k_BKHT, v_BKTH)
            keys_BKHS = jax.lax.dynamic_index_in_dim(cache.keys, cache.layer, 0, keepdims=False)[..., :S]
            values_BKSH = jax.lax.dynamic_index_in_dim(cache.values, cache.layer, 0, keepdims=False)[:, :, :S]
            if kernel != "blocked":
                out = fused_attention(q, keys_BKHS.transpose(0, 3, 1, 2).astype(q.dtype),
                                      values_BKSH.transpose(0, 2, 1, 3).astype(q.dtype), mask_BTS, self.scale,
                                      kernel)
                return self._output(out), cache
            q_BKGTH = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4)
            probs = self._probs(_scores(q_BKGTH, keys_BKHS.astype(q.dtype)), mask_BTS, q.dtype)
            out_BKGTH = jnp.einsum("BKGTS,BKSH->BKGTH", probs, values_BKSH.astype(q.dtype))
            return self._output_heads_major(out_BKGTH), cache
        q_BKGTH = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4)
        old_BTS = mask_BTS & (jnp.arange(S) < cache.start)[None, None, :]
        new_BTT = jax.lax.dynamic_slice_in_dim(mask_BTS, cache.start, T, axis=2)
        scores = jnp.concatenate([_scores(q_BKGTH, cache.keys[cache.layer, ..., :S].astype(q.dtype)),
                                  _scores(q_BKGTH, k_BKHT)], axis=-1)
        probs = self._probs(scores, jnp.concatenate([old_BTS, new_BTT], axis=-1), q.dtype)
        out_BKGTH = (jnp.einsum("BKGTS,BKSH->BKGTH", probs[..., :S],
                                cache.values[cache.layer, :, :, :S].astype(q.dtype))
                     + jnp.einsum("BKGTS,BKSH->BKGTH", probs[..., S:], v_BKTH))
        return self._output_heads_major(out_BKGTH), _write(cache, k_BKHT, v_BKTH)

    def _probs(self, scores_BKGTS, mask_BTS, dtype):
        """Softmax over the keys of float32 scores (scaled, soft-capped, masked), cast to `dtype`."""
        scores = scores_BKGTS * self.scale
        if self.softcap is not None:
            scores = jnp.tanh(scores / self.softcap) * self.softcap
        scores = jnp.where(mask_BTS[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        return jax.nn.softmax(scores, axis=-1).astype(dtype)

    def _output(self, out_BTNH: jax.Array) -> jax.Array:
        y = jnp.einsum("BTNH,NHD->BTD", out_BTNH, self.o_proj[...])
        return y + self.o_bias[...] if self.has_o_bias else y

    def _output_heads_major(self, out_BKGTH: jax.Array) -> jax.Array:
        """The output projection of attention in the heads-major layout.

        Contracting (K, G, H) where they lie makes XLA's CPU backend copy o_proj into the activations' order on
        every call; that copy is cheaper than moving the activations only while they are larger than the weight
        (a prefill). A decode step's few rows move to [B, T, N * H] instead: o_proj is then read in place (at batch
        1 the weight copies were 1 MB a layer every step on the 56M model)."""
        B, K, G, T, H = out_BKGTH.shape
        if B * T < self.o_proj.shape[-1]:  # one contracted axis of N * H: no order of (N, H) left to choose
            out_BTI = out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G * H)
            y = jnp.einsum("BTI,ID->BTD", out_BTI, self.o_proj[...].reshape(K * G * H, -1))
        else:
            y = jnp.einsum("BKGTH,KGHD->BTD", out_BKGTH, self.o_proj[...].reshape(K, G, H, -1))
        return y + self.o_bias[...] if self.has_o_bias else y


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _scores(q_BKGTH, k_BKHS):
    return jnp.einsum("BKGTH,BKHS->BKGTS", q_BKGTH, k_BKHS, preferred_element_type=jnp.float32)


def _write(cache: LayerCache, k_BKHT: jax.Array, v_BKTH: jax.Array) -> LayerCache:
    k, v = k_BKHT.astype(cache.keys.dtype), v_BKTH.astype(cache.values.dtype)
    if cache.layer is not None:
        k, v = k[None], v[None]
    at = (0,) * (k.ndim - 1) if cache.layer is None else (cache.layer, 0, 0, 0)
    keys = jax.lax.dynamic_update_slice(cache.keys, k, (*at, cache.start))
    values = jax.lax.dynamic_update_slice(cache.values, v, (*at[:-1], cache.start, 0))
    return cache.replace(keys=keys, values=values)


class MLP(nnx.Module):
    """Gated: down(act(gate(x)) * up(x)) (Llama, Gemma). Plain: down(act(up(x))) (GPT-2, GPT-NeoX)."""

    def __init__(self, d_model: int, d_mlp: int, *, gated: bool, activation: str, bias: bool, dtype,
                 rngs: nnx.Rngs):
        self.gated, self.bias, self.activation = gated, bias, activation
        if gated:
            self.gate_proj = param(rngs, (d_model, d_mlp), dtype, ("embed", "mlp"))
        self.up_proj = param(rngs, (d_model, d_mlp), dtype, ("embed", "mlp"))
        self.down_proj = param(rngs, (d_mlp, d_model), dtype, ("mlp", "embed"))
        if bias:
            if gated:
                self.gate_bias = param(rngs, (d_mlp,), dtype, ("mlp",), init="zeros")
            self.up_bias = param(rngs, (d_mlp,), dtype, ("mlp",), init="zeros")
            self.down_bias = param(rngs, (d_model,), dtype, ("norm",), init="zeros")

    def __call__(self, x_BTD: jax.Array, mesh: Mesh | None) -> jax.Array:
        act = _ACTIVATIONS[self.activation]
        up = jnp.einsum("BTD,DI->BTI", x_BTD, self.up_proj[...])
        if self.bias:
            up = up + self.up_bias[...]
        if self.gated:
            gate = jnp.einsum("BTD,DI->BTI", x_BTD, self.gate_proj[...])
            if self.bias:
                gate = gate + self.gate_bias[...]
            h_BTI = act(gate) * up
        else:
            h_BTI = act(up)
        h_BTI = constrain(h_BTI, ("batch", "seq", "act_mlp"), mesh)
        y = jnp.einsum("BTI,ID->BTD", h_BTI, self.down_proj[...])
        if self.bias:
            y = y + self.down_bias[...]
        return y
