"""Tiny random Hugging Face checkpoints built with transformers' own classes, and a float32 reference run.

Plain helpers shared by the parity and padding tests (no tests in here). Sizes are deliberately odd
(hidden 72, 6 query heads, 2 kv heads, head_dim 12, intermediate 100, vocab 101, 3 layers) so that a
transposed or mis-split weight cannot hide behind a square shape.

Weights are drawn with a seeded torch init at initializer_range 0.1, so every projection matters and
activations are O(1) (an absolute float32 tolerance of 1e-4 is then a tight one). Two adjustments follow:

* transformers initialises every bias to 0 and every norm weight to 1, which would let a bias or norm-weight
  mapping bug go unnoticed; `perturb_biases_and_norms` makes them random (N(0, 0.1) added).
* `make_logits_decisive`: with i.i.d. random weights the next-token logits are random projections of the
  final hidden state; the top-2 margin is then only ~0.3 logit standard deviations on average, while
  bfloat16 inference (any implementation, transformers' own included) moves the logits by ~1.5% of their
  norm. Measured on these shapes, transformers bf16 vs transformers fp32 agreed on the argmax at only
  96-100% of positions, and emojax bf16 vs transformers bf16 at 95-99%, so a 99% argmax criterion would be
  decided by near-ties rather than by correctness. As in a trained model, the unembedding is therefore made
  to correlate with the embedding (and the embedding is given std 1, torch.nn.Embedding's default, so the
  token identity is a sizeable part of the residual stream; the layers still contribute ~60% of the final
  residual norm). With that, bf16 vs fp32 argmax agreement is 100% for both transformers and emojax while
  the relative logit error stays ~0.7%.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

# The reference must be true float32: no TF32 / reduced-precision matmul passes.
torch.set_float32_matmul_precision("highest")

FAMILIES: dict[str, tuple[type, type]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "gemma": (GemmaConfig, GemmaForCausalLM),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM),
    "gpt2": (GPT2Config, GPT2LMHeadModel),
    "gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM),
}

BASE_CONFIG: dict[str, Any] = dict(
    hidden_size=72,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=12,
    intermediate_size=100,
    vocab_size=101,
    num_hidden_layers=3,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    initializer_range=0.1,
    tie_word_embeddings=False,
)

# GPT-2 and GPT-NeoX name their sizes differently and have no GQA; Gemma ties its embeddings by default.
FAMILY_BASES: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_embd=72, n_head=6, n_layer=3, n_inner=100, vocab_size=101, n_positions=16,
                 layer_norm_epsilon=1e-5, initializer_range=0.1, tie_word_embeddings=True,
                 bos_token_id=0, eos_token_id=0),
    "gpt_neox": dict(hidden_size=72, num_attention_heads=6, num_hidden_layers=3, intermediate_size=100,
                     vocab_size=101, max_position_embeddings=128, layer_norm_eps=1e-5, initializer_range=0.1,
                     tie_word_embeddings=False),
}

PERTURB_STD = 0.1
EMBED_STD = 1.0
HEAD_NOISE = 0.5


@dataclasses.dataclass(frozen=True)
class Case:
    """One checkpoint flavour: a model family plus config overrides on top of BASE_CONFIG."""

    family: str
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    seq_len: int = 13  # float32 parity length


CASES: dict[str, Case] = {
    "llama_mha": Case("llama", dict(num_key_value_heads=6)),
    "llama_gqa": Case("llama"),
    "llama_mqa": Case("llama", dict(num_key_value_heads=1)),
    # original_max_position_embeddings=16 puts the wavelength thresholds at 4 (high) and 16 (low): with head_dim
    # 12 the first frequency (wavelength ~6.3) is smoothed and all the others are divided by `factor`, so the
    # scaling really changes every rotation that the tested positions (up to 31) see.
    "llama_rope_llama3": Case("llama", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
    })),
    "llama_bias": Case("llama", dict(attention_bias=True, mlp_bias=True)),
    "mistral_window": Case("mistral", dict(sliding_window=4), seq_len=13),
    "qwen2": Case("qwen2"),
    "qwen3": Case("qwen3", dict(head_dim=16)),
    "qwen3_tied": Case("qwen3", dict(head_dim=16, tie_word_embeddings=True)),
    "llama_tied": Case("llama", dict(tie_word_embeddings=True)),
    # Gemma 1: head_dim independent of hidden / heads, (1 + w) norms, GeGLU, scaled and tied embeddings.
    "gemma": Case("gemma", dict(head_dim=16, tie_word_embeddings=True)),
    # Gemma 2: sandwich norms, soft-capping that bites (scores and logits reach well past the caps),
    # query_pre_attn_scalar != head_dim, alternating window-4 / global layers on a 13-token sequence.
    "gemma2_window": Case("gemma2", dict(head_dim=16, tie_word_embeddings=True, sliding_window=4,
                                         query_pre_attn_scalar=20, attn_logit_softcapping=2.0,
                                         final_logit_softcapping=30.0), seq_len=13),
    # Gemma 3: q/k norm, a linearly scaled global rope and a different local rope base, pattern 2.
    "gemma3": Case("gemma3_text", dict(head_dim=16, tie_word_embeddings=True, num_hidden_layers=4,
                                       sliding_window=4, sliding_window_pattern=2, query_pre_attn_scalar=20,
                                       rope_parameters={
                                           "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                              "rope_theta": 1_000_000.0},
                                           "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                                       }), seq_len=13),
    # GPT-2 at its full context: every learned position row is used.
    "gpt2_full_context": Case("gpt2", seq_len=16),
    # Pythia-style: a quarter of each head rotated (3 of 12 dims), parallel and sequential residuals.
    "gpt_neox_parallel": Case("gpt_neox", dict(rotary_pct=0.25, use_parallel_residual=True)),
    "gpt_neox_sequential": Case("gpt_neox", dict(rotary_pct=0.25, use_parallel_residual=False)),
}


def make_config(family: str, **overrides):
    config_cls, _ = FAMILIES[family]
    kwargs = {**FAMILY_BASES.get(family, BASE_CONFIG), **overrides}
    return config_cls(**kwargs)


def perturb_biases_and_norms(model: torch.nn.Module, seed: int, std: float = PERTURB_STD) -> list[str]:
    """Adds N(0, std) noise to every bias and every norm weight (which transformers sets to 0 / 1)."""
    gen = torch.Generator().manual_seed(seed + 1_000_003)
    touched = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name or ".ln_" in name:
                p.add_(std * torch.randn(p.shape, generator=gen, dtype=p.dtype))
                touched.append(name)
    return touched


def make_logits_decisive(model: torch.nn.Module, seed: int, embed_std: float = EMBED_STD,
                         head_noise: float = HEAD_NOISE) -> None:
    """Gives the random model decisive next-token predictions (see the module docstring).

    The embedding table is rescaled to N(0, embed_std) so the token identity is a sizeable part of the residual
    stream, and an untied unembedding becomes (E / embed_std + head_noise * N(0, 1)) / sqrt(1 + head_noise^2)
    scaled to std initializer_range: correlated with the embedding as in a trained model, yet different from it
    (a head/embedding mix-up is still a large float32 error). A tied model's head is the embedding itself.
    """
    gen = torch.Generator().manual_seed(seed + 2_000_003)
    config = model.config
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.mul_(embed_std / emb.std())
        if not config.tie_word_embeddings:
            head = model.get_output_embeddings().weight
            noise = torch.randn(head.shape, generator=gen, dtype=head.dtype)
            mixed = (emb / embed_std + head_noise * noise) / (1.0 + head_noise**2) ** 0.5
            head.copy_(config.initializer_range * mixed)


def build_checkpoint(out_dir: str | Path, family: str, seed: int = 0, decisive: bool = True,
                     **overrides) -> tuple[Path, torch.nn.Module]:
    """Builds a seeded random `family` model, saves it (safetensors) into out_dir; returns (path, model).

    The returned model is float32 and in eval mode; it is the exact model whose weights were saved.
    """
    _, model_cls = FAMILIES[family]
    config = make_config(family, **overrides)
    # The eager path is the plain reference math (matmul, float32 softmax, additive mask).
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    perturb_biases_and_norms(model, seed)
    if decisive:
        make_logits_decisive(model, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    assert (out_dir / "model.safetensors").is_file(), f"save_pretrained wrote no model.safetensors in {out_dir}"
    return out_dir, model


def build_case(out_dir: str | Path, name: str, seed: int = 0, decisive: bool = True) -> tuple[Path, torch.nn.Module]:
    case = CASES[name]
    return build_checkpoint(out_dir, case.family, seed=seed, decisive=decisive, **case.overrides)


def run_torch(model: torch.nn.Module, tokens: np.ndarray, attention_mask: np.ndarray | None = None,
              dtype: torch.dtype = torch.float32) -> tuple[np.ndarray, list[np.ndarray]]:
    """Runs the transformers model; returns float32 numpy logits [B, T, V] and hidden states (L + 1 of [B, T, D]).

    hidden[0] is the embedding output, hidden[L] the last layer's output after the final norm.
    With dtype=torch.bfloat16 the model is run on a bfloat16 copy (the original stays float32).
    """
    torch.set_float32_matmul_precision("highest")
    if dtype != torch.float32:
        import copy
        model = copy.deepcopy(model).to(dtype)
    model.eval()
    ids = torch.from_numpy(np.asarray(tokens, np.int64))
    mask = None if attention_mask is None else torch.from_numpy(np.asarray(attention_mask, np.int64))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    logits = out.logits.float().numpy()
    hidden = [h.float().numpy() for h in out.hidden_states]
    return logits, hidden


def random_tokens(batch: int, seq_len: int, vocab_size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, size=(batch, seq_len)).astype(np.int32)


@dataclasses.dataclass
class Built:
    """A saved checkpoint and the torch model whose weights it holds."""

    name: str
    path: Path
    model: torch.nn.Module

    @property
    def n_layers(self) -> int:
        config = self.model.config
        return config.n_layer if config.model_type == "gpt2" else config.num_hidden_layers

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size


class CheckpointCache:
    """Builds each named case at most once, under `root` (use one per test module, e.g. module-scoped)."""

    def __init__(self, root: str | Path, seed: int = 0, decisive: bool = True):
        """decisive=False keeps transformers' plain init (moderate activations, near-tied logits)."""
        self.decisive = decisive
        self.root = Path(root)
        self.seed = seed
        self._built: dict[str, Built] = {}

    def get(self, name: str) -> Built:
        if name not in self._built:
            path, model = build_case(self.root / name, name, seed=self.seed, decisive=self.decisive)
            self._built[name] = Built(name, path, model)
        return self._built[name]
