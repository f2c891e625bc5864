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
    fraction: float = 1.0  # share of head_dim that is rotated (GPT-NeoX rotary_pct); the rest passes through


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that determines a decoder's math. Built from a checkpoint's config.json or a preset.

    `layer_windows[l]` is the sliding-window size of layer l (a query attends to itself and the
    `window - 1` keys before it), or 0 for global attention. `rope_local`, when set, replaces `rope` on
    sliding-window layers (Gemma 3). `rope=None` means no rotary embedding (GPT-2 learns positions instead).
    """

    architecture: str  # Hugging Face model_type, e.g. llama, qwen3, gemma2, gpt2, gpt_neox
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    norm_eps: float = 1e-6
    norm_kind: Literal["rms", "layer"] = "rms"  # layer = LayerNorm with bias (GPT-2, GPT-NeoX)
    norm_offset: bool = False  # Gemma: scale by (1 + w), in float32
    activation: Literal["silu", "gelu_tanh", "gelu"] = "silu"
    mlp_gated: bool = True  # down(act(gate(x)) * up(x)); False: down(act(up(x)))
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    fused_qkv: bool = False  # one [D, 3, N, H] projection (GPT-2, GPT-NeoX; needs n_kv_heads == n_heads)
    post_norms: bool = False  # Gemma 2/3: norms on the attention and MLP outputs too
    parallel_residual: bool = False  # GPT-NeoX: x + attn(norm1(x)) + mlp(norm2(x))
    embed_scale: bool = False  # Gemma: embeddings times sqrt(d_model), in the activation dtype
    learned_positions: int = 0  # size of a learned position table (GPT-2); 0 for none
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None  # Gemma 2: cap * tanh(scores / cap)
    final_softcap: float | None = None
    tie_embeddings: bool = False
    rope: RopeConfig | None = RopeConfig()
    rope_local: RopeConfig | None = None
    layer_windows: tuple[int, ...] = ()
    max_position_embeddings: int = 4096

    def __post_init__(self):
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (0,) * self.n_layers)
        if len(self.layer_windows) != self.n_layers:
            raise ValueError(f"layer_windows has {len(self.layer_windows)} entries for {self.n_layers} layers")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.fused_qkv and self.n_kv_heads != self.n_heads:
            raise ValueError("fused_qkv needs n_kv_heads == n_heads")

    @property
    def query_scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim ** -0.5

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
        for key in ("rope", "rope_local"):
            if d.get(key) is not None:
                d[key] = RopeConfig(**d[key])
        d["layer_windows"] = tuple(d.get("layer_windows", ()))
        return cls(**d)
