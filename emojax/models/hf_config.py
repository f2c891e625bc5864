"""Strict translation of a Hugging Face config.json into a `ModelConfig`.

Every key of config.json is either handled (it feeds a `ModelConfig` field), known to leave the forward pass
unchanged (bookkeeping, training-only or generation settings), or an error: a key that may change the math
and that emojax does not implement must never be dropped silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from emojax.errors import CheckpointError
from emojax.models.config import ModelConfig, RopeConfig

# Keys that never change a decoder's forward pass in inference.
_BOOKKEEPING_KEYS = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
    "id2label", "label2id", "problem_type", "return_dict", "output_attentions", "output_hidden_states",
    "chunk_size_feed_forward", "is_encoder_decoder", "tokenizer_class", "bos_token_id", "eos_token_id",
    "pad_token_id", "initializer_range", "use_cache", "attention_dropout", "torchscript", "pruned_heads",
    "max_length", "use_return_dict", "tie_encoder_decoder", "is_decoder", "add_cross_attention",
    "finetuning_task", "prefix", "task_specific_params", "sep_token_id", "decoder_start_token_id",
    # Tensor-parallel slicing used during pretraining; numerically the same matmul.
    "pretraining_tp",
})

_COMMON_KEYS = frozenset({
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "intermediate_size", "rms_norm_eps", "hidden_act", "tie_word_embeddings",
    "rope_parameters", "rope_theta", "rope_scaling", "max_position_embeddings",
})

_FAMILY_KEYS = {
    "llama": frozenset({"attention_bias", "mlp_bias"}),
    "mistral": frozenset({"sliding_window"}),
    "qwen2": frozenset({"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}),
    "qwen3": frozenset({"use_sliding_window", "sliding_window", "max_window_layers", "layer_types",
                        "attention_bias"}),
}

SUPPORTED_ARCHITECTURES = tuple(sorted(_FAMILY_KEYS))


def read_hf_config(checkpoint_dir: Path) -> ModelConfig:
    """Reads `checkpoint_dir/config.json` into a ModelConfig, refusing anything emojax cannot reproduce."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{checkpoint_dir}: no config.json. A model directory needs config.json and *.safetensors "
            "(as written by transformers' save_pretrained)."
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return config_from_hf_dict(raw, source=str(path))


def config_from_hf_dict(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type not in _FAMILY_KEYS:
        raise CheckpointError(
            f"{source}: unknown architecture model_type={model_type!r} "
            f"(architectures={raw.get('architectures')}). Supported: {', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    handled = _COMMON_KEYS | _FAMILY_KEYS[model_type]
    unhandled = sorted(k for k in raw if k not in handled and k not in _BOOKKEEPING_KEYS)
    if unhandled:
        raise CheckpointError(
            f"{source}: config key(s) {unhandled} may change the model's math and emojax does not implement "
            f"them for model_type {model_type!r}; refusing to load a model that would differ from transformers."
        )

    def need(key: str):
        if raw.get(key) is None:
            raise CheckpointError(f"{source}: required key {key!r} is missing")
        return raw[key]

    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(
            f"{source}: hidden_act={raw['hidden_act']!r} is not supported for {model_type} (only 'silu')"
        )
    n_layers = int(need("num_hidden_layers"))
    n_heads = int(need("num_attention_heads"))
    d_model = int(need("hidden_size"))
    attention_bias = bool(raw.get("attention_bias", False))
    qkv_bias = {"qwen2": True}.get(model_type, attention_bias)
    # Qwen3's q/k/v/o biases and Llama's all follow attention_bias; Qwen2 has q/k/v biases only.
    o_bias = attention_bias if model_type in ("llama", "qwen3") else False
    return ModelConfig(
        architecture=model_type,
        vocab_size=int(need("vocab_size")),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(raw.get("num_key_value_heads") or n_heads),
        head_dim=int(raw.get("head_dim") or d_model // n_heads),
        d_mlp=int(need("intermediate_size")),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        rope=_rope_config(raw, source),
        layer_windows=_layer_windows(raw, model_type, n_layers, source),
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
    )


def _rope_config(raw: dict[str, Any], source: str) -> RopeConfig:
    params = raw.get("rope_parameters")
    if params is None:  # transformers < 5 layout: rope_theta plus an optional rope_scaling dict
        params = dict(raw.get("rope_scaling") or {})
        params.setdefault("rope_theta", raw.get("rope_theta", 10_000.0))
    if any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"{source}: per-layer-type rope_parameters are not supported for this family")
    kind = params.get("rope_type", params.get("type", "default"))
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(f"{source}: partial_rotary_factor != 1 is not supported for this family")
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10_000.0)))
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        try:
            return RopeConfig(
                theta=theta, kind="llama3", factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position=int(
                    params.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))
                ),
            )
        except KeyError as e:
            raise CheckpointError(f"{source}: llama3 rope scaling is missing {e.args[0]!r}") from None
    raise CheckpointError(
        f"{source}: rope type {kind!r} is not supported (supported: default, linear, llama3)"
    )


def _layer_windows(raw: dict[str, Any], model_type: str, n_layers: int, source: str) -> tuple[int, ...]:
    window = raw.get("sliding_window")
    if model_type == "mistral":
        return (int(window or 0),) * n_layers
    if model_type in ("qwen2", "qwen3"):
        if not raw.get("use_sliding_window", False):
            window = None
        layer_types = raw.get("layer_types")
        if layer_types is None:
            first_sliding = int(raw.get("max_window_layers", n_layers))
            layer_types = [
                "sliding_attention" if window is not None and i >= first_sliding else "full_attention"
                for i in range(n_layers)
            ]
        if len(layer_types) != n_layers:
            raise CheckpointError(f"{source}: layer_types has {len(layer_types)} entries for {n_layers} layers")
        windows = []
        for i, kind in enumerate(layer_types):
            if kind == "full_attention":
                windows.append(0)
            elif kind == "sliding_attention":
                if not window:
                    raise CheckpointError(f"{source}: layer {i} is sliding_attention but sliding_window is unset")
                windows.append(int(window))
            else:
                raise CheckpointError(f"{source}: layer_types[{i}]={kind!r} is not supported")
        return tuple(windows)
    return (0,) * n_layers


_HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}


def config_to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json that transformers (and `read_hf_config`) reads back as the same model."""
    rope: dict[str, Any] = {"rope_type": cfg.rope.kind, "rope_theta": cfg.rope.theta}
    if cfg.rope.kind == "linear":
        rope["factor"] = cfg.rope.factor
    elif cfg.rope.kind == "llama3":
        rope.update(factor=cfg.rope.factor, low_freq_factor=cfg.rope.low_freq_factor,
                    high_freq_factor=cfg.rope.high_freq_factor,
                    original_max_position_embeddings=cfg.rope.original_max_position)
    out: dict[str, Any] = {
        "architectures": [_HF_CLASSES[cfg.architecture]],
        "model_type": cfg.architecture,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_mlp,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": cfg.activation,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope,
        "max_position_embeddings": cfg.max_position_embeddings,
    }
    windows = set(cfg.layer_windows) - {0}
    if cfg.architecture in ("llama", "qwen3") and cfg.qkv_bias != cfg.o_bias:
        raise ValueError(f"{cfg.architecture} ties q/k/v and o biases (attention_bias); cannot export {cfg}")
    if cfg.architecture == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif cfg.architecture == "mistral":
        out["sliding_window"] = windows.pop() if windows else None
    else:
        out.update(
            use_sliding_window=bool(windows), sliding_window=windows.pop() if windows else None,
            layer_types=["sliding_attention" if w else "full_attention" for w in cfg.layer_windows],
        )
        if cfg.architecture == "qwen3":
            out["attention_bias"] = cfg.qkv_bias
    return out
