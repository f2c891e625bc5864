"""Text in and out of the decode loop: the model's tokenizer (or the byte tokenizer), prompt batches, decoding."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from emojax.errors import InputError
from emojax.models.lm import LanguageModel
from emojax.tokenizer import ByteTokenizer, Tokenizer


def tokenizer_for(lm: LanguageModel) -> Tokenizer:
    """The checkpoint's tokenizer.json, else the byte tokenizer when the vocabulary holds it (as `emojax dump`)."""
    if lm.tokenizer is not None:
        return lm.tokenizer
    if lm.config.vocab_size >= ByteTokenizer().vocab_size:
        return ByteTokenizer()
    raise InputError(f"{lm.source} has no tokenizer.json and its vocabulary ({lm.config.vocab_size}) is too small "
                     "for the byte tokenizer; use a checkpoint with a tokenizer")


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
