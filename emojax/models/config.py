"""The frozen model configuration: one decoder, switched by fields rather than subclassed per family."""

from __future__ import annotations

import dataclasses
from typing import Literal

RopeKind = Literal["default", "linear", "llama3"]


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding settings (the Hugging Face `rope_parameters`)."""

    theta: float = 10_000.0
    kind: RopeKind = "default"
    factor: float = 1.0  # linear and llama3 scaling
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position: int = 8192  # llama3


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that determines a decoder's math. Built from a checkpoint's config.json or a preset.

    `layer_windows[l]` is the sliding-window size of layer l (a query attends to itself and the
    `window - 1` keys before it), or 0 for global attention.
    """

    architecture: str  # Hugging Face model_type: llama | mistral | qwen2 | qwen3
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    norm_eps: float = 1e-6
    activation: Literal["silu"] = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    rope: RopeConfig = RopeConfig()
    layer_windows: tuple[int, ...] = ()
    max_position_embeddings: int = 4096

    def __post_init__(self):
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (0,) * self.n_layers)
        if len(self.layer_windows) != self.n_layers:
            raise ValueError(f"layer_windows has {len(self.layer_windows)} entries for {self.n_layers} layers")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @property
    def n_hidden_states(self) -> int:
        """Number of capturable residual-stream positions: the embeddings plus one per layer."""
        return self.n_layers + 1

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        d["rope"] = RopeConfig(**d.get("rope", {}))
        d["layer_windows"] = tuple(d.get("layer_windows", ()))
        return cls(**d)
