"""The world's own entropy: an estimate of the best loss any model of its text could reach.

Every world document records the log-probability of each random choice made to write it (`WorldDocument.log_prob`,
natural log). Averaged over documents, -log_prob estimates the entropy of the world's generation paths; divided by
the tokens a model predicts, it is the floor to set a language model's held-out loss (nats per token) against.

Caveats (docs/world.md):
- It is an upper bound on the entropy of the text. A path's probability counts every choice, and a text written by
  several paths (chiefly: an emotion that neither cues nor a name reveal, as in a dialogue without cues whose reply
  does not name it) is more probable than any one of them. The excess is at most H(emotion | text) <= log C (C the
  world's emotions: 5.1 nats for all 171) for such a document, and zero for one whose cues or name identify the emotion.
- Surface choices count: names, times, phrasings, the order of cues. A model can do no better on them than the
  world's own (mostly uniform) distributions, so they belong to the floor, and they are most of it.
- It assumes a reader who knows the world's tables (the name pools, the templates, P(s | e)); a model learns
  them from finite text. Packed training rows also cut documents, so a row's first tokens miss their context.
- Neutral dialogues are copied from the catalogue, not generated; they have no entropy here and are left out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from emojax.world.documents import WorldDocument


@dataclasses.dataclass(frozen=True)
class EntropyEstimate:
    """nats_per_document: mean -log p(path) with its standard error; nats_per_token: total nats / total predicted
    tokens (None without a token counter); over n_documents world documents (neutral ones left out)."""

    nats_per_document: float
    stderr_per_document: float
    nats_per_token: float | None
    n_documents: int
    n_tokens: int | None


def world_entropy(docs: Sequence[WorldDocument], count_tokens: Callable[[str], int] | None = None,
                  add_eos: bool = True) -> EntropyEstimate:
    """The entropy estimate over `docs`. count_tokens(text) -> the number of tokens of a document's text (e.g.
    `lambda t: len(tokenizer.backend.encode(t, add_special_tokens=False).ids)`); add_eos counts the end-of-document
    token a model also predicts (training rows are <bos> text <eos>, and <bos> is never predicted)."""
    generated = [d for d in docs if not math.isnan(d.log_prob)]
    if not generated:
        raise ValueError("no generated world documents to estimate the entropy over")
    nats = -np.array([d.log_prob for d in generated])
    stderr = float(nats.std(ddof=1) / np.sqrt(len(nats))) if len(nats) > 1 else float("nan")
    per_token, n_tokens = None, None
    if count_tokens is not None:
        n_tokens = sum(count_tokens(d.text) + int(add_eos) for d in generated)
        per_token = float(nats.sum() / n_tokens)
    return EntropyEstimate(nats_per_document=float(nats.mean()), stderr_per_document=stderr, nats_per_token=per_token,
                           n_documents=len(generated), n_tokens=n_tokens)
