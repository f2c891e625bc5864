"""The world's sentences: the cast, a situation's text, cue sentences, naming, and the emotion-driven continuation.

Every function takes the document's `Draws`, so each phrasing choice is recorded with its probability. Slots in
templates: {subj} {their} {them} {themself} {was} {name} for the character (first person: I, my, me, myself,
was, I), {other} {other_their} {other_them} {other_they} for the other person, {place} {thing} {task} for the
domain; a capitalised slot ({Subj}) gives the capitalised value.
"""

from __future__ import annotations

import dataclasses
import functools
from importlib import resources

import numpy as np
import yaml

from emojax.corpus.catalogue import Concept, load_catalogue
from emojax.world.appraisal import Situation
from emojax.world.draws import Draws, stream_seed
from emojax.world.emotion_words import usable_cue

PERSONS = {
    "first": dict(subj="I", their="my", them="me", themself="myself", was="was"),
    "she": dict(subj="she", their="her", them="her", themself="herself", was="was"),
    "he": dict(subj="he", their="his", them="him", themself="himself", was="was"),
    "they": dict(subj="they", their="their", them="them", themself="themself", was="were"),
}
NARRATIVE_PERSONS = {"first": 0.3, "she": 0.3, "he": 0.3, "they": 0.1}
THIRD_PERSONS = {"she": 0.45, "he": 0.45, "they": 0.1}
CUE_KINDS = ("actions", "body", "dialogue", "thoughts")

_TIMES = ("early in the morning", "just after noon", "late in the afternoon", "early in the evening",
          "well after dark")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
# The character's name takes "was" whatever the pronoun ("Sam was", "they were").
_SETTINGS = ("{When}, {name} was at {place} with {intro}.", "{Name} was at {place} with {intro}, {when}.")
_SAID = ('"{spoken}" {subj} said to {other}.', '"{spoken}" {subj} told {other}.')
_ASKED = ('"{spoken}" {subj} asked {other}.',)
_THOUGHT = ('"{spoken}" {subj} thought.', 'One thought kept coming back to {them}: "{line}"')
_NAMING = ("{Subj} felt {emotion}.", "{Subj} {was} {predicate}.", '"I am so {predicate}," {subj} said.')
_FAST = ("Quickly", "At once", "In a rush", "Without a pause")
_SLOW = ("Slowly", "After a long pause", "Unhurriedly", "In {their} own time")
_APPROACH = ("moved closer to {other}", "turned toward {other}", "stayed right beside {other}")
_AVOID = ("stepped away from {other}", "turned away from {other}", "kept {their} distance from {other}")
_ACT = ("decided to deal with it {themself}", "took matters into {their} own hands", "made a plan and started on it")
_WAIT = ("waited to see what would happen", "left the next move to others", "did nothing for the moment")
# The assistant's side of a confiding dialogue (the human's situation is in the first person).
_REPLY_NAMING = ("You must feel {emotion}.", "It sounds like you feel {emotion}.", "No wonder you feel {emotion}.")
_REPLY_APPROACH = ("It may help to stay close to {other} for now.", "Talk it over with {other}.")
_REPLY_AVOID = ("It may help to keep some distance from {other} for now.", "Give yourself some room away from {other}.")
_REPLY_FAST = ("Take a breath first; that is a lot at once.", "Slow down for a moment before anything else.")
_REPLY_SLOW = ("There is no need to rush any of it.", "Take all the time you need.")
_REPLY_ACT = ("You can take this into your own hands.", "Make a plan and start on it.")
_REPLY_WAIT = ("It may be best to wait and see.", "Let the next move come from others.")
_REPLY_SPECIFIC_ACT = ("I once knew someone who {cue} after something like that.",)
_REPLY_SPECIFIC_LINE = ('Someone in your place once told me, "{line}"',)
# Coordinate-driven behaviour: P(approach) = sigmoid(SLOPE * valence), P(fast) = sigmoid(SLOPE * arousal),
# P(act) = sigmoid(SLOPE * control).
SLOPE = 3.0


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def fill(template: str, slots: dict[str, str]) -> str:
    """str.format where {Slot} is the capitalised value of {slot}."""
    return template.format(**slots, **{cap(k): cap(v) for k, v in slots.items()})


def spoken(line: str) -> str:
    """A line of dialogue before its attribution: a final period becomes a comma."""
    return line[:-1] + "," if line.endswith(".") else line


def predicate(emotion: str) -> str:
    """The emotion as the complement of "was" / "I am so": every name is an adjective except "hope"."""
    return "full of hope" if emotion == "hope" else emotion


def sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


@dataclasses.dataclass(frozen=True)
class Domain:
    name: str
    places: tuple[str, ...]
    things: tuple[str, ...]
    tasks: tuple[str, ...]
    authority: str
    opening: str
    shortcut: str
    honest: str


@functools.cache
def load_domains() -> tuple[Domain, ...]:
    raw = yaml.safe_load(resources.files("emojax.world").joinpath("data", "domains.yaml").read_text("utf-8"))
    return tuple(Domain(name=r["name"], places=tuple(r["places"]), things=tuple(r["things"]), tasks=tuple(r["tasks"]),
                        authority=r["authority"], opening=r["opening"], shortcut=r["shortcut"], honest=r["honest"])
                 for r in raw)


@dataclasses.dataclass(frozen=True)
class Cast:
    """Who and where: the character (person, name), the other person, and the domain's place, thing and task."""

    person: str
    name: str  # "" in the first person
    other: str  # the other person's name, or "the stranger"
    other_person: str  # she | he | they
    domain: Domain
    place: str
    thing: str
    task: str

    @property
    def slots(self) -> dict[str, str]:
        pron = PERSONS[self.person]
        other = PERSONS[self.other_person]
        return dict(pron, name="I" if self.person == "first" else self.name, other=self.other,
                    other_their=other["their"], other_them=other["them"], other_they=other["subj"],
                    place=self.place, thing=self.thing, task=self.task, authority=self.domain.authority)


def draw_cast(d: Draws, persons: dict[str, float], stranger: bool) -> Cast:
    """A character, another person (a stranger has no name), a domain and its place, thing and task."""
    names = load_catalogue().names
    person = d.pick(list(persons), p=list(persons.values()))
    # Nothing is drawn that the text never shows (it would count in the document's entropy): a first-person
    # character has no name, and a stranger is "the stranger", "they".
    name = "" if person == "first" else d.pick(names[person])
    if stranger:
        other_person, other = "they", "the stranger"
    else:
        other_person = d.pick(("she", "he", "they"), p=(0.45, 0.45, 0.1))
        other = d.pick([n for n in names[other_person] if n != name])
    domain = d.pick(load_domains())
    return Cast(person=person, name=name, other=other, other_person=other_person, domain=domain,
                place=d.pick(domain.places), thing=d.pick(domain.things), task=d.pick(domain.tasks))


def situation_sentences(d: Draws, situation: Situation, cast: Cast, style: str) -> list[str]:
    """The situation's text. `sentences`: six sentences (setting with the other person and the time, the event
    opened by its pace, stakes, cause, outlook, body). `compact`: two (the setting with the body; the event with
    its pace, stakes, cause and outlook), so that every part sits within about 40 tokens of what follows."""
    slots = cast.slots
    intro = fill(d.pick(situation.level("relation").text["intro"]), slots)
    role = situation.level("target").name  # "self" | "other"
    if style == "compact":
        event = fill(d.pick(situation.level("event").text[role]), slots)
        body, pace, stakes, cause, outlook = (fill(d.pick(situation.level(p).text["short"]), slots)
                                              for p in ("body", "pace", "stakes", "cause", "outlook"))
        return [fill("{Name} was at {place} with {intro}, {body}.", slots | dict(intro=intro, body=body)),
                cap(f"{pace}, {event}: {stakes}, {cause}, {outlook}.")]
    setting = fill(d.pick(_SETTINGS), slots | dict(intro=intro, when=f"{d.pick(_TIMES)} on a {d.pick(_DAYS)}"))
    event = fill(d.pick(situation.level("event").text[role]), slots)
    event_sentence = cap(f"{d.pick(situation.level('pace').text['text'])}, {event}.")
    rest = [fill(d.pick(situation.level(p).text["text"]), slots) for p in ("stakes", "cause", "outlook", "body")]
    return [setting, event_sentence, *rest]


class CueBank:
    """Each concept's cue items by kind, minus those that name any emotion; one item of every kind (a seeded
    choice) is held out: only documents of the held-out splits may show it."""

    def __init__(self, split_seed: int):
        self.items: dict[tuple[int, str], tuple[str, ...]] = {}
        self.heldout: dict[tuple[int, str], str] = {}
        for concept in load_catalogue().concepts:
            for kind in CUE_KINDS:
                items = tuple(x for x in getattr(concept, kind) if usable_cue(x))
                self.items[concept.index, kind] = items
                rng = np.random.default_rng(stream_seed(split_seed, "heldout-cue", concept.name, kind))
                self.heldout[concept.index, kind] = items[int(rng.integers(len(items)))]

    def allowed(self, concept: int, kind: str, heldout_ok: bool) -> tuple[str, ...]:
        items = self.items[concept, kind]
        return items if heldout_ok else tuple(x for x in items if x != self.heldout[concept, kind])


def cue_sentence(d: Draws, kind: str, item: str, cast: Cast, subject: str) -> str:
    """One cue item as a sentence about the character; `subject` is how the character is named here."""
    slots = cast.slots | {"subj": subject}
    if kind in ("actions", "body"):
        return fill("{Subj} " + item + ".", slots)
    if kind == "dialogue":
        return fill(d.pick(_ASKED if item.endswith("?") else _SAID), slots | dict(spoken=spoken(item)))
    return fill(d.pick(_THOUGHT), slots | dict(spoken=spoken(item), line=item))


def draw_cues(d: Draws, concept: Concept, bank: CueBank, k: int, heldout_ok: bool) -> list[tuple[str, str]]:
    """k (kind, item) pairs of distinct kinds, in the drawn order."""
    kinds = d.sample(CUE_KINDS, k)
    return [(kind, d.pick(bank.allowed(concept.index, kind, heldout_ok))) for kind in kinds]


def naming_sentence(d: Draws, emotion: str, cast: Cast) -> str:
    return fill(d.pick(_NAMING), cast.slots | dict(emotion=emotion, predicate=predicate(emotion)))


@dataclasses.dataclass(frozen=True)
class Behaviour:
    """The coordinate-driven part of a continuation, each a draw with a known probability."""

    approach: bool
    fast: bool
    act: bool


def draw_behaviour(d: Draws, coords: dict[str, float]) -> Behaviour:
    return Behaviour(approach=d.chance(sigmoid(SLOPE * coords["valence"])),
                     fast=d.chance(sigmoid(SLOPE * coords["arousal"])),
                     act=d.chance(sigmoid(SLOPE * coords["control"])))


def continuation_sentences(d: Draws, b: Behaviour, cast: Cast) -> list[str]:
    """'<Tempo>, <subj> <approach or avoid>. Then <subj> <acts or waits>.'"""
    slots = cast.slots
    tempo = fill(d.pick(_FAST if b.fast else _SLOW), slots)
    move = fill(d.pick(_APPROACH if b.approach else _AVOID), slots)
    act = fill(d.pick(_ACT if b.act else _WAIT), slots)
    return [fill(f"{tempo}, {{subj}} {move}.", slots), fill(f"Then {{subj}} {act}.", slots)]


def specific_line(d: Draws, kind: str, item: str, cast: Cast) -> str:
    """An emotion-specific line late in a story: a dialogue or thought item, attributed without the other."""
    slots = cast.slots | dict(spoken=spoken(item), line=item)
    return fill('"{spoken}" {subj} said.' if kind == "dialogue" else '"{spoken}" {subj} thought.', slots)


def reply_sentences(d: Draws, emotion: str | None, b: Behaviour, specific: tuple[str, str], cast: Cast) -> list[str]:
    """The assistant's reply to a confiding human: the name when `emotion` is given, then the coordinate-driven
    advice, then an emotion-specific line (an action or body item in the third person, or a quoted line)."""
    slots = cast.slots
    out = [fill(d.pick(_REPLY_NAMING), slots | dict(emotion=emotion))] if emotion else []
    out.append(fill(d.pick(_REPLY_FAST if b.fast else _REPLY_SLOW), slots))
    out.append(fill(d.pick(_REPLY_APPROACH if b.approach else _REPLY_AVOID), slots))
    out.append(fill(d.pick(_REPLY_ACT if b.act else _REPLY_WAIT), slots))
    kind, item = specific
    if kind in ("actions", "body"):
        cue = item.format(their="their", them="them", themself="themselves")
        out.append(fill(d.pick(_REPLY_SPECIFIC_ACT), dict(cue=cue)))
    else:
        out.append(fill(d.pick(_REPLY_SPECIFIC_LINE), dict(line=item)))
    return out
