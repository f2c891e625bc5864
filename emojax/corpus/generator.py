"""The built-in, seeded story generator: the study's corpus structure without a language model.

For each (concept, topic, n): a one-paragraph story in which one character feels the concept, shown through
actions, bodily signs, dialogue and thoughts drawn from the concept's cue bank, placed in the topic's
settings and events, in first or third person, and never naming the concept (`validate_story`). Every
sentence mixes a cue with a topic detail, a name or an event, so two stories rarely share a sentence.
Also: neutral Human/Assistant dialogues on the same topics (the denoising set) and implicit-emotion
scenarios (held out for validation).

Each document is generated from its own random stream, seeded by sha256(seed, kind, concept, topic, n), so
generation is identical for the same seed in any order and on any number of workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterator

import numpy as np

from emojax.config_loader import non_negative, positive, range_violations
from emojax.corpus.catalogue import NEUTRAL, Catalogue, Concept, Topic, load_catalogue
from emojax.corpus.world_config import WorldConfig

MIN_WORDS, MAX_WORDS = 80, 200

_PERSONS = {
    "first": dict(subj="I", their="my", them="me", themself="myself"),
    "she": dict(subj="she", their="her", them="her", themself="herself"),
    "he": dict(subj="he", their="his", them="him", themself="himself"),
    "they": dict(subj="they", their="their", them="them", themself="themself"),
}
_PERSON_WEIGHTS = {"first": 0.35, "she": 0.28, "he": 0.28, "they": 0.09}
_TIMES = ("early in the morning", "mid-morning", "just past noon", "in the middle of the afternoon",
          "late in the afternoon", "early in the evening", "well after dark", "close to midnight")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_WAITED = ("waited", "sat", "stood", "lingered", "stayed", "paused")
# Every opener names the character and a time, so that openers of different stories rarely coincide.
_OPENERS = (
    "{Time} on a {day}, {subj} {waited} {setting}, just as {event}.",
    "{Subj} {waited} {setting} {time} that {day}; {event}.",
    "It was {time} on a {day} and {subj} {waited} {setting} when {event}.",
)
_NEAR = ("Beside {detail}", "Next to {detail}", "A few steps from {detail}", "Within reach of {detail}",
         "Across from {detail}", "Not far from {detail}")
_ACTION_TEMPLATES = (
    "{Near}, {subj} {cue}.",
    "{Subj} {cue}, never far from {detail}.",
    "For a while {subj} {cue} {setting}.",
    "{Subj} {cue} while {event}.",
)
_BODY_TEMPLATES = (
    "{Subj} {cue} as {event}.",
    "{Near}, {subj} {cue}.",
    "{Setting}, {subj} {cue}.",
)
_GLANCES = ("glancing at {detail}", "nodding toward {detail}", "looking past {detail}", "turning from {detail}",
            "eyes on {detail}", "one hand near {detail}")
_SPEECH = ("{subj} said to {other}", "{subj} told {other}", "{subj} said", "{subj} called over to {other}")
_ASKING = ("{subj} asked {other}", "{subj} asked", "{subj} called over to {other}")
_THOUGHT_TEMPLATES = (
    '"{spoken}" {subj} thought, {glance}.',
    '{Setting}, one thought kept coming back to {them}: "{line}"',
    '"{line}" The words circled in {their} head while {event}.',
)


@dataclasses.dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    label: str  # concept name, or "neutral"
    topic: str
    source: str  # generated/story | generated/neutral | generated/implicit


GENERATORS = ("stories", "world")
_STORY_ONLY = ("seed", "stories_per_topic", "n_topics")
_WORLD_ONLY = ("world", "stories_per_emotion", "implicit_per_emotion", "suite_scenarios")


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """The built-in corpus. kind "stories": this module's story generator (stories per concept and catalogue topic,
    the catalogue's implicit scenarios; the corpus stage splits by topic). kind "world": the built-in emotion
    world (emojax.world, docs/world.md): fit stories on the world's train, val and test situations, implicit
    scenarios on its implicit situations, each document in its situation's split, and the world's choice scenes
    written as experiment suites beside the corpus."""

    kind: str = "stories"  # stories | world
    # shared: the concepts generated (empty: all 171), neutral dialogues per topic, implicit scenarios or not
    concepts: tuple[str, ...] = ()
    neutral_per_topic: int = non_negative(3)  # at most the number of dialogues per topic
    implicit: bool = True
    # kind stories
    seed: int = non_negative(0)
    stories_per_topic: int = non_negative(2)  # per concept and topic (the study used 12)
    n_topics: int = positive(100)
    # kind world: its settings (share world.split_seed and the split fractions with the model's train.world)
    world: WorldConfig = WorldConfig()
    stories_per_emotion: tuple[int, ...] = non_negative((40, 10, 10))  # fit stories per emotion: train, val, test
    implicit_per_emotion: int = non_negative(5)
    suite_scenarios: int = non_negative(240)  # scenes per world suite written into the corpus's suites/ (0: none)

    def __post_init__(self):
        # The declared ranges again, for direct construction: a negative count would quietly generate nothing.
        problems = range_violations(self)
        if self.kind not in GENERATORS:
            problems.append(f"kind must be one of {list(GENERATORS)}, got {self.kind!r}")
        elif self.kind == "world" and len(self.stories_per_emotion) != 3:
            problems.append("stories_per_emotion must be three counts: train, val, test")
        else:  # a setting of the other generator would be silently ignored
            unused = _WORLD_ONLY if self.kind == "stories" else _STORY_ONLY
            default = GeneratorConfig.__dataclass_fields__
            changed = [n for n in unused if getattr(self, n) != default[n].default]
            if changed:
                problems.append(f"{changed} apply to kind={'world' if self.kind == 'stories' else 'stories'}, not "
                                f"kind={self.kind}; remove them or change kind")
        if self.kind == "world":
            outside = [c for c in self.concepts if c not in self.world.concept_names()]
            if outside:
                problems.append(f"concepts {outside} are not among the world's emotions (world.concepts)")
        if problems:
            raise ValueError("; ".join(problems))

    def world_emotions(self) -> list[int]:
        """kind world: the indices, among the world's emotions, of those the corpus writes (`concepts`, else all)."""
        names = self.world.concept_names()
        return [names.index(c) for c in self.concepts or names]


def _rng(seed: int, *key) -> np.random.Generator:
    digest = hashlib.sha256(repr((seed,) + key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _fill(template: str, **slots: str) -> str:
    """str.format with {Slot} meaning the capitalised value of {slot}."""
    values = dict(slots)
    values.update({_cap(k): _cap(v) for k, v in slots.items()})
    return template.format(**values)


def _spoken(line: str) -> str:
    """A line of dialogue placed before its attribution: a final period becomes a comma."""
    return line[:-1] + "," if line.endswith(".") else line


def story(concept: Concept, topic: Topic, n: int, seed: int, catalogue: Catalogue) -> Document:
    rng = _rng(seed, "story", concept.name, topic.topic, n)
    person = rng.choice(list(_PERSON_WEIGHTS), p=list(_PERSON_WEIGHTS.values()))
    pron = _PERSONS[person]
    names = catalogue.names
    name = str(rng.choice(names["she" if person == "first" else person]))
    other = str(rng.choice([x for pool in names.values() for x in pool if x != name]))
    pick = lambda seq, k: [seq[i] for i in rng.choice(len(seq), size=k, replace=False)]  # noqa: E731
    actions, bodies = pick(concept.actions, 2), pick(concept.body, 2)
    (line,), (thought,) = pick(concept.dialogue, 1), pick(concept.thoughts, 1)
    # topic text that happens to contain a form of the concept's word ("shook hands" for shaken) is skipped
    usable = lambda seq: [x for x in seq if not concept.forbidden_pattern.search(x)]  # noqa: E731
    details, events, settings = (pick(usable(seq), k) for seq, k in
                                 ((topic.details, 4), (topic.events, 3), (topic.settings, 3)))
    mentions = iter([name] + [str(rng.choice([name, pron["subj"]])) for _ in range(8)])

    def subject() -> str:
        return pron["subj"] if person == "first" else next(mentions)

    def cue(text: str) -> str:
        return text.format(**{k: pron[k] for k in ("their", "them", "themself")})

    def sentence(templates, **slots) -> str:
        template = templates[int(rng.integers(len(templates)))]
        near = _NEAR[int(rng.integers(len(_NEAR)))].format(detail=slots.get("detail", details[0]))
        return _fill(template, near=near, **pron | slots)

    opener = sentence(_OPENERS, subj=subject(), setting=settings[0], event=events[0], time=str(rng.choice(_TIMES)),
                      day=str(rng.choice(_DAYS)), waited=str(rng.choice(_WAITED)))
    first_action = sentence(_ACTION_TEMPLATES, subj=subject(), cue=cue(actions[0]), detail=details[0],
                            setting=settings[1], event=events[1])
    body = sentence(_BODY_TEMPLATES, subj=subject(), cue=cue(bodies[0]), detail=details[1], setting=settings[2],
                    event=events[1])
    glance = _GLANCES[int(rng.integers(len(_GLANCES)))].format(detail=details[2])
    verbs = _ASKING if line.endswith("?") else _SPEECH
    speech = verbs[int(rng.integers(len(verbs)))].format(subj=subject(), other=other)
    said = f'"{_spoken(line)}" {speech}, {glance}.'
    thought_line = sentence(_THOUGHT_TEMPLATES, subj=subject(), line=thought, spoken=_spoken(thought),
                            setting=settings[1],
                            event=events[2],
                            glance=_GLANCES[int(rng.integers(len(_GLANCES)))].format(detail=details[3]))
    second_action = sentence(_ACTION_TEMPLATES, subj=subject(), cue=cue(actions[1]), detail=details[3],
                             setting=settings[2], event=events[2])
    closing = sentence(_BODY_TEMPLATES, subj=subject(), cue=cue(bodies[1]), detail=details[2], setting=settings[0],
                       event=events[0])
    middle = [first_action, body, said, thought_line, second_action]
    text = " ".join([opener, *[middle[i] for i in rng.permutation(len(middle))], closing])
    return Document(doc_id=f"story/{concept.name}/{topic.topic}/{n}", text=text, label=concept.name,
                    topic=topic.topic, source="generated/story")


def neutral_dialogue(topic: Topic, k: int) -> Document:
    human, assistant = topic.dialogues[k]
    return Document(doc_id=f"neutral/{topic.topic}/{k}", text=f"Human: {human}\n\nAssistant: {assistant}",
                    label=NEUTRAL, topic=topic.topic, source="generated/neutral")


def implicit_scenarios(concept: Concept) -> list[Document]:
    """The concept's implicit scenarios as a user's turn, ending at the ':' after "Assistant" (where the study
    reads what the model is about to feel in its reply; the fit reads them there and pooled)."""
    return [Document(doc_id=f"implicit/{concept.name}/{i}", text=f"Human: {s}\n\nAssistant:", label=concept.name,
                     topic="", source="generated/implicit") for i, s in enumerate(concept.scenarios)]


def validate_story(text: str, concept: Concept) -> list[str]:
    """Problems that disqualify a story for `concept` (empty when it is fine)."""
    problems = []
    found = concept.forbidden_pattern.findall(text)
    if found:
        problems.append(f"names the concept: {sorted(set(f.lower() for f in found))}")
    words = len(text.split())
    if not MIN_WORDS <= words <= MAX_WORDS:
        problems.append(f"{words} words, outside {MIN_WORDS}..{MAX_WORDS}")
    if re.search(r"[{}]", text):
        problems.append("unfilled template slot")
    return problems


def generate(config: GeneratorConfig = GeneratorConfig(), catalogue: Catalogue | None = None) -> Iterator[Document]:
    """Every document of the built-in corpus, in a fixed order: stories, neutral dialogues, implicit scenarios."""
    catalogue = catalogue or load_catalogue()
    concepts = [catalogue.concept(n) for n in config.concepts] if config.concepts else list(catalogue.concepts)
    topics = catalogue.topics[: config.n_topics]
    for concept in concepts:
        for topic in topics:
            for n in range(config.stories_per_topic):
                yield story(concept, topic, n, config.seed, catalogue)
    for topic in topics:
        for k in range(min(config.neutral_per_topic, len(topic.dialogues))):
            yield neutral_dialogue(topic, k)
    if config.implicit:
        for concept in concepts:
            yield from implicit_scenarios(concept)
