"""Named model shapes. `load_model("random:NAME")` builds one with random weights (benchmarks, demos, tests)."""

from __future__ import annotations

from emojax.models.config import ModelConfig, RopeConfig

SHAPES: dict[str, ModelConfig] = {
    # A few-layer model for smoke tests.
    "tiny": ModelConfig(architecture="llama", vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        head_dim=16, d_mlp=128),
    # The CPU performance anchor of DESIGN.md (~56M parameters).
    "llama-56m": ModelConfig(architecture="llama", vocab_size=32_000, d_model=512, n_layers=8, n_heads=8,
                             n_kv_heads=4, head_dim=64, d_mlp=1376, norm_eps=1e-5),
    # The GPU performance anchor: TinyLlama-1.1B's shape.
    "tinyllama-1.1b": ModelConfig(architecture="llama", vocab_size=32_000, d_model=2048, n_layers=22,
                                  n_heads=32, n_kv_heads=4, head_dim=64, d_mlp=5632, norm_eps=1e-5,
                                  max_position_embeddings=2048),
    # Llama-3.1-8B, for abstract (eval_shape) checks and cluster configs.
    "llama-3.1-8b": ModelConfig(architecture="llama", vocab_size=128_256, d_model=4096, n_layers=32, n_heads=32,
                                n_kv_heads=8, head_dim=128, d_mlp=14_336, norm_eps=1e-5,
                                rope=RopeConfig(theta=500_000.0, kind="llama3", factor=8.0, low_freq_factor=1.0,
                                                high_freq_factor=4.0, original_max_position=8192),
                                max_position_embeddings=131_072),
}

RANDOM_PREFIX = "random:"


def preset_names() -> list[str]:
    return [RANDOM_PREFIX + name for name in SHAPES]
