"""KV-cached passes over the decoder, for the decode loop of emojax.steer.

A pass runs T new tokens (a whole left-padded prompt, or one token per decode step) through the layers,
writes their keys and values into a preallocated cache at columns [start, start + T) and attends over the
first `key_len` columns. The math is the one of `Transformer.__call__` (same modules, same float32 scores
and softmax, same residual indices), so a cached run equals a full recompute to float32 rounding.

Layers run in segments: a segment is either one layer, called directly with static weights (the default for
decoding: a one-token step reads each weight once and nothing is copied), or a `lax.scan` over a stacked
slice of layers (compile time independent of depth; each step then copies the sliced weights). Segment
boundaries are where static interventions act (an SAE clamp) and where residual streams are read.

Cache layout, per segment: keys [Ls, B, K, H, S] and values [Ls, B, K, S, H] (as the attention matmuls read
them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

from emojax.models.config import ModelConfig
from emojax.models.layers import apply_rope
from emojax.models.sharding import constrain
from emojax.models.transformer import Transformer

# edit(residual index, x_BTD) -> x_BTD: applied at every residual index 1..L (index may be traced in a scan).
Edit = Callable[[jax.Array | int, jax.Array], jax.Array]


@struct.dataclass
class KVCache:
    """Keys and values per layer segment: k[s] is [Ls, B, K, H, S], v[s] is [Ls, B, K, S, H]."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]


def layer_segments(n_layers: int, breaks: Iterable[int] = (), unroll: bool = True) -> tuple[tuple[int, int], ...]:
    """Layer ranges [a, b) covering 0..n_layers; with unroll=False, scans broken only at residual `breaks`."""
    if unroll:
        return tuple((i, i + 1) for i in range(n_layers))
    cuts = sorted({0, n_layers, *(int(b) for b in breaks if 0 < int(b) < n_layers)})
    return tuple(zip(cuts[:-1], cuts[1:]))


def init_cache(cfg: ModelConfig, segments, batch: int, length: int, dtype) -> KVCache:
    K, H = cfg.n_kv_heads, cfg.head_dim
    return KVCache(k=tuple(jnp.zeros((b - a, batch, K, H, length), dtype) for a, b in segments),
                   v=tuple(jnp.zeros((b - a, batch, K, length, H), dtype) for a, b in segments))


def split_layers(model: Transformer, segments) -> tuple[nnx.GraphDef, list]:
    """The layer graph and each segment's state (sliced once, outside any decode loop)."""
    graph, state = nnx.split(model.layers)
    return graph, [jax.tree.map(lambda x, a=a, b=b: x[a:b], state) for a, b in segments]


def embed(model: Transformer, tokens_BT: jax.Array, positions_BT: jax.Array) -> jax.Array:
    """The embedding output (residual index 0), as in Transformer.__call__."""
    cfg = model.config
    x = jnp.take(model.embed[...], tokens_BT, axis=0)
    if cfg.embed_scale:
        x = x * jnp.asarray(cfg.d_model ** 0.5, x.dtype)
    if cfg.learned_positions:
        x = x + jnp.take(model.pos_embed[...], positions_BT, axis=0)
    return x


def unembed(model: Transformer, x_BTD: jax.Array) -> jax.Array:
    """Logits [B, T, V] float32 from the normed last residual (index L)."""
    cfg = model.config
    head = model.embed[...].T if model.lm_head is None else model.lm_head[...]
    logits = jnp.einsum("BTD,DV->BTV", x_BTD, head, preferred_element_type=jnp.float32)
    if cfg.final_softcap is not None:
        logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
    return logits


def _attention(attn, x_BTD, cos, sin, k_all, v_all, layer, start, key_len, mask_BTS, mesh):
    """Attention of T new tokens; writes their keys/values at column `start` of layer `layer` of the segment.

    An unrolled layer (static `layer`) attends to the cache as it was (columns < start) and to the new keys
    and values, which are written into the cache only for later passes. Reading the cache only before the
    write halves what XLA's CPU backend copies per decode step: reading the updated cache made it fuse the
    write into every reader and copy each layer's cache four times a step (~10% of a batch-32 step of the
    56M model). Inside a scan over layers (traced `layer`) that form copies the whole stacked cache instead,
    so there the write comes first and the products read the updated cache.
    Keys are cached as [.., K, H, S] and values as [.., K, S, H]: the layouts the score and value products read.
    """
    q, k, v = attn._project(x_BTD)
    if attn.has_qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    if cos is not None:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    B, T, N, H = q.shape
    K = attn.n_kv_heads
    G = N // K
    q_BKGTH = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4)
    k_BKHT, v_BKTH = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
    if isinstance(layer, int):  # one unrolled layer: read the old cache, write after
        keys_BKHS = k_all[layer, ..., :key_len]
        values_BKSH = v_all[layer, :, :, :key_len]
        old_BTS = mask_BTS & (jnp.arange(key_len) < start)[None, None, :]
        new_BTT = jax.lax.dynamic_slice_in_dim(mask_BTS, start, T, axis=2)
        scores = jnp.concatenate([jnp.einsum("BKGTH,BKHS->BKGTS", q_BKGTH, keys, preferred_element_type=jnp.float32)
                                  for keys in (keys_BKHS.astype(q.dtype), k_BKHT)], axis=-1)
        mask = jnp.concatenate([old_BTS, new_BTT], axis=-1)
        values = (values_BKSH, v_BKTH)
    else:  # a layer of a scan over a stacked cache (the read-before-write form copies the whole stack there)
        k_all, v_all = _write(k_all, v_all, k_BKHT, v_BKTH, layer, start)
        keys_BKHS = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False)[..., :key_len]
        scores = jnp.einsum("BKGTH,BKHS->BKGTS", q_BKGTH, keys_BKHS.astype(q.dtype),
                            preferred_element_type=jnp.float32)
        mask = mask_BTS
        values = (jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False)[:, :, :key_len],)
    scores = scores * attn.scale
    if attn.softcap is not None:
        scores = jnp.tanh(scores / attn.softcap) * attn.softcap
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    cols = np.cumsum([0] + [part.shape[2] for part in values])  # probs columns of each value block
    out_BKGTH = sum(jnp.einsum("BKGTS,BKSH->BKGTH", probs[..., a:b], part.astype(q.dtype))
                    for a, b, part in zip(cols[:-1], cols[1:], values))
    # The output projection contracts (K, G, H) in the attention layout: no transpose of the activations.
    y = jnp.einsum("BKGTH,KGHD->BTD", out_BKGTH, attn.o_proj[...].reshape(K, G, H, -1))
    if attn.has_o_bias:
        y = y + attn.o_bias[...]
    if isinstance(layer, int):
        k_all, v_all = _write(k_all, v_all, k_BKHT, v_BKTH, layer, start)
    return y, k_all, v_all


def _write(k_all, v_all, k_BKHT, v_BKTH, layer, start):
    k_all = jax.lax.dynamic_update_slice(k_all, k_BKHT[None].astype(k_all.dtype), (layer, 0, 0, 0, start))
    v_all = jax.lax.dynamic_update_slice(v_all, v_BKTH[None].astype(v_all.dtype), (layer, 0, 0, start, 0))
    return k_all, v_all


def _layer(layer, x_BTD, cos, sin, k_all, v_all, index, start, key_len, mask_BTS, mesh):
    """One DecoderLayer with a cache (the block structure of DecoderLayer.__call__)."""
    attn, k_all, v_all = _attention(layer.attn, layer.attn_norm(x_BTD), cos, sin, k_all, v_all, index, start,
                                    key_len, mask_BTS, mesh)
    if layer.post_norms:
        attn = layer.post_attn_norm(attn)
    if layer.parallel_residual:
        return x_BTD + attn + layer.mlp(layer.mlp_norm(x_BTD), mesh), k_all, v_all
    x_BTD = x_BTD + attn
    mlp = layer.mlp(layer.mlp_norm(x_BTD), mesh)
    if layer.post_norms:
        mlp = layer.post_mlp_norm(mlp)
    return x_BTD + mlp, k_all, v_all


def run_layers(cfg: ModelConfig, graph: nnx.GraphDef, states: list, segments, x_BTD: jax.Array,
               positions_BT: jax.Array, rope_fn, mask_BTS: jax.Array, q_cols_T: jax.Array, k_cols_S: jax.Array,
               cache: KVCache, start, key_len: int, *, edit: Edit | None = None,
               at_boundary: Callable[[int, jax.Array], jax.Array] | None = None,
               read_index: jax.Array | None = None, read_BTD: jax.Array | None = None,
               mesh: Mesh | None = None) -> tuple[jax.Array, KVCache, jax.Array | None]:
    """Runs every layer over x_BTD (the residual at index 0, already edited there).

    mask_BTS: [B, T, key_len] bool, key columns a query may see before sliding windows (real tokens, causal).
    q_cols_T / k_cols_S: cache columns of the queries and of the keys (for sliding windows).
    edit(i, x) is applied after layer i - 1 (residual index i, 1 <= i <= L; before the final norm for i = L);
    at_boundary(i, x) after that at every segment end i < L (static i).
    read_index (a traced scalar): the residual index whose stream (after edit and at_boundary) replaces
    read_BTD; the index is an array, so reading another layer does not recompile.
    Returns the last layer's output (before the final norm), the updated cache and the read stream.
    """
    cos_R, sin_R, _ = rope_fn(positions_BT)
    rope_local = cfg.rope_local is not None
    ks, vs = list(cache.k), list(cache.v)

    def read(i, x, r):
        return r if read_index is None else jnp.where(read_index == i, x, r)

    for s, ((a, b), state) in enumerate(zip(segments, states)):
        def one(x, k_all, v_all, state_l, i, window, rope_index):
            in_window = (window == 0) | (q_cols_T[:, None] - k_cols_S[None, :key_len] < window)
            cos = None if cos_R is None else cos_R[rope_index]
            sin = None if sin_R is None else sin_R[rope_index]
            layer = nnx.merge(graph, state_l)
            x, k_all, v_all = _layer(layer, x, cos, sin, k_all, v_all, i, start, key_len,
                                     mask_BTS & in_window[None], mesh)
            return x, k_all, v_all

        if b - a == 1:
            window = cfg.layer_windows[a]
            rope_index = int(rope_local and window > 0)
            x_BTD, ks[s], vs[s] = one(x_BTD, ks[s], vs[s], jax.tree.map(lambda t: t[0], state), 0, window,
                                      rope_index)
            if edit is not None:
                x_BTD = edit(b, x_BTD)
        else:
            windows = jnp.asarray(cfg.layer_windows[a:b], jnp.int32)
            rope_idx = jnp.asarray([int(rope_local and w > 0) for w in cfg.layer_windows[a:b]], jnp.int32)

            def body(carry, xs):
                x, k_all, v_all, r = carry
                state_l, i, window, rope_index = xs
                x, k_all, v_all = one(x, k_all, v_all, state_l, i, window, rope_index)
                if edit is not None:
                    x = edit(a + 1 + i, x)
                return (x, k_all, v_all, read(a + 1 + i, x, r)), None

            (x_BTD, ks[s], vs[s], read_BTD), _ = jax.lax.scan(
                body, (x_BTD, ks[s], vs[s], read_BTD), (state, jnp.arange(b - a), windows, rope_idx))
        x_BTD = constrain(x_BTD, ("batch", "seq", "act_embed"), mesh)
        if at_boundary is not None and b < cfg.n_layers:
            x_BTD = at_boundary(b, x_BTD)
        read_BTD = read(b, x_BTD, read_BTD)
    return x_BTD, KVCache(k=tuple(ks), v=tuple(vs)), read_BTD
