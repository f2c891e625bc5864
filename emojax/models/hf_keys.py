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


def llama_family_keys(cfg: ModelConfig) -> list[TensorMap]:
    """Key table of the Llama family (llama, mistral, qwen2, qwen3)."""
    D, F, V = cfg.d_model, cfg.d_mlp, cfg.vocab_size
    N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    layer = "model.layers.{i}."
    maps = [
        TensorMap(("embed",), "model.embed_tokens.weight", (V, D), _identity, _identity),
        TensorMap(("final_norm", "scale"), "model.norm.weight", (D,), _identity, _identity),
        TensorMap(("layers", "attn_norm", "scale"), layer + "input_layernorm.weight", (D,), _identity, _identity),
        TensorMap(("layers", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight", (D,),
                  _identity, _identity),
        TensorMap(("layers", "attn", "q_proj"), layer + "self_attn.q_proj.weight", (N * H, D), *_split_heads_in(N, H)),
        TensorMap(("layers", "attn", "k_proj"), layer + "self_attn.k_proj.weight", (K * H, D), *_split_heads_in(K, H)),
        TensorMap(("layers", "attn", "v_proj"), layer + "self_attn.v_proj.weight", (K * H, D), *_split_heads_in(K, H)),
        TensorMap(("layers", "attn", "o_proj"), layer + "self_attn.o_proj.weight", (D, N * H), *_split_heads_out(N, H)),
        TensorMap(("layers", "mlp", "gate_proj"), layer + "mlp.gate_proj.weight", (F, D), _transpose, _transpose),
        TensorMap(("layers", "mlp", "up_proj"), layer + "mlp.up_proj.weight", (F, D), _transpose, _transpose),
        TensorMap(("layers", "mlp", "down_proj"), layer + "mlp.down_proj.weight", (D, F), _transpose, _transpose),
    ]
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
        for name, size in (("gate", F), ("up", F), ("down", D)):
            maps.append(TensorMap(("layers", "mlp", f"{name}_bias"), layer + f"mlp.{name}_proj.bias", (size,),
                                  _identity, _identity))
    if not cfg.tie_embeddings:
        maps.append(TensorMap(("lm_head",), "lm_head.weight", (V, D), _transpose, _transpose))
    return maps


def key_table(cfg: ModelConfig) -> list[TensorMap]:
    return llama_family_keys(cfg)


def redundant_keys(cfg: ModelConfig) -> set[str]:
    """Keys a checkpoint may carry that emojax derives instead of reading (checked for shape, then skipped)."""
    keys = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(cfg.n_layers)}
    if cfg.tie_embeddings:
        keys.add("lm_head.weight")  # some exports write the tied head out explicitly
    return keys
