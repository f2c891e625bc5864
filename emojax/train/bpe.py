"""A byte-level BPE tokenizer trained with the `tokenizers` library.

Specials: <pad> = 0 (what `Tokenizer.batch` pads with by default), <bos> = 1, <eos> = 2. `encode` adds <bos>
in front (as Llama tokenizers do), so a document is seen by the model exactly as it was in training, where
each document is <bos> text <eos>. The 256 byte symbols are always in the vocabulary: any text encodes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from emojax.tokenizer import Tokenizer

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIALS = (PAD, BOS, EOS)
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


WORD_REPEATS = 200  # how often each word of `words` is added to the text BPE is fitted on


def train_bpe(texts: Iterable[str], vocab_size: int, words: Sequence[str] = ()) -> Tokenizer:
    """Fits byte-level BPE merges on `texts` until the vocabulary (specials included) has `vocab_size` entries.

    `words` are added to the fitted text WORD_REPEATS times each, as mid-sentence words (" afraid"), so that BPE
    merges each into one token where the vocabulary has room: the built-in model's tokenizer keeps the emotion
    names whole, as a large model's vocabulary does, so the logit lens can read a concept's own word. Only the
    tokenizer sees them; the model's training text is `texts`. Deterministic for the same texts in the same order.
    """
    if words:
        texts = itertools.chain(texts, ["".join(f" {w}" for w in words)] * WORD_REPEATS)
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False, min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer=trainer)
    ids = [backend.token_to_id(t) for t in SPECIALS]
    if ids != [PAD_ID, BOS_ID, EOS_ID]:
        raise AssertionError(f"special token ids {ids} != {[PAD_ID, BOS_ID, EOS_ID]}")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)],
    )
    return Tokenizer(backend, source="emojax byte-level BPE")


def tokenizer_config(model_max_length: int) -> dict:
    """tokenizer_config.json for transformers' AutoTokenizer (PreTrainedTokenizerFast over tokenizer.json)."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
            "model_max_length": model_max_length, "add_bos_token": True}
