"""Strict translation of a Hugging Face config.json into a `ModelConfig`.

Every key of config.json is either read by the family's parser (it feeds a `ModelConfig` field or is checked
to hold the one value emojax implements), known to leave the forward pass unchanged (bookkeeping, dropout,
generation settings), or an error: a key that may change the math and that emojax does not implement is
never dropped silently.
"""

from __future__ import annotations

import json
import math
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


_REQUIRED = object()


def _whole(source: str, key: str, value, minimum: int = 1) -> int:
    """A count or size from config.json: a whole JSON number >= minimum (never 2.7 -> 2, "big", or true)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()):
        raise CheckpointError(f"{source}: {key}={value!r} must be a whole number; fix or re-export config.json")
    if value < minimum:
        raise CheckpointError(f"{source}: {key}={value!r} must be >= {minimum}; fix or re-export config.json")
    return int(value)


def _real(source: str, key: str, value, positive: bool = True) -> float:
    """A finite JSON number, > 0 (or >= 0 when not `positive`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{source}: {key}={value!r} must be a finite number; fix or re-export config.json")
    if value < 0 or (positive and value == 0):
        raise CheckpointError(f"{source}: {key}={value!r} must be {'> 0' if positive else '>= 0'}; fix or "
                              "re-export config.json")
    return float(value)


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

    def size(self, key: str, default=_REQUIRED, minimum: int = 1):
        """A whole number >= minimum; absent (or null): `default` as given, or an error when required."""
        value = self.need(key) if default is _REQUIRED else self.get(key)
        return default if value is None else _whole(self.source, key, value, minimum)

    def number(self, key: str, default=_REQUIRED, positive: bool = True):
        """A finite number (> 0, or >= 0); absent (or null): `default` as given, or an error when required."""
        value = self.need(key) if default is _REQUIRED else self.get(key)
        return default if value is None else _real(self.source, key, value, positive)

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):  # bool("false") is True
            raise CheckpointError(f"{self.source}: {key}={value!r} must be true or false")
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
        if not isinstance(name, str) or name not in _ACTIVATIONS:
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
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object of settings, got {type(raw).__name__}")
    return raw


def config_from_hf_dict(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in _PARSERS:
        raise CheckpointError(
            f"{source}: unknown architecture model_type={model_type!r} "
            f"(architectures={raw.get('architectures')}). Supported: {', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    r = _Reader(raw, source)
    try:
        config = _PARSERS[model_type](r, model_type)
    except ValueError as e:  # ModelConfig's own checks, for combinations the family parser does not name
        raise CheckpointError(f"{source}: {e}") from None
    r.finish(model_type)
    return config


def _rope(r: _Reader, params: dict[str, Any] | None, legacy_theta: float | None = None,
          where: str = "rope_parameters") -> RopeConfig:
    """One rope_parameters dict (or the transformers < 5 rope_scaling dict, named by `where`) as a RopeConfig."""
    if params is not None and not isinstance(params, dict):
        raise CheckpointError(f"{r.source}: {where}={params!r} must be a mapping")
    params = dict(params or {})

    def number(name: str, default=_REQUIRED, positive: bool = True) -> float:
        if params.get(name) is None:
            if default is _REQUIRED:
                raise CheckpointError(f"{r.source}: {where} ({kind} rope scaling) is missing {name!r}")
            return default
        return _real(r.source, f"{where}.{name}", params[name], positive)

    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("rope_theta") is None and legacy_theta is not None:
        theta = _real(r.source, "rope_theta", legacy_theta)
    else:
        theta = number("rope_theta", 10_000.0)
    fraction = number("partial_rotary_factor", 1.0)
    if fraction > 1:
        raise CheckpointError(f"{r.source}: {where}.partial_rotary_factor={fraction} must be in (0, 1]")
    if kind == "default":
        return RopeConfig(theta=theta, fraction=fraction)
    if kind == "linear":
        return RopeConfig(theta=theta, kind="linear", factor=number("factor"), fraction=fraction)
    if kind == "llama3":
        original = params.get("original_max_position_embeddings")
        original = (_whole(r.source, f"{where}.original_max_position_embeddings", original) if original is not None
                    else r.size("max_position_embeddings", 8192))
        low, high = number("low_freq_factor"), number("high_freq_factor")
        if high <= low:
            raise CheckpointError(f"{r.source}: {where}.high_freq_factor={high} must be above "
                                  f"low_freq_factor={low} (llama3 rope scaling divides by their difference)")
        return RopeConfig(theta=theta, kind="llama3", factor=number("factor"), low_freq_factor=low,
                          high_freq_factor=high, original_max_position=original, fraction=fraction)
    raise CheckpointError(f"{r.source}: rope type {kind!r} is not supported (supported: default, linear, llama3)")


def _global_rope(r: _Reader) -> RopeConfig:
    params, where = r.get("rope_parameters"), "rope_parameters"
    legacy_theta = r.get("rope_theta")
    if params is None:  # transformers < 5: rope_theta plus an optional rope_scaling dict
        params, where = r.get("rope_scaling"), "rope_scaling"
    if isinstance(params, dict) and any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"{r.source}: per-layer-type rope_parameters are not supported for this family")
    return _rope(r, params, legacy_theta, where)


def _windows_from_layer_types(r: _Reader, n_layers: int, window: int | None,
                              default_types: Callable[[int], str]) -> tuple[int, ...]:
    layer_types = r.get("layer_types") or [default_types(i) for i in range(n_layers)]
    if not isinstance(layer_types, list):
        raise CheckpointError(f"{r.source}: layer_types={layer_types!r} must be a list, one entry per layer")
    if len(layer_types) != n_layers:
        raise CheckpointError(f"{r.source}: layer_types has {len(layer_types)} entries for {n_layers} layers")
    windows = []
    for i, kind in enumerate(layer_types):
        if kind == "full_attention":
            windows.append(0)
        elif kind == "sliding_attention":
            if not window:
                raise CheckpointError(f"{r.source}: layer {i} is sliding_attention but sliding_window is unset")
            windows.append(_whole(r.source, "sliding_window", window))
        else:
            raise CheckpointError(f"{r.source}: layer_types[{i}]={kind!r} is not supported")
    return tuple(windows)


def _decoder_sizes(r: _Reader) -> dict[str, Any]:
    n_heads = r.size("num_attention_heads")
    d_model = r.size("hidden_size")
    n_kv_heads = r.size("num_key_value_heads", n_heads)
    if n_heads % n_kv_heads:
        raise CheckpointError(f"{r.source}: num_attention_heads={n_heads} is not divisible by "
                              f"num_key_value_heads={n_kv_heads} (each key/value head serves a whole group)")
    head_dim = r.size("head_dim", None)
    if head_dim is None:
        head_dim = _head_dim(r, d_model, n_heads, "hidden_size", "num_attention_heads")
    return dict(
        vocab_size=r.size("vocab_size"), d_model=d_model, n_layers=r.size("num_hidden_layers"),
        n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, d_mlp=r.size("intermediate_size"),
        max_position_embeddings=r.size("max_position_embeddings", 4096),
    )


def _head_dim(r: _Reader, d_model: int, n_heads: int, model_key: str, heads_key: str) -> int:
    """d_model / n_heads when config.json gives no head_dim; a remainder would silently drop columns."""
    if d_model % n_heads:
        raise CheckpointError(f"{r.source}: {model_key}={d_model} is not divisible by {heads_key}={n_heads} "
                              "and there is no head_dim")
    return d_model // n_heads


def _llama_family(r: _Reader, model_type: str) -> ModelConfig:
    sizes = _decoder_sizes(r)
    n_layers = sizes["n_layers"]
    attention_bias = r.flag("attention_bias", False) if model_type in ("llama", "qwen3") else False
    window = r.size("sliding_window", None, minimum=0)  # 0 or null: no sliding window
    if model_type == "mistral":
        windows = (window or 0,) * n_layers
    elif model_type in ("qwen2", "qwen3"):
        if not r.flag("use_sliding_window", False):
            window = None
        first_sliding = r.size("max_window_layers", n_layers, minimum=0)
        windows = _windows_from_layer_types(
            r, n_layers, window,
            lambda i: "sliding_attention" if window is not None and i >= first_sliding else "full_attention",
        )
    else:
        windows = (0,) * n_layers
    return ModelConfig(
        architecture=model_type, **sizes,
        norm_eps=r.number("rms_norm_eps", 1e-6, positive=False),
        activation=r.activation("hidden_act", "silu"),
        # Llama's and Qwen3's attention_bias covers q/k/v and o; Qwen2 always has q/k/v biases and no o bias.
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=attention_bias,
        mlp_bias=r.flag("mlp_bias", False) if model_type == "llama" else False,
        qk_norm=model_type == "qwen3",
        tie_embeddings=r.flag("tie_word_embeddings", False),
        rope=_global_rope(r),
        layer_windows=windows,
    )


def _gemma_family(r: _Reader, model_type: str) -> ModelConfig:
    sizes = _decoder_sizes(r)
    n_layers = sizes["n_layers"]
    r.expect("use_bidirectional_attention", (None, False))
    attention_bias = r.flag("attention_bias", False)
    common = dict(
        architecture=model_type, **sizes,
        norm_eps=r.number("rms_norm_eps", 1e-6, positive=False), norm_offset=True, embed_scale=True,
        qkv_bias=attention_bias, o_bias=attention_bias,
        tie_embeddings=r.flag("tie_word_embeddings", True),
    )
    if model_type == "gemma":
        # transformers reads hidden_act only, and takes the legacy "gelu" to mean the tanh approximation.
        r.get("hidden_activation")  # ignored by transformers for Gemma 1
        activation = "gelu_tanh" if r.get("hidden_act") == "gelu" else r.activation("hidden_act", "gelu_pytorch_tanh")
        return ModelConfig(**common, activation=activation, rope=_global_rope(r))
    activation = r.activation("hidden_activation", "gelu_pytorch_tanh", ignored=("hidden_act",))
    window = r.size("sliding_window", None, minimum=0)  # 0 or null: no sliding window
    softcaps = dict(attn_softcap=r.number("attn_logit_softcapping", None),
                    final_softcap=r.number("final_logit_softcapping", None))
    attn_scale = r.number("query_pre_attn_scalar") ** -0.5
    if model_type == "gemma2":
        windows = _windows_from_layer_types(
            r, n_layers, window, lambda i: "sliding_attention" if (i + 1) % 2 else "full_attention")
        return ModelConfig(**common, activation=activation, post_norms=True, attn_scale=attn_scale,
                           rope=_global_rope(r), layer_windows=windows, **softcaps)
    pattern_keys = (r.size("sliding_window_pattern", None), r.size("_sliding_window_pattern", None))
    pattern = next((p for p in pattern_keys if p), 6)
    windows = _windows_from_layer_types(
        r, n_layers, window, lambda i: "full_attention" if (i + 1) % pattern == 0 else "sliding_attention")
    params = r.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        rope = _rope(r, params["full_attention"], where="rope_parameters.full_attention")
        rope_local = _rope(r, params.get("sliding_attention"), where="rope_parameters.sliding_attention")
    else:  # transformers < 5: global theta and scaling, plus a separate local base frequency
        where = "rope_parameters" if params else "rope_scaling"
        rope = _rope(r, params or r.get("rope_scaling"), r.get("rope_theta", 1_000_000.0), where)
        rope_local = RopeConfig(theta=r.number("rope_local_base_freq", 10_000.0))
    return ModelConfig(**common, activation=activation, post_norms=True, qk_norm=True, attn_scale=attn_scale,
                       rope=rope, rope_local=rope_local, layer_windows=windows, **softcaps)


def _gpt2(r: _Reader, model_type: str) -> ModelConfig:
    r.expect("scale_attn_weights", (True,), default=True)
    r.expect("scale_attn_by_inverse_layer_idx", (False,), default=False)
    r.expect("reorder_and_upcast_attn", (False,), default=False)
    r.expect("add_cross_attention", (False,), default=False)
    r.expect("is_decoder", (False, True), default=False)
    d_model, n_heads = r.size("n_embd"), r.size("n_head")
    n_positions = r.size("n_positions")
    r.get("n_ctx")  # legacy alias of n_positions
    return ModelConfig(
        architecture=model_type, vocab_size=r.size("vocab_size"), d_model=d_model,
        n_layers=r.size("n_layer"), n_heads=n_heads, n_kv_heads=n_heads,
        head_dim=_head_dim(r, d_model, n_heads, "n_embd", "n_head"),
        d_mlp=r.size("n_inner", 4 * d_model), norm_eps=r.number("layer_norm_epsilon", 1e-5, positive=False),
        norm_kind="layer", activation=r.activation("activation_function", "gelu_new"), mlp_gated=False,
        qkv_bias=True, o_bias=True, mlp_bias=True, fused_qkv=True, learned_positions=n_positions,
        tie_embeddings=r.flag("tie_word_embeddings", True), rope=None, max_position_embeddings=n_positions,
    )


def _gpt_neox(r: _Reader, model_type: str) -> ModelConfig:
    sizes = _decoder_sizes(r)
    r.expect("is_decoder", (False, True), default=False)
    if sizes["n_kv_heads"] != sizes["n_heads"]:
        raise CheckpointError(f"{r.source}: gpt_neox has one key/value head per query head, but "
                              f"num_key_value_heads={sizes['n_kv_heads']} != num_attention_heads={sizes['n_heads']}")
    params, where = r.get("rope_parameters"), "rope_parameters"
    if params is None:  # transformers < 5
        scaling, where = r.get("rope_scaling"), "rope_scaling"
        if scaling is not None and not isinstance(scaling, dict):
            raise CheckpointError(f"{r.source}: rope_scaling={scaling!r} must be a mapping")
        params = dict(scaling or {})
        params.setdefault("rope_theta", r.number("rotary_emb_base", 10_000.0))
        params.setdefault("partial_rotary_factor", r.number("rotary_pct", 1.0))
    else:
        r.get("rotary_pct")
        r.get("rotary_emb_base")
    bias = r.flag("attention_bias", True)
    return ModelConfig(
        architecture=model_type, **sizes, norm_eps=r.number("layer_norm_eps", 1e-5, positive=False),
        norm_kind="layer", activation=r.activation("hidden_act", "gelu"), mlp_gated=False, qkv_bias=bias,
        o_bias=bias, mlp_bias=True, fused_qkv=True, parallel_residual=r.flag("use_parallel_residual", True),
        tie_embeddings=r.flag("tie_word_embeddings", False), rope=_rope(r, params, where=where),
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
