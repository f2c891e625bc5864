"""Text in and out of the decode loop: prompt batches and per-token texts, through the model's tokenizer
(`tokenizer_for`, in emojax.models.lm, re-exported here)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from emojax.errors import InputError
from emojax.models.lm import tokenizer_for
from emojax.tokenizer import Tokenizer


def encode_prompts(tokenizer: Tokenizer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded tokens [B, T] and mask [B, T]; an empty encoding is an error."""
    texts = list(texts)
    if not texts:
        raise InputError("no prompt given")
    for text in texts:
        if not tokenizer.encode(text):
            raise InputError(f"the prompt {text!r} encodes to no tokens")
    return tokenizer.batch(texts)


def token_texts(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's own text (special tokens included), for per-token displays."""
    return [tokenizer.decode([int(i)], skip_special_tokens=False) for i in ids]


__all__ = ["encode_prompts", "token_texts", "tokenizer_for"]
