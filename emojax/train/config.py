"""Settings of `train-lm`: one frozen dataclass, plus named presets that change only what differs.

The defaults are the built-in default model (a ~5M-parameter Llama shape that trains in a few minutes on two
CPU cores). The `tiny` preset is the suite's model (seconds). A YAML `train:` section may name a preset
(`preset: tiny`) and override any field on top of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from emojax.config_loader import build, merge, parse_overrides, read_yaml
from emojax.errors import ConfigError
from emojax.models.config import ModelConfig, RopeConfig

# Bump when the meaning of a trained folder changes (data pipeline, tokenizer specials, export layout), so
# that cached built-in models are retrained instead of reused.
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    out: str = "runs/default/lm"  # where train-lm writes the HF-format folder (not part of the fingerprint)
    # model shape (Llama family)
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    d_mlp: int = 688
    vocab_size: int = 4096  # BPE vocabulary, specials included
    seq_len: int = 256  # training row length; also the model's max_position_embeddings
    rope_theta: float = 10_000.0
    tie_embeddings: bool = False
    # data: stories of the built-in generator (every concept, spread over every topic) + neutral dialogues.
    # corpus_seed differs from the corpus stage's default seed 0, so the LM never sees those exact stories.
    corpus_seed: int = 1
    n_stories: int = 3000
    neutral_per_topic: int = 3
    eval_fraction: float = 0.05  # documents held out (by hash of doc_id) for perplexity
    # optimisation: AdamW, linear warmup then cosine decay to min_lr_ratio * lr
    batch_size: int = 4  # rows of seq_len tokens per step (small batches, many steps: best per CPU-minute)
    steps: int = 280
    lr: float = 5e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    b2: float = 0.95
    seed: int = 0  # parameter init and data order
    checkpoint_every: int = 50  # steps between orbax checkpoints (a crash loses at most this many)

    def __post_init__(self):
        checks = {
            "d_model must be a multiple of n_heads": self.d_model % self.n_heads == 0,
            "n_heads must be a multiple of n_kv_heads": self.n_heads % max(self.n_kv_heads, 1) == 0,
            "vocab_size must be >= 259 (256 bytes + 3 specials)": self.vocab_size >= 259,
            "seq_len, batch_size, steps, n_stories must be >= 1":
                min(self.seq_len, self.batch_size, self.steps, self.n_stories) >= 1,
            "eval_fraction must be in (0, 0.5]": 0 < self.eval_fraction <= 0.5,
            "warmup_steps must be in [0, steps)": 0 <= self.warmup_steps < self.steps,
            "checkpoint_every must be >= 1": self.checkpoint_every >= 1,
        }
        failed = [msg for msg, ok in checks.items() if not ok]
        if failed:
            raise ValueError("; ".join(failed))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            architecture="llama", vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers,
            n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim, d_mlp=self.d_mlp,
            norm_eps=1e-5, tie_embeddings=self.tie_embeddings, rope=RopeConfig(theta=self.rope_theta),
            max_position_embeddings=self.seq_len,
        )

    def fingerprint(self) -> str:
        """Hash of every setting that changes the trained model (not where it is written)."""
        d = dataclasses.asdict(self)
        d.pop("out")
        d.pop("checkpoint_every")  # resuming is exact, so checkpoint spacing never changes the result
        d["format_version"] = FORMAT_VERSION
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


# Each preset lists only what differs from the defaults above.
PRESETS: dict[str, dict] = {
    "default": {},
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=176, vocab_size=512, seq_len=64,
                 n_stories=400, neutral_per_topic=1, eval_fraction=0.1, batch_size=8, steps=120, lr=1e-2,
                 warmup_steps=10, checkpoint_every=30),
}


def preset_config(name: str = "default", **changes) -> TrainConfig:
    """A preset's TrainConfig, optionally with some fields changed."""
    if name not in PRESETS:
        raise ConfigError(f"unknown train preset {name!r}; presets: {', '.join(PRESETS)}")
    return build(TrainConfig, merge(PRESETS[name], changes), f"preset {name}", prefix="train.")


def load_train_config(config_file: str | Path | None = None, overrides: Sequence[str] = (),
                      section: str = "train") -> TrainConfig:
    """The `train:` section of a YAML file (or defaults) with key=value overrides; `preset: NAME` picks the base.

    Unknown keys and wrong types raise ConfigError naming the key and the file.
    """
    values: dict = {}
    source = "defaults"
    if config_file is not None:
        source = str(config_file)
        values = read_yaml(config_file).get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{config_file}: section {section!r} must be a mapping")
    if overrides:
        values = merge(values, parse_overrides(overrides))
        source += " + overrides"
    values = dict(values)
    preset = values.pop("preset", "default")
    if preset not in PRESETS:
        raise ConfigError(f"{source}: {section}.preset={preset!r} is not a preset; presets: {', '.join(PRESETS)}")
    return build(TrainConfig, merge(PRESETS[preset], values), source, prefix=f"{section}.")
