"""train-lm: the small built-in Llama-shape model, trained from scratch on the built-in corpus.

A byte-level BPE tokenizer (`bpe`) and packed token rows (`data`) from the built-in emotion world (or the older
story generator); AdamW with warmup and cosine decay, a jitted, donating train step and orbax checkpoints that
resume exactly (`trainer`); held-out perplexity against a unigram baseline and the world's entropy (`evaluate`,
`builtin`); an HF-format output folder, and the built-in
model cached on first use (`builtin`); the `emojax train-lm` subcommand (`commands`).

Fine-tuning any loadable model on prompt/response samples through the same trainer, optionally steered during
training (`finetune`, `train-lm --finetune`; docs/finetune.md).
"""

from emojax.models.presets import register_builtin
from emojax.train.bpe import BOS_ID, EOS_ID, PAD_ID, train_bpe
from emojax.train.builtin import default_cache_dir, ensure_builtin_model, is_complete, read_train_json, train_lm
from emojax.train.config import PRESETS, FinetuneConfig, TrainConfig, preset_config
from emojax.train.finetune import Steer, Steering, finetune, parse_steer
from emojax.train.trainer import Trainer, TrainState

register_builtin(lambda preset: ensure_builtin_model(name=preset))

__all__ = [
    "BOS_ID", "EOS_ID", "PAD_ID", "PRESETS", "FinetuneConfig", "Steer", "Steering", "TrainConfig", "TrainState",
    "Trainer", "default_cache_dir", "ensure_builtin_model", "finetune",
    "is_complete", "parse_steer", "preset_config", "read_train_json", "train_bpe", "train_lm",
]
