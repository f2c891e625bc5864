"""The concept catalogue: the study's 171 emotions with emojax's own annotations and cue banks, and the
100 topics the built-in corpus is written about.

Valence (+1/0/-1) and arousal (high/low) are emojax's own coarse annotation (circumplex-style judgement made
for this project), not a published norm; they exist to check that the fitted vectors' principal components
line up with valence and arousal as the study found.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from importlib import resources

import yaml

from emojax.errors import ConfigError

NEUTRAL = "neutral"
_CUE_KINDS = ("actions", "body", "dialogue", "thoughts", "scenarios")


@dataclasses.dataclass(frozen=True)
class Concept:
    name: str
    index: int  # label id: position in the study's list (emotions.txt)
    valence: int
    arousal: str
    forbidden: tuple[str, ...]  # word forms a story about this concept must not contain
    actions: tuple[str, ...]
    body: tuple[str, ...]
    dialogue: tuple[str, ...]
    thoughts: tuple[str, ...]
    scenarios: tuple[str, ...]

    @functools.cached_property
    def forbidden_pattern(self) -> re.Pattern:
        forms = sorted(set(self.forbidden) | {self.name}, key=len, reverse=True)
        return re.compile(r"(?<![\w-])(" + "|".join(re.escape(f) for f in forms) + r")(?![\w-])", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Topic:
    topic: str
    settings: tuple[str, ...]
    details: tuple[str, ...]
    events: tuple[str, ...]
    dialogues: tuple[tuple[str, str], ...]  # (human, assistant)


@dataclasses.dataclass(frozen=True)
class Catalogue:
    concepts: tuple[Concept, ...]
    topics: tuple[Topic, ...]
    names: dict[str, tuple[str, ...]]  # pronoun set -> first names

    @functools.cached_property
    def by_name(self) -> dict[str, Concept]:
        return {c.name: c for c in self.concepts}

    def concept(self, name: str) -> Concept:
        try:
            return self.by_name[name]
        except KeyError:
            raise ConfigError(f"unknown concept {name!r}; the catalogue has {len(self.concepts)} "
                              f"(e.g. {', '.join(c.name for c in self.concepts[:5])}, ...)") from None

    @property
    def names_list(self) -> list[str]:
        return [c.name for c in self.concepts]


def _data(name: str) -> str:
    return resources.files("emojax.corpus").joinpath("data", name).read_text(encoding="utf-8")


@functools.cache
def load_catalogue() -> Catalogue:
    """The built-in catalogue (cached). Raises if the packaged data is inconsistent: that is a bug."""
    order = [line.strip() for line in _data("emotions.txt").splitlines() if line.strip()]
    annotations = {a["name"]: a for a in yaml.safe_load(_data("catalogue.yaml"))}
    cues: dict[str, dict] = {}
    for part in sorted(resources.files("emojax.corpus").joinpath("data", "cues").iterdir(), key=lambda p: p.name):
        if part.name.endswith(".yaml"):
            cues.update(yaml.safe_load(part.read_text(encoding="utf-8")))
    missing = [n for n in order if n not in annotations or n not in cues]
    if missing:
        raise AssertionError(f"catalogue data lacks annotations or cues for {missing}")
    concepts = tuple(
        Concept(
            name=name, index=i, valence=int(annotations[name]["valence"]), arousal=str(annotations[name]["arousal"]),
            forbidden=tuple(cues[name]["forbidden"]), **{k: tuple(cues[name][k]) for k in _CUE_KINDS},
        )
        for i, name in enumerate(order)
    )
    topics = tuple(
        Topic(topic=t["topic"], settings=tuple(t["settings"]), details=tuple(t["details"]),
              events=tuple(t["events"]), dialogues=tuple((d["human"], d["assistant"]) for d in t["dialogues"]))
        for t in yaml.safe_load(_data("topics.yaml"))
    )
    names = {k: tuple(v) for k, v in yaml.safe_load(_data("names.yaml")).items()}
    return Catalogue(concepts=concepts, topics=topics, names=names)
