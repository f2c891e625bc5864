"""The key table between Hugging Face tensor names/layouts and emojax parameters.

One `TensorMap` per emojax parameter: its state path, the Hugging Face key ("{i}" for the layer index of a
stacked parameter), the Hugging Face shape of one tensor, and the layout changes in both directions.
Hugging Face linear weights are [out, in]; emojax keeps [in, out] with heads split out ([D, N, H]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from emojax.models.config import ModelConfig

Layout = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class TensorMap:
    path: tuple[str, ...]
    hf_key: str
    hf_shape: tuple[int, ...]
    to_emojax: Layout
    to_hf: Layout

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_key

    def hf_keys(self, n_layers: int) -> list[str]:
        return [self.hf_key.format(i=i) for i in range(n_layers)] if self.stacked else [self.hf_key]


def _identity(w: np.ndarray) -> np.ndarray:
    return w


def _transpose(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)


def _split_heads_in(n: int, h: int) -> tuple[Layout, Layout]:
    """[N*H, D] (HF q/k/v weight) <-> [D, N, H]."""
    return (
        lambda w: np.ascontiguousarray(w.reshape(n, h, -1).transpose(2, 0, 1)),
        lambda w: np.ascontiguousarray(w.transpose(1, 2, 0).reshape(n * h, -1)),
    )


def _split_heads_out(n: int, h: int) -> tuple[Layout, Layout]:
    """[D, N*H] (HF o_proj weight) <-> [N, H, D]."""
    return (
        lambda w: np.ascontiguousarray(w.reshape(-1, n, h).transpose(1, 2, 0)),
        lambda w: np.ascontiguousarray(w.transpose(2, 0, 1).reshape(-1, n * h)),
    )


def _split_heads_bias(n: int, h: int) -> tuple[Layout, Layout]:
    """[N*H] <-> [N, H]."""
    return lambda b: b.reshape(n, h), lambda b: b.reshape(n * h)


def _norm(path: tuple[str, ...], hf_prefix: str, dim: int, layer_norm: bool) -> list[TensorMap]:
    maps = [TensorMap(path + ("scale",), hf_prefix + ".weight", (dim,), _identity, _identity)]
    if layer_norm:
        maps.append(TensorMap(path + ("bias",), hf_prefix + ".bias", (dim,), _identity, _identity))
    return maps


def _untied_head(cfg: ModelConfig, hf_key: str) -> list[TensorMap]:
    """The unembedding [V, D] -> [D, V], unless it is tied to the embedding."""
    if cfg.tie_embeddings:
        return []
    return [TensorMap(("lm_head",), hf_key, (cfg.vocab_size, cfg.d_model), _transpose, _transpose)]


def llama_family_keys(cfg: ModelConfig) -> list[TensorMap]:
    """Llama, Mistral, Qwen2/3 and Gemma 1/2/3 (same names; Gemma 2/3 add sandwich norms)."""
    D, d_mlp, V = cfg.d_model, cfg.d_mlp, cfg.vocab_size
    N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    layer = "model.layers.{i}."
    maps = [
        TensorMap(("embed",), "model.embed_tokens.weight", (V, D), _identity, _identity),
        TensorMap(("final_norm", "scale"), "model.norm.weight", (D,), _identity, _identity),
        TensorMap(("layers", "attn_norm", "scale"), layer + "input_layernorm.weight", (D,), _identity, _identity),
        TensorMap(("layers", "attn", "q_proj"), layer + "self_attn.q_proj.weight", (N * H, D), *_split_heads_in(N, H)),
        TensorMap(("layers", "attn", "k_proj"), layer + "self_attn.k_proj.weight", (K * H, D), *_split_heads_in(K, H)),
        TensorMap(("layers", "attn", "v_proj"), layer + "self_attn.v_proj.weight", (K * H, D), *_split_heads_in(K, H)),
        TensorMap(("layers", "attn", "o_proj"), layer + "self_attn.o_proj.weight", (D, N * H), *_split_heads_out(N, H)),
        TensorMap(("layers", "mlp", "gate_proj"), layer + "mlp.gate_proj.weight", (d_mlp, D), _transpose, _transpose),
        TensorMap(("layers", "mlp", "up_proj"), layer + "mlp.up_proj.weight", (d_mlp, D), _transpose, _transpose),
        TensorMap(("layers", "mlp", "down_proj"), layer + "mlp.down_proj.weight", (D, d_mlp), _transpose, _transpose),
    ]
    if cfg.post_norms:
        for path, name in (("post_attn_norm", "post_attention_layernorm"), ("mlp_norm", "pre_feedforward_layernorm"),
                           ("post_mlp_norm", "post_feedforward_layernorm")):
            maps.append(TensorMap(("layers", path, "scale"), layer + name + ".weight", (D,), _identity, _identity))
    else:
        maps.append(TensorMap(("layers", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight", (D,),
                              _identity, _identity))
    if cfg.qkv_bias:
        for name, n in (("q", N), ("k", K), ("v", K)):
            maps.append(TensorMap(("layers", "attn", f"{name}_bias"), layer + f"self_attn.{name}_proj.bias",
                                  (n * H,), *_split_heads_bias(n, H)))
    if cfg.o_bias:
        maps.append(TensorMap(("layers", "attn", "o_bias"), layer + "self_attn.o_proj.bias", (D,),
                              _identity, _identity))
    if cfg.qk_norm:
        for name in ("q", "k"):
            maps.append(TensorMap(("layers", "attn", f"{name}_norm", "scale"), layer + f"self_attn.{name}_norm.weight",
                                  (H,), _identity, _identity))
    if cfg.mlp_bias:
        for name, size in (("gate", d_mlp), ("up", d_mlp), ("down", D)):
            maps.append(TensorMap(("layers", "mlp", f"{name}_bias"), layer + f"mlp.{name}_proj.bias", (size,),
                                  _identity, _identity))
    return maps + _untied_head(cfg, "lm_head.weight")


def gpt2_keys(cfg: ModelConfig, prefix: str = "transformer.") -> list[TensorMap]:
    """GPT-2: Conv1D weights are already [in, out]; c_attn holds q, k, v side by side."""
    D, d_mlp, V, N, H = cfg.d_model, cfg.d_mlp, cfg.vocab_size, cfg.n_heads, cfg.head_dim
    layer = prefix + "h.{i}."
    maps = [
        TensorMap(("embed",), prefix + "wte.weight", (V, D), _identity, _identity),
        TensorMap(("pos_embed",), prefix + "wpe.weight", (cfg.learned_positions, D), _identity, _identity),
        *_norm(("final_norm",), prefix + "ln_f", D, True),
        *_norm(("layers", "attn_norm"), layer + "ln_1", D, True),
        *_norm(("layers", "mlp_norm"), layer + "ln_2", D, True),
        TensorMap(("layers", "attn", "qkv_proj"), layer + "attn.c_attn.weight", (D, 3 * D),
                  lambda w: w.reshape(D, 3, N, H), lambda w: w.reshape(D, 3 * D)),
        TensorMap(("layers", "attn", "qkv_bias"), layer + "attn.c_attn.bias", (3 * D,),
                  lambda b: b.reshape(3, N, H), lambda b: b.reshape(3 * D)),
        TensorMap(("layers", "attn", "o_proj"), layer + "attn.c_proj.weight", (D, D),
                  lambda w: w.reshape(N, H, D), lambda w: w.reshape(D, D)),
        TensorMap(("layers", "attn", "o_bias"), layer + "attn.c_proj.bias", (D,), _identity, _identity),
        TensorMap(("layers", "mlp", "up_proj"), layer + "mlp.c_fc.weight", (D, d_mlp), _identity, _identity),
        TensorMap(("layers", "mlp", "up_bias"), layer + "mlp.c_fc.bias", (d_mlp,), _identity, _identity),
        TensorMap(("layers", "mlp", "down_proj"), layer + "mlp.c_proj.weight", (d_mlp, D), _identity, _identity),
        TensorMap(("layers", "mlp", "down_bias"), layer + "mlp.c_proj.bias", (D,), _identity, _identity),
    ]
    return maps + _untied_head(cfg, "lm_head.weight")


def gpt_neox_keys(cfg: ModelConfig, prefix: str = "gpt_neox.") -> list[TensorMap]:
    """GPT-NeoX / Pythia: query_key_value rows are ordered [head, (q, k, v), head_dim]."""
    D, d_mlp, V, N, H = cfg.d_model, cfg.d_mlp, cfg.vocab_size, cfg.n_heads, cfg.head_dim
    layer = prefix + "layers.{i}."
    maps = [
        TensorMap(("embed",), prefix + "embed_in.weight", (V, D), _identity, _identity),
        *_norm(("final_norm",), prefix + "final_layer_norm", D, True),
        *_norm(("layers", "attn_norm"), layer + "input_layernorm", D, True),
        *_norm(("layers", "mlp_norm"), layer + "post_attention_layernorm", D, True),
        TensorMap(("layers", "attn", "qkv_proj"), layer + "attention.query_key_value.weight", (3 * D, D),
                  lambda w: np.ascontiguousarray(w.reshape(N, 3, H, D).transpose(3, 1, 0, 2)),
                  lambda w: np.ascontiguousarray(w.transpose(2, 1, 3, 0).reshape(3 * D, D))),
        TensorMap(("layers", "attn", "o_proj"), layer + "attention.dense.weight", (D, D), *_split_heads_out(N, H)),
        TensorMap(("layers", "mlp", "up_proj"), layer + "mlp.dense_h_to_4h.weight", (d_mlp, D), _transpose, _transpose),
        TensorMap(("layers", "mlp", "up_bias"), layer + "mlp.dense_h_to_4h.bias", (d_mlp,), _identity, _identity),
        TensorMap(("layers", "mlp", "down_proj"), layer + "mlp.dense_4h_to_h.weight", (D, d_mlp), _transpose,
                  _transpose),
        TensorMap(("layers", "mlp", "down_bias"), layer + "mlp.dense_4h_to_h.bias", (D,), _identity, _identity),
    ]
    if cfg.qkv_bias:
        maps.append(TensorMap(("layers", "attn", "qkv_bias"), layer + "attention.query_key_value.bias", (3 * D,),
                              lambda b: np.ascontiguousarray(b.reshape(N, 3, H).transpose(1, 0, 2)),
                              lambda b: np.ascontiguousarray(b.transpose(1, 0, 2).reshape(3 * D))))
    if cfg.o_bias:
        maps.append(TensorMap(("layers", "attn", "o_bias"), layer + "attention.dense.bias", (D,), _identity, _identity))
    return maps + _untied_head(cfg, "embed_out.weight")


def _prefix(present: set[str] | None, default: str, probe: str) -> str:
    """Checkpoints saved from the bare base model (GPT2Model, GPTNeoXModel) lack the wrapper's prefix."""
    if present is not None and default + probe not in present and probe in present:
        return ""
    return default


def key_table(cfg: ModelConfig, present: set[str] | None = None) -> list[TensorMap]:
    """The key table of `cfg`'s family; `present` (the checkpoint's keys) picks the key prefix variant."""
    if cfg.architecture == "gpt2":
        return gpt2_keys(cfg, _prefix(present, "transformer.", "wte.weight"))
    if cfg.architecture == "gpt_neox":
        return gpt_neox_keys(cfg, _prefix(present, "gpt_neox.", "embed_in.weight"))
    return llama_family_keys(cfg)


def redundant_keys(cfg: ModelConfig, present: set[str] | None = None) -> set[str]:
    """Keys a checkpoint may carry that emojax derives instead of reading: buffers (causal masks, rotary
    frequencies) that old exports saved, and a tied head written out explicitly."""
    keys = {"lm_head.weight"} if cfg.tie_embeddings else set()
    for i in range(cfg.n_layers):
        if cfg.architecture == "gpt2":
            p = _prefix(present, "transformer.", "wte.weight") + f"h.{i}.attn."
            keys |= {p + "bias", p + "masked_bias"}
        elif cfg.architecture == "gpt_neox":
            p = _prefix(present, "gpt_neox.", "embed_in.weight") + f"layers.{i}.attention."
            keys |= {p + "bias", p + "masked_bias", p + "rotary_emb.inv_freq"}
        else:
            keys.add(f"model.layers.{i}.self_attn.rotary_emb.inv_freq")
    return keys
