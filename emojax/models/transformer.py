"""The decoder-only transformer: embeddings, a scanned stack of layers, final norm, unembedding.

Layers are stored stacked (every layer parameter has a leading `layers` axis) and run with `jax.lax.scan`,
so compile time does not grow with depth. The graph of one layer is split off once; inside the scan body
each layer's slice of the state is merged back into a module.

Residual-stream indices follow Hugging Face `output_hidden_states`: index 0 is the embedding output, index
i (1 <= i < L) the output of layer i - 1, and index L the output of the last layer after the final norm.
Steering row i is added to the residual stream at index i before it is read (for i = L: to the last layer's
output, before the final norm), so a direction read at index i is written back at the same place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

from emojax.models.config import ModelConfig
from emojax.models.layers import MLP, Attention, Norm, param, rope_inv_freq, rope_tables
from emojax.models.sharding import constrain


@struct.dataclass
class ForwardOutput:
    logits: jax.Array | None  # [B, T, V] float32 (None when the forward was asked for hidden states only)
    hidden: tuple[jax.Array, ...]  # one [B, T, D] array per requested capture index, in request order


@struct.dataclass
class Steering:
    """Additive steering, all arrays (changing values never recompiles).

    vectors: [L + 1, D]; row i is added at residual index i (rows of zeros leave a layer untouched).
    scale:   [B] per-example multiplier (a strength sweep in one batch), or None for 1.
    mask:    [B, T] per-position multiplier (e.g. only generated positions), or None for all positions.
    """

    vectors: jax.Array
    scale: jax.Array | None = None
    mask: jax.Array | None = None

    def delta(self, index, dtype) -> jax.Array:
        """What is added at residual index `index`: broadcastable to [B, T, D]."""
        v = self.vectors[index].astype(jnp.float32)[None, None, :]
        if self.scale is not None:
            v = v * self.scale.astype(jnp.float32)[:, None, None]
        if self.mask is not None:
            v = v * self.mask.astype(jnp.float32)[:, :, None]
        return v.astype(dtype)


@struct.dataclass
class Patch:
    """Replaces the residual stream at one index (0 = embeddings, i = output of layer i - 1, L = the final
    normed stream the unembedding reads).

    values: [B, T, D]; what later layers read instead of the model's own stream there (e.g. an SAE
    reconstruction, for the spliced-in loss). Captures at `index` return the patched values.
    """

    values: jax.Array
    index: int = struct.field(pytree_node=False, default=1)


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

    def __call__(self, x_BTD, cos, sin, mask_BTS, mesh):
        attn = self.attn(self.attn_norm(x_BTD), cos, sin, mask_BTS, mesh)
        if self.post_norms:
            attn = self.post_attn_norm(attn)
        if self.parallel_residual:
            return x_BTD + attn + self.mlp(self.mlp_norm(x_BTD), mesh)
        x_BTD = x_BTD + attn
        mlp = self.mlp(self.mlp_norm(x_BTD), mesh)
        if self.post_norms:
            mlp = self.post_mlp_norm(mlp)
        return x_BTD + mlp


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

    def __call__(self, tokens_BT: jax.Array, attention_mask_BT: jax.Array | None = None, *,
                 capture: Sequence[int] = (), steering: Steering | None = None,
                 mesh: Mesh | None = None, logits: bool = True, patch: Patch | None = None) -> ForwardOutput:
        """Logits [B, T, V] (float32) and the residual stream at the `capture` indices.

        attention_mask_BT: 1 for real tokens, 0 for (left) padding; positions count real tokens only, so a
        left-padded row gives the same values on its real tokens as the unpadded sequence.
        logits=False returns hidden states only: the unembedding is skipped, and so are the layers after the
        deepest captured index (an activation dump of layer 4 of 8 runs 4 layers).
        """
        cfg = self.config
        L = cfg.n_layers
        capture = tuple(int(i) for i in capture)
        for i in capture:
            if not 0 <= i <= L:
                raise ValueError(f"capture index {i} is outside 0..{L} (embeddings, then one per layer)")
        if patch is not None and not 0 <= patch.index <= L:
            raise ValueError(f"patch index {patch.index} is outside 0..{L}")
        B, T = tokens_BT.shape
        if attention_mask_BT is None:
            valid_BT = jnp.ones((B, T), bool)
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        else:
            valid_BT = attention_mask_BT.astype(bool)
            positions_BT = jnp.maximum(jnp.cumsum(valid_BT.astype(jnp.int32), axis=1) - 1, 0)

        cos_RBTH, sin_RBTH, rope_of_layer = self._rope(positions_BT)
        q_idx = jnp.arange(T)[:, None]
        kv_idx = jnp.arange(T)[None, :]
        causal_TS = kv_idx <= q_idx
        base_mask_BTS = causal_TS[None] & valid_BT[:, None, :]

        x = jnp.take(self.embed[...], tokens_BT, axis=0)
        if cfg.embed_scale:
            x = x * jnp.asarray(cfg.d_model ** 0.5, x.dtype)  # rounded to the activation dtype, as in Gemma
        if cfg.learned_positions:
            x = x + jnp.take(self.pos_embed[...], positions_BT, axis=0)
        if steering is not None:
            x = x + steering.delta(0, x.dtype)
        if patch is not None and patch.index == 0:
            x = patch.values.astype(x.dtype)
        x = constrain(x, ("batch", "seq", "act_embed"), mesh)
        embeddings = x

        # Residual indices 1..L-1 are read inside the scan into a buffer; layers whose output is not
        # captured write to one extra scratch slot, so the body has no branch on the layer index.
        in_scan = sorted({i for i in capture if 0 < i < L})
        slot_of = np.full((L,), len(in_scan), np.int32)
        for slot, i in enumerate(in_scan):
            slot_of[i - 1] = slot
        buffer = jnp.zeros((len(in_scan) + 1, B, T, cfg.d_model), x.dtype) if in_scan else None

        layer_graph, layer_state = nnx.split(self.layers)
        windows_L = jnp.asarray(cfg.layer_windows, jnp.int32)
        steer_rows = jnp.arange(1, L + 1)
        patched_L = jnp.arange(1, L) == (-1 if patch is None else patch.index)
        patched_L = jnp.concatenate([patched_L, jnp.zeros((1,), bool)])  # index L is patched after the final norm
        depth = L if logits or not capture else max(max(capture), 0)
        scanned = jax.tree.map(lambda a: a[:depth],
                               (layer_state, windows_L, jnp.asarray(slot_of), steer_rows, patched_L))

        def body(carry, xs):
            x, buffer = carry
            state, window, rope_index, slot, steer_row, patched = xs
            in_window = (window == 0) | (q_idx - kv_idx < window)
            mask = base_mask_BTS & in_window[None]
            cos = None if cos_RBTH is None else cos_RBTH[rope_index]
            sin = None if sin_RBTH is None else sin_RBTH[rope_index]
            x = nnx.merge(layer_graph, state)(x, cos, sin, mask, mesh)
            if steering is not None:
                x = x + steering.delta(steer_row, x.dtype)
            if patch is not None:
                x = jnp.where(patched, patch.values.astype(x.dtype), x)
            x = constrain(x, ("batch", "seq", "act_embed"), mesh)
            if buffer is not None:
                buffer = jax.lax.dynamic_update_index_in_dim(buffer, x, slot, axis=0)
            return (x, buffer), None

        if depth:
            state_L, window_L, slot_L, steer_L, patched_L = scanned
            (x, buffer), _ = jax.lax.scan(
                body, (x, buffer), (state_L, window_L, rope_of_layer[:depth], slot_L, steer_L, patched_L)
            )

        if depth == L:
            x = self.final_norm(x)
            if patch is not None and patch.index == L:
                x = patch.values.astype(x.dtype)
        logits_BTV = None
        if logits:
            head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
            logits_BTV = jnp.einsum("BTD,DV->BTV", x, head, preferred_element_type=jnp.float32)
            if cfg.final_softcap is not None:
                logits_BTV = jnp.tanh(logits_BTV / cfg.final_softcap) * cfg.final_softcap
            logits_BTV = constrain(logits_BTV, ("batch", "seq", "act_vocab"), mesh)

        def residual(i):
            if i == 0:
                return embeddings
            if i == L:
                return x
            return buffer[in_scan.index(i)]

        hidden = tuple(constrain(residual(i), ("batch", "seq", "act_embed"), mesh) for i in capture)
        return ForwardOutput(logits=logits_BTV, hidden=hidden)

    def _rope(self, positions_BT):
        """cos/sin tables stacked over the distinct rotary settings [R, B, T, rot], and each layer's index."""
        cfg = self.config
        if cfg.rope is None:
            return None, None, jnp.zeros((cfg.n_layers,), jnp.int32)
        ropes = [cfg.rope] if cfg.rope_local is None else [cfg.rope, cfg.rope_local]
        tables = [rope_tables(positions_BT, rope_inv_freq(r, int(cfg.head_dim * r.fraction))) for r in ropes]
        use_local = cfg.rope_local is not None
        rope_of_layer = jnp.asarray([int(use_local and w > 0) for w in cfg.layer_windows], jnp.int32)
        return jnp.stack([c for c, _ in tables]), jnp.stack([s for _, s in tables]), rope_of_layer
