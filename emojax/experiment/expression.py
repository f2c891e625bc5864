"""What a text expresses of a concept: a lexicon score, the text side of masking detection (issue R, line 2).

    scores_NC = expression_scores(replies, ["desperate", "calm"], cues=world.cues)

A concept's markers are its own word forms, the catalogue's `Concept.forbidden_pattern` ("desperate",
"desperately", "desperation", ...: the forms the world keeps out of unlabelled text), and, when `cues` (the
built-in world's `CueBank`) is given, each of its cue items as a phrase: "felt {their} breath come in ragged
gasps", "I'll beg if that's what it takes." (every kind, the held-out items included). A cue matches
whatever fills its slots ({their} -> my, her, their) and whatever punctuation or case separates its words, so
"I'll beg if that's what it takes," said in a story counts as the thought it quotes. The score is the number of
markers per 100 words of the text (a word: letters and digits, with inner apostrophes and hyphens), so long and
short replies compare; a text without words scores 0.

What it can detect: the concept named (in any of its forms) and the world's own cue behaviours written out,
which is every way the world's text expresses an emotion. What it cannot: tone, paraphrase, a cue reworded,
another concept's words used to express this one, or the sense a word is used in ("content" the noun counts
for "content" the emotion). It reads words, not states: a reply that scores 0 may still sound desperate to a
reader, and on a model trained outside the world only the word forms carry over. Pair it with the concept's
internal readout on the same replies to measure the gap between representing and expressing.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import numpy as np

from emojax.corpus.catalogue import load_catalogue
from emojax.world.narration import CUE_KINDS, CueBank

WORD = re.compile(r"\w+(?:['’-]\w+)*")
_CUE_PART = re.compile(r"\{\w+\}|\w+")


def cue_pattern(item: str) -> re.Pattern:
    """A cue item as a phrase: its words in order, any slot ({their}) as any one word, any non-word characters
    between them, case-insensitive."""
    parts = [r"\w+" if p.startswith("{") else re.escape(p) for p in _CUE_PART.findall(item)]
    return re.compile(r"(?<!\w)" + r"\W+".join(parts) + r"(?!\w)", re.IGNORECASE)


@functools.cache
def concept_markers(concept: str, cues: CueBank | None = None) -> tuple[re.Pattern, ...]:
    """The patterns a text expresses `concept` by: its word forms, then (with `cues`) each of its cue items.
    An unknown concept is a ConfigError naming it."""
    c = load_catalogue().concept(concept)
    phrases = [] if cues is None else [cue_pattern(x) for kind in CUE_KINDS for x in cues.items[c.index, kind]]
    return (c.forbidden_pattern, *phrases)


def marker_spans(text: str, markers: Sequence[re.Pattern]) -> list[tuple[int, int]]:
    """The (start, end) character span of every marker match in `text`, in order."""
    return sorted(m.span() for pattern in markers for m in pattern.finditer(text))


def expression_scores(texts: Sequence[str], concepts: Sequence[str], *, cues: CueBank | None = None) -> np.ndarray:
    """[N, C] float64: markers of each concept per 100 words of each text (see the module docstring)."""
    markers = [concept_markers(c, cues) for c in concepts]
    out = np.zeros((len(texts), len(concepts)))
    for n, text in enumerate(texts):
        words = len(WORD.findall(text))
        for c, patterns in enumerate(markers):
            out[n, c] = 100.0 * len(marker_spans(text, patterns)) / max(words, 1)
    return out
