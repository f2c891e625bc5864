"""The decoder-only transformer: embeddings, the layer stack, final norm, unembedding; with an optional KV cache.

One module serves the full forward (activations, the dump) and KV-cached decoding (emojax.steer.Decoder calls
the same `__call__` with a cache, the way the reference Gemma sampler calls its model).

Layers are stored stacked (every layer parameter has a leading `layers` axis) and run in segments: a segment
is a `lax.scan` over a stacked slice of layers (compile time independent of depth: the forward's default) or
one layer called directly with static weights (decoding's default: a one-token step reads each weight in place
and nothing is copied). Segments end where a static intervention acts (an SAE clamp, a patch).

Residual-stream indices follow Hugging Face `output_hidden_states`: index 0 is the embedding output, index
i (1 <= i < L) the output of layer i - 1, and index L the output of the last layer after the final norm.
Interventions at index i act on the stream before it is read there (for i = L: adds and ablations on the last
layer's output before the final norm), so a direction read at index i is written back at the same place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

from emojax.models.config import ModelConfig
from emojax.models.interventions import Interventions
from emojax.models.layers import MLP, Attention, LayerCache, Norm, param, rope_inv_freq, rope_tables
from emojax.models.sharding import constrain


@struct.dataclass
class ForwardOutput:
    logits: jax.Array | None  # [B, T, V] float32 ([B, V] for logits="last", [B, n, V] for n; None: not asked)
    hidden: tuple[jax.Array, ...]  # one [B, T, D] array per requested capture index, in request order
    read: jax.Array | None = None  # [B, T, D] the stream at `read_index` (None when not asked)
    cache: KVCache | None = None  # the cache with this pass's keys and values written


@struct.dataclass
class KVCache:
    """Keys [Ls, B, K, H, S] and values [Ls, B, K, S, H] of each layer segment (the layouts the attention
    products read), S cache columns; `segments` are the layer ranges [a, b) the passes run. With
    `single_unstacked` a one-layer segment's arrays are [B, K, H, S] and [B, K, S, H] without the layer axis, and
    [K, H, S] and [K, S, H] at batch 1: the decode loop's layout (a loop-carried cache with a unit axis, the layer
    axis or a batch of 1, is copied whole on every step by XLA's CPU backend; see Attention._attend_cached)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    segments: tuple[tuple[int, int], ...] = struct.field(pytree_node=False)

    @classmethod
    def empty(cls, cfg: ModelConfig, segments, batch: int, length: int, dtype,
              single_unstacked: bool = False) -> KVCache:
        K, H = cfg.n_kv_heads, cfg.head_dim

        def lead(a: int, b: int) -> tuple[int, ...]:
            if single_unstacked and b - a == 1:
                return (K,) if batch == 1 else (batch, K)
            return (b - a, batch, K)

        return cls(k=tuple(jnp.zeros((*lead(a, b), H, length), dtype) for a, b in segments),
                   v=tuple(jnp.zeros((*lead(a, b), length, H), dtype) for a, b in segments),
                   segments=tuple(segments))


def layer_segments(n_layers: int, breaks: Iterable[int] = (), unroll: bool = False) -> tuple[tuple[int, int], ...]:
    """Layer ranges [a, b) covering 0..n_layers: one per layer (unroll), or scans broken at residual `breaks`."""
    if unroll:
        return tuple((i, i + 1) for i in range(n_layers))
    cuts = sorted({0, n_layers, *(int(b) for b in breaks if 0 < int(b) < n_layers)})
    return tuple(zip(cuts[:-1], cuts[1:]))


def make_norm(cfg: ModelConfig, dtype) -> Norm:
    return Norm(cfg.d_model, cfg.norm_eps, kind=cfg.norm_kind, offset=cfg.norm_offset, dtype=dtype)


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)).

    With post_norms (Gemma 2/3) the attention and MLP outputs are normed before they are added; with
    parallel_residual (GPT-NeoX) both branches read the block input: x + attn(norm1(x)) + mlp(norm2(x)).
    """

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.parallel_residual = cfg.parallel_residual
        self.attn_norm = make_norm(cfg, dtype)
        self.attn = Attention(
            cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, qkv_bias=cfg.qkv_bias, o_bias=cfg.o_bias,
            qk_norm=cfg.qk_norm, fused_qkv=cfg.fused_qkv, norm_eps=cfg.norm_eps, norm_offset=cfg.norm_offset,
            scale=cfg.query_scale, softcap=cfg.attn_softcap, dtype=dtype, rngs=rngs,
        )
        self.mlp_norm = make_norm(cfg, dtype)
        self.mlp = MLP(cfg.d_model, cfg.d_mlp, gated=cfg.mlp_gated, activation=cfg.activation, bias=cfg.mlp_bias,
                       dtype=dtype, rngs=rngs)
        self.post_norms = cfg.post_norms
        if cfg.post_norms:
            self.post_attn_norm = make_norm(cfg, dtype)
            self.post_mlp_norm = make_norm(cfg, dtype)

    def __call__(self, x_BTD, cos, sin, mask_BTS, mesh, kernel: str = "blocked", cache: LayerCache | None = None):
        """The block's output [B, T, D], and the cache with this layer's keys and values written (or None)."""
        attn, cache = self.attn(self.attn_norm(x_BTD), cos, sin, mask_BTS, mesh, kernel, cache)
        if self.post_norms:
            attn = self.post_attn_norm(attn)
        if self.parallel_residual:
            return x_BTD + attn + self.mlp(self.mlp_norm(x_BTD), mesh), cache
        x_BTD = x_BTD + attn
        mlp = self.mlp(self.mlp_norm(x_BTD), mesh)
        if self.post_norms:
            mlp = self.post_mlp_norm(mlp)
        return x_BTD + mlp, cache


def stack_modules(make: Callable[[jax.Array], nnx.Module], n: int, key: jax.Array) -> nnx.Module:
    """Builds `n` modules with `make(key_i)` and stacks their state along a new leading axis."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make(jax.random.key(0))))
    states = jax.vmap(lambda k: nnx.state(make(k)))(jax.random.split(key, n))
    return nnx.merge(graphdef, states)


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), dtype, ("vocab", "embed"))
        self.layers = stack_modules(
            lambda k: DecoderLayer(cfg, dtype=dtype, rngs=nnx.Rngs(k)), cfg.n_layers, rngs.params()
        )
        if cfg.learned_positions:
            self.pos_embed = param(rngs, (cfg.learned_positions, cfg.d_model), dtype, (None, "embed"))
        self.final_norm = make_norm(cfg, dtype)
        self.lm_head = None if cfg.tie_embeddings else param(
            rngs, (cfg.d_model, cfg.vocab_size), dtype, ("embed", "vocab")
        )

    def __call__(self, tokens_BT: jax.Array, attention_mask: jax.Array | None = None, *,
                 capture: Sequence[int] = (), interventions: Interventions | None = None,
                 generated_BT: jax.Array | None = None, mesh: Mesh | None = None, logits: bool | str | int = True,
                 kernel: str = "blocked", cache: KVCache | None = None, start: jax.Array | int = 0,
                 positions_BT: jax.Array | None = None, layer_states: tuple | None = None,
                 read_index: jax.Array | None = None, rope: tuple | None = None) -> ForwardOutput:
        """Logits and the residual stream at the `capture` indices (and at the traced `read_index`).

        Without a cache: attention_mask [B, T] is 1 for real tokens, 0 for (left) padding; positions count real
        tokens only, so a left-padded row gives the same values on its real tokens as the unpadded sequence.
        logits=False returns hidden states only: the unembedding is skipped, and so are the layers after the
        deepest captured index (an activation dump of layer 4 of 8 runs 4 layers); logits="last": the last
        column's logits [B, V] only; logits=n (an int): the last n columns' [B, n, V].
        With a cache (decoding): the T tokens sit at cache columns [start, start + T); attention_mask [B, S] says
        which of the S cache columns the queries may see (real tokens, the new ones included; causality by
        column is applied here); positions_BT is required; layer_states: the cache's segments of the layer
        state, split once outside a decode loop (`split_layers`), else split here.
        generated_BT: 1.0 on generated columns (where interventions with positions="generated" act).
        kernel: the attention kernel (emojax.models.layers.attention_kernel).
        rope: the rotary tables of positions_BT, `self.rope(positions)` computed ahead. A decode loop computes all
        its steps' tables before the loop: computed inside, XLA's CPU backend fuses cos and sin into each layer's
        products and recomputes them there (2.6 ms of a 37 ms step, 56M model, batch 32).
        """
        cfg = self.config
        L = cfg.n_layers
        capture = tuple(int(i) for i in capture)
        for i in capture:
            if not 0 <= i <= L:
                raise ValueError(f"capture index {i} is outside 0..{L} (embeddings, then one per layer)")
        B, T = tokens_BT.shape
        iv = interventions
        if cache is None:
            valid_BS = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
            positions_BT = jnp.maximum(jnp.cumsum(valid_BS.astype(jnp.int32), axis=1) - 1, 0)
            depth = L if logits is not False or not capture else max(capture)
            segments = layer_segments(depth, () if iv is None else iv.static_indices)
        else:
            valid_BS, depth, segments = attention_mask.astype(bool), L, cache.segments
        q_cols_T = start + jnp.arange(T, dtype=jnp.int32)
        k_cols_S = jnp.arange(valid_BS.shape[1], dtype=jnp.int32)
        base_mask_BTS = (k_cols_S[None, :] <= q_cols_T[:, None])[None] & valid_BS[:, None, :]
        gen_BT = jnp.zeros((B, T), jnp.float32) if generated_BT is None else generated_BT.astype(jnp.float32)

        def edit(i, x):
            return x if iv is None else iv.apply(i, x, gen_BT)

        def edit_static(i, x):
            return x if iv is None else iv.apply_static(i, x, gen_BT)

        x = jnp.take(self.embed[...], tokens_BT, axis=0)
        if cfg.embed_scale:
            x = x * jnp.asarray(cfg.d_model ** 0.5, x.dtype)  # rounded to the activation dtype, as in Gemma
        if cfg.learned_positions:
            x = x + jnp.take(self.pos_embed[...], positions_BT, axis=0)
        x = constrain(edit_static(0, edit(0, x)), ("batch", "seq", "act_embed"), mesh)
        embeddings = x

        # Residual indices 1..L-1 are read into a buffer; every other index writes to one extra scratch slot,
        # so a scanned layer has no branch on its index. A traced read_index is a traced slot table.
        if read_index is not None:
            slot_of = jnp.where(jnp.arange(L + 1) == read_index, 0, 1).astype(jnp.int32)
            n_slots = 1
        else:
            in_buffer = sorted({i for i in capture if 0 < i < L})
            table = np.full((L + 1,), len(in_buffer), np.int32)
            for slot, i in enumerate(in_buffer):
                table[i] = slot
            slot_of, n_slots = jnp.asarray(table), len(in_buffer)
        buffer = jnp.zeros((n_slots + 1, B, T, cfg.d_model), x.dtype) if n_slots else None

        graph, states = layer_states or self.split_layers(segments)
        cos_tables, sin_tables = self.rope(positions_BT) if rope is None else rope
        rope_of_layer = self._rope_of_layer()
        windows = np.asarray(cfg.layer_windows, np.int32)
        ks, vs = (None, None) if cache is None else (list(cache.k), list(cache.v))

        def layer(x, state, i, window, rope_index, kv):
            """Layer i (static or traced) of a segment: its mask, rotary table and cache slot."""
            in_window = (window == 0) | (q_cols_T[:, None] - k_cols_S[None, :] < window)
            cos = None if cos_tables is None else cos_tables[rope_index]
            sin = None if sin_tables is None else sin_tables[rope_index]
            return nnx.merge(graph, state)(x, cos, sin, base_mask_BTS & in_window[None], mesh, kernel, kv)

        def keep(buffer, i, x):
            return buffer if buffer is None else jax.lax.dynamic_update_index_in_dim(buffer, x, slot_of[i], 0)

        for s, ((a, b), state) in enumerate(zip(segments, states)):
            if b - a == 1:  # one layer, static weights
                kv = None if cache is None else LayerCache(ks[s], vs[s], 0 if ks[s].ndim == 5 else None, start)
                x, kv = layer(x, state, 0, int(windows[a]), int(rope_of_layer[a]), kv)
                x = edit(b, x)
            else:
                def body(carry, xs, a=a):
                    x, buffer, k_all, v_all = carry
                    state_l, j, window, rope_index = xs
                    kv = None if k_all is None else LayerCache(k_all, v_all, j, start)
                    x, kv = layer(x, state_l, j, window, rope_index, kv)
                    x = constrain(edit(a + 1 + j, x), ("batch", "seq", "act_embed"), mesh)
                    k_all, v_all = (None, None) if kv is None else (kv.keys, kv.values)
                    return (x, keep(buffer, a + 1 + j, x), k_all, v_all), None

                carry = (x, buffer, None if cache is None else ks[s], None if cache is None else vs[s])
                xs = (state, jnp.arange(b - a), jnp.asarray(windows[a:b]), jnp.asarray(rope_of_layer[a:b]))
                (x, buffer, k_all, v_all), _ = jax.lax.scan(body, carry, xs)
                kv = None if cache is None else LayerCache(k_all, v_all, 0, start)
            if kv is not None:
                ks[s], vs[s] = kv.keys, kv.values
            x = constrain(x, ("batch", "seq", "act_embed"), mesh)
            if b < L:
                x = edit_static(b, x)
                buffer = keep(buffer, b, x)

        if depth == L:
            x = edit_static(L, self.final_norm(x))
        logits_out = None
        if logits is not False:
            if logits == "last":
                x_out = x[:, -1]
            elif logits is True:
                x_out = x
            else:
                x_out = x[:, -int(logits):]
            logits_out = self.unembed(x_out)
            if x_out.ndim == 3:
                logits_out = constrain(logits_out, ("batch", "seq", "act_vocab"), mesh)

        def residual(i):
            if i == 0:
                return embeddings
            return x if i == L else buffer[slot_of[i]]

        hidden = tuple(constrain(residual(i), ("batch", "seq", "act_embed"), mesh) for i in capture)
        read = None
        if read_index is not None:
            read = jnp.where(read_index == 0, embeddings, jnp.where(read_index == L, x, buffer[0]))
        new_cache = None if cache is None else cache.replace(k=tuple(ks), v=tuple(vs))
        return ForwardOutput(logits=logits_out, hidden=hidden, read=read, cache=new_cache)

    def unembed(self, x_D: jax.Array) -> jax.Array:
        """float32 logits [..., V] of the final-normed stream [..., D] (soft-capped where the model caps)."""
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        logits = jnp.einsum("...D,DV->...V", x_D, head, preferred_element_type=jnp.float32)
        if self.config.final_softcap is not None:
            logits = jnp.tanh(logits / self.config.final_softcap) * self.config.final_softcap
        return logits

    def split_layers(self, segments) -> tuple[nnx.GraphDef, list]:
        """The layer graph and each segment's slice of the stacked layer state; a one-layer segment's without the
        layer axis (t[a], the arrays its layer reads: a decode loop and its prefill then share one copy of each
        weight, where a [1, ...] slice was copied once for each)."""
        graph, state = nnx.split(self.layers)
        return graph, [jax.tree.map(lambda t, a=a, b=b: t[a] if b - a == 1 else t[a:b], state) for a, b in segments]

    def rope(self, positions_BT) -> tuple[jax.Array | None, jax.Array | None]:
        """cos/sin tables of the positions, stacked over the distinct rotary settings [settings, B, T, R]
        (None, None for a model without rotary positions)."""
        cfg = self.config
        if cfg.rope is None:
            return None, None
        ropes = [cfg.rope] if cfg.rope_local is None else [cfg.rope, cfg.rope_local]
        tables = [rope_tables(positions_BT, rope_inv_freq(r, int(cfg.head_dim * r.fraction))) for r in ropes]
        return jnp.stack([c for c, _ in tables]), jnp.stack([s for _, s in tables])

    def _rope_of_layer(self) -> np.ndarray:
        """Each layer's index into the rotary settings (1: the local one, for sliding-window layers)."""
        cfg = self.config
        use_local = cfg.rope is not None and cfg.rope_local is not None
        return np.asarray([int(use_local and w > 0) for w in cfg.layer_windows], np.int32)
