"""The frozen model configuration: one decoder, switched by fields rather than subclassed per family."""

from __future__ import annotations

import dataclasses
from typing import Literal

from emojax.config_loader import non_negative, positive, range_violations, ranged

RopeKind = Literal["default", "linear", "llama3"]


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding settings (the Hugging Face `rope_parameters`)."""

    theta: float = positive(10_000.0)
    kind: RopeKind = "default"
    factor: float = positive(1.0)  # linear and llama3 scaling
    low_freq_factor: float = positive(1.0)  # llama3
    high_freq_factor: float = positive(4.0)  # llama3
    original_max_position: int = positive(8192)  # llama3
    # share of head_dim that is rotated (GPT-NeoX rotary_pct); the rest passes through
    fraction: float = ranged(1.0, 0, 1, lo_open=True)

    def __post_init__(self):
        problems = range_violations(self)
        if self.kind == "llama3" and not problems and self.high_freq_factor <= self.low_freq_factor:
            problems.append(f"llama3 needs high_freq_factor > low_freq_factor, got {self.high_freq_factor} <= "
                            f"{self.low_freq_factor}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that determines a decoder's math. Built from a checkpoint's config.json or a preset.

    `layer_windows[l]` is the sliding-window size of layer l (a query attends to itself and the
    `window - 1` keys before it), or 0 for global attention. `rope_local`, when set, replaces `rope` on
    sliding-window layers (Gemma 3). `rope=None` means no rotary embedding (GPT-2 learns positions instead).
    """

    architecture: str  # Hugging Face model_type, e.g. llama, qwen3, gemma2, gpt2, gpt_neox
    vocab_size: int = positive()
    d_model: int = positive()
    n_layers: int = positive()
    n_heads: int = positive()
    n_kv_heads: int = positive()
    head_dim: int = positive()
    d_mlp: int = positive()
    norm_eps: float = non_negative(1e-6)
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
    learned_positions: int = non_negative(0)  # size of a learned position table (GPT-2); 0 for none
    attn_scale: float | None = positive(None)  # None: head_dim ** -0.5
    attn_softcap: float | None = positive(None)  # Gemma 2: cap * tanh(scores / cap)
    final_softcap: float | None = positive(None)
    tie_embeddings: bool = False
    rope: RopeConfig | None = RopeConfig()
    rope_local: RopeConfig | None = None
    layer_windows: tuple[int, ...] = non_negative(())
    max_position_embeddings: int = positive(4096)

    @property
    def position_limit(self) -> tuple[int, str]:
        """The longest sequence the model takes, and the config.json key that sets it: a learned position table
        (GPT-2's n_positions) has no rows past it; a RoPE model (max_position_embeddings) was never trained
        past it. The corpus, the dump and decoding all check against this one limit."""
        if self.learned_positions:
            return self.learned_positions, "n_positions"
        return self.max_position_embeddings, "max_position_embeddings"

    def __post_init__(self):
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (0,) * self.n_layers)
        problems = range_violations(self)
        if problems:  # before the checks below, which divide by head counts
            raise ValueError("; ".join(problems))
        if len(self.layer_windows) != self.n_layers:
            raise ValueError(f"layer_windows has {len(self.layer_windows)} entries for {self.n_layers} layers")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.fused_qkv and self.n_kv_heads != self.n_heads:
            raise ValueError("fused_qkv needs n_kv_heads == n_heads")

    @property
    def query_scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim ** -0.5

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
