"""Settings of `train-lm`: the `train:` section (training from scratch) with named presets that change only what
differs, the `finetune:` section (`train-lm --finetune`), and `Optimization`, what the trainer reads of either.

The defaults are the built-in default model (a ~5M-parameter Llama shape trained on the built-in emotion world,
about eight and a half minutes on two CPU cores). The `tiny` preset is the suite's model (seconds, on the older story
generator). A YAML `train:` section may name a preset (`preset: tiny`) and override any field on top of it.
"""

from __future__ import annotations

import dataclasses
import math

from emojax.config_loader import (config_section, fraction, merge, non_negative, positive, range_violations, ranged,
                                  section_of)
from emojax.corpus.world_config import WorldConfig
from emojax.digest import digest, fingerprinted
from emojax.errors import ConfigError
from emojax.models.config import ModelConfig, RopeConfig

# Bump when the meaning of a trained folder changes (data pipeline, tokenizer specials, export layout), so
# that cached built-in models are retrained instead of reused.
FORMAT_VERSION = 3  # 2: the world as training text, held-out documents one per row; 3: emotion names kept whole


DATA = ("world", "stories")


@dataclasses.dataclass(frozen=True)
class Optimization:
    """What the trainer reads of a run's settings: AdamW's, the schedule (steps resolved), the data order and the
    checkpoint spacing. `section` ("train" or "finetune") is where messages point for a setting."""

    steps: int = positive()
    batch_size: int = positive()
    lr: float = positive()
    warmup_steps: int = non_negative()
    min_lr_ratio: float = fraction()
    weight_decay: float = non_negative()
    grad_clip: float = positive()
    b2: float = ranged(lo=0, hi=1, hi_open=True)
    seed: int = non_negative()
    checkpoint_every: int = positive()
    section: str

    def __post_init__(self):
        failed = range_violations(self)
        if failed:
            raise ValueError("; ".join(failed))


def _preset_values(values: dict, source: str) -> dict:
    """A `train:` mapping on top of the preset it names (`preset: NAME`; none: default)."""
    values = dict(values)
    preset = values.pop("preset", "default")
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ConfigError(f"{source}: train.preset={preset!r} is not a preset; presets: {', '.join(PRESETS)}")
    return merge(PRESETS[preset], values, source)


@config_section("train", base=_preset_values)
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    out: str = "runs/default/lm"  # where train-lm writes the HF-format folder (not part of the fingerprint)
    # model shape (Llama family)
    d_model: int = positive(256)
    n_layers: int = positive(4)
    n_heads: int = positive(4)
    n_kv_heads: int = positive(2)
    d_mlp: int = positive(688)
    vocab_size: int = ranged(4096, 259)  # BPE vocabulary, specials included (>= 256 bytes + 3 specials)
    seq_len: int = positive(256)  # training row length; also the model's max_position_embeddings
    rope_theta: float = positive(10_000.0)
    tie_embeddings: bool = False
    # data: "world": n_documents of the built-in emotion world (stories, dialogues, choice scenes on its train
    # situations; docs/world.md) + the train-split neutral dialogues, evaluated on eval_fraction x n_documents
    # more written on its val situations. Its split settings (world.split_seed, the fractions) must be the
    # corpus's (corpus.generator.world), or held-out situations leak into training; `emojax run` checks.
    # "stories": n_stories of the older story generator (every concept over every topic) + neutral dialogues,
    # eval_fraction of them held out by hash of doc_id; corpus_seed differs from the corpus stage's seed 0.
    data: str = "world"
    world: WorldConfig = WorldConfig()
    n_documents: int = positive(20_000)  # data=world
    corpus_seed: int = non_negative(1)  # data=stories
    n_stories: int = positive(3000)  # data=stories
    neutral_per_topic: int = non_negative(3)
    eval_fraction: float = ranged(0.05, 0, 0.5, lo_open=True)
    # optimisation: AdamW, linear warmup then cosine decay to min_lr_ratio * lr
    # 1,500 steps of 4 x 256 tokens (1.5M tokens, half an epoch of the world's 3.1M): 469 s at 3.2 steps/s on two
    # otherwise idle CPU cores (1.7 steps/s when they are shared), 502 s with the data and the evaluation.
    # 3,000 steps lower the held-out loss (1.26 -> 0.92) but not the demo's figures (docs/world.md)
    batch_size: int = positive(4)  # rows of seq_len tokens per step (small batches, many steps: best per CPU-minute)
    steps: int = positive(1500)
    lr: float = positive(5e-3)
    warmup_steps: int = non_negative(50)  # and < steps
    min_lr_ratio: float = fraction(0.1)
    weight_decay: float = non_negative(0.1)
    grad_clip: float = positive(1.0)  # global norm
    b2: float = ranged(0.95, 0, 1, hi_open=True)
    seed: int = non_negative(0)  # parameter init and data order
    checkpoint_every: int = positive(100)  # steps between orbax checkpoints (a crash loses at most this many)

    def __post_init__(self):
        # Single-field ranges are declared on the fields (and checked here too, for direct construction).
        failed = range_violations(self)
        if not failed:  # the checks across fields assume each field in range (no division by zero heads)
            checks = {
                "d_model must be a multiple of n_heads": self.d_model % self.n_heads == 0,
                "n_heads must be a multiple of n_kv_heads": self.n_heads % self.n_kv_heads == 0,
                "warmup_steps must be in [0, steps)": self.warmup_steps < self.steps,
                f"data must be one of {list(DATA)}, got {self.data!r}": self.data in DATA,
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

    def optimization(self) -> Optimization:
        return Optimization(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Optimization)
                               if f.name != "section"}, section="train")

    def fingerprint(self) -> str:
        """Hash of every setting that changes the trained model (not where it is written)."""
        d = fingerprinted(self)
        d.pop("out")
        d.pop("checkpoint_every")  # resuming is exact, so checkpoint spacing never changes the result
        d["format_version"] = FORMAT_VERSION
        return digest(d)


@config_section("finetune")
@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """`train-lm --finetune`: all parameters of a loaded model, AdamW, the loss on response tokens only
    (docs/finetune.md). Defaults suit the built-in model's size; a larger model wants a lower lr."""

    epochs: int = positive(3)  # passes over the training samples (steps = ceil(epochs x samples / batch_size))
    batch_size: int = positive(8)  # whole samples per step, each in a row of its own
    lr: float = positive(1e-4)
    warmup_fraction: float = fraction(0.1)  # share of the steps warming up linearly, then cosine decay
    min_lr_ratio: float = fraction(0.1)
    weight_decay: float = non_negative(0.0)  # decay toward zero would pull the model from where it starts
    grad_clip: float = positive(1.0)  # global norm
    b2: float = ranged(0.95, 0, 1, hi_open=True)
    seed: int = non_negative(0)  # data order (the parameters start from the loaded model)
    eval_fraction: float = ranged(0.1, 0, 0.5, lo_open=True)  # samples held out, by hash of their id
    checkpoint_every: int = positive(50)  # steps between orbax checkpoints

    def optimization(self, n_train: int) -> Optimization:
        """The trainer's settings for `n_train` training samples."""
        steps = max(1, math.ceil(self.epochs * n_train / self.batch_size))
        return Optimization(steps=steps, batch_size=self.batch_size, lr=self.lr,
                            warmup_steps=min(int(self.warmup_fraction * steps), steps - 1),
                            min_lr_ratio=self.min_lr_ratio, weight_decay=self.weight_decay, grad_clip=self.grad_clip,
                            b2=self.b2, seed=self.seed, checkpoint_every=self.checkpoint_every, section="finetune")

    def settings(self) -> dict:
        """The settings that change the fine-tuned model (resuming is exact: checkpoint spacing does not)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "checkpoint_every"}


# Each preset lists only what differs from the defaults above.
PRESETS: dict[str, dict] = {
    "default": {},
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=176, vocab_size=512, seq_len=64,
                 data="stories", n_stories=400, neutral_per_topic=1, eval_fraction=0.1, batch_size=8, steps=120,
                 lr=1e-2, warmup_steps=10, checkpoint_every=30),
}


def preset_config(name: str = "default", **changes) -> TrainConfig:
    """A preset's TrainConfig, optionally with some fields changed."""
    return section_of(TrainConfig).build({"preset": name, **changes}, f"preset {name}")
