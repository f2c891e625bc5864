"""Finding emotion words in world text: the 171 concept names as whole words, and each concept's own forms.

The stories used for fitting and the implicit scenarios may contain none of the 171 names (nor the forms of their
own concept: "desperately" for desperate). Several names are also ordinary words ("content", "kind", "patient",
"safe", "stuck", "sorry", "hope", "alert", "hurt", "upset", "tense", ...). The world handles them by never writing
them: its own text (situations, continuations, choice scenes) avoids them, and cue-bank items that contain any
name are left out of the world (`COLLIDING_CUES` lists the five the catalogue has: stuck, rattled, stubborn,
kind, listless). So the check is strict: any
name anywhere in a fit story or an implicit scenario is a failure, whatever its sense.
"""

from __future__ import annotations

import functools
import re

from emojax.corpus.catalogue import Concept, load_catalogue

# The catalogue's cue items that contain another concept's name in its ordinary sense (concept, kind, item); the
# world skips them (`usable_cue`). tests/test_world.py checks that this is the complete list.
COLLIDING_CUES = (
    ("frustrated", "actions", "tried the key again, jiggling it harder in the stuck lock"),
    ("furious", "actions", "slammed the door so hard the pictures rattled on the wall"),
    ("hope", "body", "felt a small, stubborn flicker in {their} chest"),
    ("sympathetic", "thoughts", "I know exactly how much that kind of loss aches."),
    ("unhappy", "body", "heard {their} voice come out quiet and listless"),
)


@functools.cache
def names_pattern() -> re.Pattern:
    """Any of the 171 names as a whole word (hyphenated and multi-word names included), case-insensitive."""
    names = sorted(load_catalogue().names_list, key=len, reverse=True)
    return re.compile(r"(?<![\w-])(" + "|".join(re.escape(n) for n in names) + r")(?![\w-])", re.IGNORECASE)


def emotion_words_in(text: str, concept: Concept | None = None) -> list[str]:
    """The emotion names found in `text` (lower-cased, sorted, unique), plus the forms of `concept` when given."""
    found = {m.lower() for m in names_pattern().findall(text)}
    if concept is not None:
        found |= {m.lower() for m in concept.forbidden_pattern.findall(text)}
    return sorted(found)


def usable_cue(text: str) -> bool:
    """Whether a cue-bank item may appear in world text: it names no emotion at all."""
    return not names_pattern().search(text)
