"""Strict translation of a Hugging Face config.json into a `ModelConfig`.

Every key of config.json is either read by the family's parser (it feeds a `ModelConfig` field or is checked
to hold the one value emojax implements), known to leave the forward pass unchanged (bookkeeping, dropout,
generation settings), or an error: a key that may change the math and that emojax does not implement is
never dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from emojax.errors import CheckpointError, ConfigError
from emojax.models.config import ModelConfig, RopeConfig

# Keys that never change a decoder's forward pass in inference.
_BOOKKEEPING_KEYS = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
    "id2label", "label2id", "problem_type", "return_dict", "output_attentions", "output_hidden_states",
    "chunk_size_feed_forward", "is_encoder_decoder", "tokenizer_class", "bos_token_id", "eos_token_id",
    "pad_token_id", "initializer_range", "use_cache", "torchscript", "pruned_heads", "max_length",
    "use_return_dict", "tie_encoder_decoder", "finetuning_task", "prefix", "task_specific_params",
    "sep_token_id", "decoder_start_token_id", "cache_implementation",
    # dropout is off in inference
    "attention_dropout", "hidden_dropout", "attn_pdrop", "embd_pdrop", "resid_pdrop", "classifier_dropout",
    "summary_first_dropout",
    # sequence-classification heads emojax never builds
    "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
    # tensor-parallel slicing used in pretraining: numerically the same matmul
    "pretraining_tp",
})

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "gelu": "gelu"}


class _Reader:
    """Reads config.json keys for one family and remembers which it read."""

    def __init__(self, raw: dict[str, Any], source: str):
        self.raw, self.source, self.read = raw, source, set()

    def get(self, key: str, default=None):
        self.read.add(key)
        value = self.raw.get(key)
        return default if value is None else value

    def need(self, key: str):
        value = self.get(key)
        if value is None:
            raise CheckpointError(f"{self.source}: required key {key!r} is missing")
        return value

    def expect(self, key: str, allowed: tuple, default=None) -> None:
        """A key emojax implements for these values only (e.g. GPT-2's scale_attn_weights must be true)."""
        value = self.get(key, default)
        if value not in allowed:
            raise CheckpointError(
                f"{self.source}: {key}={value!r} is not supported (emojax implements {key} in {list(allowed)})"
            )

    def activation(self, key: str, default: str | None = None, ignored: tuple[str, ...] = ()) -> str:
        """The activation named by `key`; `ignored` are alias keys transformers no longer reads."""
        self.read.update(ignored)
        name = self.get(key, default)
        if name not in _ACTIVATIONS:
            raise CheckpointError(
                f"{self.source}: {key}={name!r} is not supported (supported: {sorted(_ACTIVATIONS)})"
            )
        return _ACTIVATIONS[name]

    def finish(self, model_type: str) -> None:
        unhandled = sorted(k for k in self.raw if k not in self.read and k not in _BOOKKEEPING_KEYS)
        if unhandled:
            raise CheckpointError(
                f"{self.source}: config key(s) {unhandled} may change the model's math and emojax does not "
                f"implement them for model_type {model_type!r}; refusing to load a model that would differ "
                "from transformers."
            )


def read_hf_config(checkpoint_dir: Path) -> ModelConfig:
    """Reads `checkpoint_dir/config.json` into a ModelConfig, refusing anything emojax cannot reproduce."""
    return config_from_hf_dict(read_config_json(checkpoint_dir), source=str(Path(checkpoint_dir) / "config.json"))


def read_config_json(checkpoint_dir: Path) -> dict[str, Any]:
    """The raw config.json of a checkpoint directory."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{checkpoint_dir}: no config.json. A model directory needs config.json and *.safetensors "
            "(as written by transformers' save_pretrained)."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def config_from_hf_dict(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type not in _PARSERS:
        raise CheckpointError(
            f"{source}: unknown architecture model_type={model_type!r} "
            f"(architectures={raw.get('architectures')}). Supported: {', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    r = _Reader(raw, source)
    config = _PARSERS[model_type](r, model_type)
    r.finish(model_type)
    return config


def _rope(r: _Reader, params: dict[str, Any] | None, legacy_theta: float | None = None) -> RopeConfig:
    """One rope_parameters dict (or the transformers < 5 rope_scaling dict) as a RopeConfig."""
    params = dict(params or {})
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta") or legacy_theta or 10_000.0)
    fraction = float(params.get("partial_rotary_factor", 1.0))
    if kind == "default":
        return RopeConfig(theta=theta, fraction=fraction)
    if kind == "linear":
        return RopeConfig(theta=theta, kind="linear", factor=float(params["factor"]), fraction=fraction)
    if kind == "llama3":
        try:
            return RopeConfig(
                theta=theta, kind="llama3", factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position=int(
                    params.get("original_max_position_embeddings") or r.get("max_position_embeddings", 8192)
                ),
                fraction=fraction,
            )
        except KeyError as e:
            raise CheckpointError(f"{r.source}: llama3 rope scaling is missing {e.args[0]!r}") from None
    raise CheckpointError(f"{r.source}: rope type {kind!r} is not supported (supported: default, linear, llama3)")


def _global_rope(r: _Reader) -> RopeConfig:
    params = r.get("rope_parameters")
    legacy_theta = r.get("rope_theta")
    if params is None:  # transformers < 5: rope_theta plus an optional rope_scaling dict
        params = r.get("rope_scaling")
    if params and any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"{r.source}: per-layer-type rope_parameters are not supported for this family")
    return _rope(r, params, legacy_theta)


def _windows_from_layer_types(r: _Reader, n_layers: int, window: int | None,
                              default_types: Callable[[int], str]) -> tuple[int, ...]:
    layer_types = r.get("layer_types") or [default_types(i) for i in range(n_layers)]
    if len(layer_types) != n_layers:
        raise CheckpointError(f"{r.source}: layer_types has {len(layer_types)} entries for {n_layers} layers")
    windows = []
    for i, kind in enumerate(layer_types):
        if kind == "full_attention":
            windows.append(0)
        elif kind == "sliding_attention":
            if not window:
                raise CheckpointError(f"{r.source}: layer {i} is sliding_attention but sliding_window is unset")
            windows.append(int(window))
        else:
            raise CheckpointError(f"{r.source}: layer_types[{i}]={kind!r} is not supported")
    return tuple(windows)


def _decoder_sizes(r: _Reader) -> dict[str, Any]:
    n_heads = int(r.need("num_attention_heads"))
    d_model = int(r.need("hidden_size"))
    return dict(
        vocab_size=int(r.need("vocab_size")), d_model=d_model, n_layers=int(r.need("num_hidden_layers")),
        n_heads=n_heads, n_kv_heads=int(r.get("num_key_value_heads") or n_heads),
        head_dim=int(r.get("head_dim") or d_model // n_heads), d_mlp=int(r.need("intermediate_size")),
        max_position_embeddings=int(r.get("max_position_embeddings", 4096)),
    )


def _llama_family(r: _Reader, model_type: str) -> ModelConfig:
    sizes = _decoder_sizes(r)
    n_layers = sizes["n_layers"]
    attention_bias = bool(r.get("attention_bias", False)) if model_type in ("llama", "qwen3") else False
    window = r.get("sliding_window")
    if model_type == "mistral":
        windows = (int(window or 0),) * n_layers
    elif model_type in ("qwen2", "qwen3"):
        if not r.get("use_sliding_window", False):
            window = None
        first_sliding = int(r.get("max_window_layers", n_layers))
        windows = _windows_from_layer_types(
            r, n_layers, window,
            lambda i: "sliding_attention" if window is not None and i >= first_sliding else "full_attention",
        )
    else:
        windows = (0,) * n_layers
    return ModelConfig(
        architecture=model_type, **sizes,
        norm_eps=float(r.get("rms_norm_eps", 1e-6)),
        activation=r.activation("hidden_act", "silu"),
        # Llama's and Qwen3's attention_bias covers q/k/v and o; Qwen2 always has q/k/v biases and no o bias.
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(r.get("mlp_bias", False)) if model_type == "llama" else False,
        qk_norm=model_type == "qwen3",
        tie_embeddings=bool(r.get("tie_word_embeddings", False)),
        rope=_global_rope(r),
        layer_windows=windows,
    )


def _gemma_family(r: _Reader, model_type: str) -> ModelConfig:
    sizes = _decoder_sizes(r)
    n_layers = sizes["n_layers"]
    r.expect("use_bidirectional_attention", (None, False))
    attention_bias = bool(r.get("attention_bias", False))
    common = dict(
        architecture=model_type, **sizes,
        norm_eps=float(r.get("rms_norm_eps", 1e-6)), norm_offset=True, embed_scale=True,
        qkv_bias=attention_bias, o_bias=attention_bias,
        tie_embeddings=bool(r.get("tie_word_embeddings", True)),
    )
    if model_type == "gemma":
        # transformers reads hidden_act only, and takes the legacy "gelu" to mean the tanh approximation.
        r.get("hidden_activation")  # ignored by transformers for Gemma 1
        activation = "gelu_tanh" if r.get("hidden_act") == "gelu" else r.activation("hidden_act", "gelu_pytorch_tanh")
        return ModelConfig(**common, activation=activation, rope=_global_rope(r))
    activation = r.activation("hidden_activation", "gelu_pytorch_tanh", ignored=("hidden_act",))
    window = r.get("sliding_window")
    softcaps = dict(attn_softcap=r.get("attn_logit_softcapping"), final_softcap=r.get("final_logit_softcapping"))
    attn_scale = float(r.need("query_pre_attn_scalar")) ** -0.5
    if model_type == "gemma2":
        windows = _windows_from_layer_types(
            r, n_layers, window, lambda i: "sliding_attention" if (i + 1) % 2 else "full_attention")
        return ModelConfig(**common, activation=activation, post_norms=True, attn_scale=attn_scale, rope=_global_rope(r), layer_windows=windows, **softcaps)
    pattern_keys = (r.get("sliding_window_pattern"), r.get("_sliding_window_pattern"))
    pattern = int(next((p for p in pattern_keys if p), 6))
    windows = _windows_from_layer_types(
        r, n_layers, window, lambda i: "full_attention" if (i + 1) % pattern == 0 else "sliding_attention")
    params = r.get("rope_parameters")
    if params and "full_attention" in params:
        rope, rope_local = _rope(r, params["full_attention"]), _rope(r, params.get("sliding_attention"))
    else:  # transformers < 5: global theta and scaling, plus a separate local base frequency
        rope = _rope(r, params or r.get("rope_scaling"), r.get("rope_theta", 1_000_000.0))
        rope_local = RopeConfig(theta=float(r.get("rope_local_base_freq", 10_000.0)))
    return ModelConfig(**common, activation=activation, post_norms=True, qk_norm=True, attn_scale=attn_scale, rope=rope, rope_local=rope_local,
                       layer_windows=windows, **softcaps)


def _gpt2(r: _Reader, model_type: str) -> ModelConfig:
    r.expect("scale_attn_weights", (True,), default=True)
    r.expect("scale_attn_by_inverse_layer_idx", (False,), default=False)
    r.expect("reorder_and_upcast_attn", (False,), default=False)
    r.expect("add_cross_attention", (False,), default=False)
    r.expect("is_decoder", (False, True), default=False)
    d_model, n_heads = int(r.need("n_embd")), int(r.need("n_head"))
    n_positions = int(r.need("n_positions"))
    r.get("n_ctx")  # legacy alias of n_positions
    return ModelConfig(
        architecture=model_type, vocab_size=int(r.need("vocab_size")), d_model=d_model,
        n_layers=int(r.need("n_layer")), n_heads=n_heads, n_kv_heads=n_heads, head_dim=d_model // n_heads,
        d_mlp=int(r.get("n_inner") or 4 * d_model), norm_eps=float(r.get("layer_norm_epsilon", 1e-5)),
        norm_kind="layer", activation=r.activation("activation_function", "gelu_new"), mlp_gated=False,
        qkv_bias=True, o_bias=True, mlp_bias=True, fused_qkv=True, learned_positions=n_positions,
        tie_embeddings=bool(r.get("tie_word_embeddings", True)), rope=None, max_position_embeddings=n_positions,
    )


def _gpt_neox(r: _Reader, model_type: str) -> ModelConfig:
    sizes = _decoder_sizes(r)
    r.expect("is_decoder", (False, True), default=False)
    params = r.get("rope_parameters")
    if params is None:  # transformers < 5
        params = dict(r.get("rope_scaling") or {})
        params.setdefault("rope_theta", r.get("rotary_emb_base", 10_000.0))
        params.setdefault("partial_rotary_factor", r.get("rotary_pct", 1.0))
    else:
        r.get("rotary_pct")
        r.get("rotary_emb_base")
    bias = bool(r.get("attention_bias", True))
    return ModelConfig(
        architecture=model_type, **sizes, norm_eps=float(r.get("layer_norm_eps", 1e-5)), norm_kind="layer",
        activation=r.activation("hidden_act", "gelu"), mlp_gated=False, qkv_bias=bias, o_bias=bias, mlp_bias=True,
        fused_qkv=True, parallel_residual=bool(r.get("use_parallel_residual", True)),
        tie_embeddings=bool(r.get("tie_word_embeddings", False)), rope=_rope(r, params),
    )


_PARSERS: dict[str, Callable[[_Reader, str], ModelConfig]] = {
    "llama": _llama_family, "mistral": _llama_family, "qwen2": _llama_family, "qwen3": _llama_family,
    "gemma": _gemma_family, "gemma2": _gemma_family, "gemma3_text": _gemma_family,
    "gpt2": _gpt2, "gpt_neox": _gpt_neox,
}
SUPPORTED_ARCHITECTURES = tuple(sorted(_PARSERS))

_HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}


def config_to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json that transformers (and `read_hf_config`) reads back as the same model.

    Written for the Llama family (the shapes emojax creates itself); a model loaded from a checkpoint is
    saved with its original config.json instead.
    """
    if cfg.architecture not in _HF_CLASSES:
        raise ConfigError(f"writing a new config.json is implemented for {sorted(_HF_CLASSES)}, not "
                          f"{cfg.architecture!r} (models loaded from a checkpoint keep their own config.json)")
    if cfg.architecture in ("llama", "qwen3") and cfg.qkv_bias != cfg.o_bias:
        raise ValueError(f"{cfg.architecture} ties q/k/v and o biases (attention_bias); cannot export {cfg}")
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
