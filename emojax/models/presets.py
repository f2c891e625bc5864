"""Named model shapes. `load_model("random:NAME")` builds one with random weights (benchmarks, demos, tests)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from emojax.errors import CheckpointError
from emojax.models.config import ModelConfig, RopeConfig
from emojax.models.hf_config import config_from_hf_dict

# Published configs of well-known checkpoints (their config.json, trimmed to what changes the math), parsed
# by the same strict reader as a checkpoint directory.
_HF_CONFIGS = {
    "gemma-2-2b": {
        "model_type": "gemma2", "vocab_size": 256_000, "hidden_size": 2304, "num_hidden_layers": 26,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "intermediate_size": 9216,
        "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256, "sliding_window": 4096,
        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-6,
        "rope_theta": 10_000.0, "max_position_embeddings": 8192,
    },
    "pythia-1.4b": {
        "model_type": "gpt_neox", "vocab_size": 50_304, "hidden_size": 2048, "num_hidden_layers": 24,
        "num_attention_heads": 16, "intermediate_size": 8192, "hidden_act": "gelu", "rotary_pct": 0.25,
        "rotary_emb_base": 10_000, "use_parallel_residual": True, "layer_norm_eps": 1e-5,
        "max_position_embeddings": 2048, "tie_word_embeddings": False,
    },
    "gpt2": {
        "model_type": "gpt2", "vocab_size": 50_257, "n_embd": 768, "n_layer": 12, "n_head": 12,
        "n_positions": 1024, "n_ctx": 1024, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
    },
}

SHAPES: dict[str, ModelConfig] = {
    # A few-layer model for smoke tests.
    "tiny": ModelConfig(architecture="llama", vocab_size=258, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
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
SHAPES.update({name: config_from_hf_dict(raw, source=f"preset {name}") for name, raw in _HF_CONFIGS.items()})

RANDOM_PREFIX = "random:"


# Trained presets: name -> emojax.train preset (trained on the built-in corpus on first use, then cached).
BUILTIN_NAMES = {"builtin": "default", "builtin:tiny": "tiny"}
_BUILTIN_RESOLVERS: list[Callable[[str], Path]] = []  # emojax.train registers the one that trains and caches


def register_builtin(resolve: Callable[[str], Path]) -> None:
    """Sets how a built-in preset (its emojax.train preset name) becomes a checkpoint folder. emojax.train registers
    itself on import (`import emojax` imports it), so models never imports train."""
    _BUILTIN_RESOLVERS[:] = [resolve]


def resolve_builtin(name: str) -> Path:
    """The checkpoint folder of built-in preset `name` ("builtin", "builtin:tiny"): trained on first use."""
    if not _BUILTIN_RESOLVERS:
        raise CheckpointError(f"{name}: no trainer is registered for built-in models (import emojax)")
    return _BUILTIN_RESOLVERS[0](BUILTIN_NAMES[name])


def preset_names() -> list[str]:
    return [*BUILTIN_NAMES, *(RANDOM_PREFIX + name for name in SHAPES)]
