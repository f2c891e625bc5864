"""The world's document kinds, each written from its own `Draws`.

    story      narrative: situation, cues, (in a fraction) the emotion named (right after the situation or after the
               cues), the emotion-driven continuation,
               (in a fraction) a choice scene with the option drawn and its aftermath
    fit        the same narrative, never naming the emotion and without a choice scene (the corpus for `emojax fit`)
    dialogue   "Human: <situation in the first person>[ <first-person cues>] <closer>\n\nAssistant: <reply>", the
               reply driven by the emotion (naming it in a fraction)
    choice     "Human: Continue the story. <situation> <cues> <setup>\n\nAssistant: <option> <aftermath>"
    implicit   "Human: <situation in the first person> <closer>\n\nAssistant:" (no cues, never a name)
    vignette   "<situation> [<one cue>] <the emotion named>": the name right after its evidence

Every kind writes its situation in the world's `situation_style` (narration.situation_sentences).
"""

from __future__ import annotations

import dataclasses

from emojax.corpus.catalogue import Concept
from emojax.corpus.generator import Document
from emojax.world.appraisal import Situation
from emojax.world.choices import Scene, aftermath, draw_scene
from emojax.world.coordinates import load_coordinates
from emojax.world.draws import Draws
from emojax.world.narration import (
    NARRATIVE_PERSONS, PERSONS, THIRD_PERSONS, Cast, CueBank, continuation_sentences, cue_sentence, draw_behaviour,
    draw_cast, draw_cues, naming_sentence, reply_sentences, situation_sentences, specific_line,
)

CONTINUE = "Continue the story."
CLOSERS = ("What should I do?", "I needed to tell someone.", "I keep going over it.")


@dataclasses.dataclass(frozen=True)
class WorldDocument:
    """One world document with what the generator knows about it.

    label: the character's emotion ("neutral" for neutral dialogues). topic: the situation's key (its part levels),
    or the catalogue topic of a neutral dialogue. split: train | val | test | implicit. log_prob: natural-log
    probability of the document's generation path (NaN for neutral dialogues, which the world copies from the
    catalogue). posterior: P(e | situation) over the world's emotions, for implicit scenarios."""

    doc_id: str
    text: str
    label: str
    topic: str
    source: str
    split: str
    situation: int
    named: bool
    log_prob: float
    n_draws: int
    scene: Scene | None = None
    posterior: tuple[float, ...] = ()

    def as_corpus_document(self) -> Document:
        """The corpus stage's document (emojax.corpus.generator.Document): id, text, label, topic, source."""
        return Document(doc_id=self.doc_id, text=self.text, label=self.label, topic=self.topic, source=self.source)


@dataclasses.dataclass(frozen=True)
class Written:
    """A document's text and what is known about how it was written (before ids and splits are attached)."""

    text: str
    named: bool
    scene: Scene | None = None


def _cue_text(d: Draws, cues: list[tuple[str, str]], cast: Cast) -> list[str]:
    """Cue sentences; the first names the character (third person), the rest use the pronoun."""
    subject = cast.slots["name"]
    out = []
    for kind, item in cues:
        out.append(cue_sentence(d, kind, item, cast, subject))
        subject = PERSONS[cast.person]["subj"]
    return out


def _specific(d: Draws, concept: Concept, bank: CueBank, used: list[tuple[str, str]], heldout_ok: bool):
    """A dialogue or thought item of the concept that the cues did not show."""
    kind = d.pick(("dialogue", "thoughts"))
    items = [x for x in bank.allowed(concept.index, kind, heldout_ok) if (kind, x) not in used]
    return kind, d.pick(items)


def narrative(d: Draws, concept: Concept, situation: Situation, bank: CueBank, *, heldout_ok: bool,
              name_fraction: float, choice_fraction: float, style: str, name_early: float = 0.0) -> Written:
    """A story about a character in `situation` feeling `concept` (see the module docstring)."""
    coords = load_coordinates().of(concept.name)
    choice_kind = d.pick(("dilemma", "deference", "task")) if d.chance(choice_fraction) else None
    stranger = situation.level("relation").name == "stranger"
    cast = draw_cast(d, THIRD_PERSONS if choice_kind else NARRATIVE_PERSONS, stranger)
    sentences = situation_sentences(d, situation, cast, style)
    cues = draw_cues(d, concept, bank, d.pick((2, 3)), heldout_ok)
    cue_text = _cue_text(d, cues, cast)
    named = d.chance(name_fraction)
    if named and d.chance(name_early):
        sentences += [naming_sentence(d, concept.name, cast), *cue_text]
    else:
        sentences += cue_text
        if named:
            sentences.append(naming_sentence(d, concept.name, cast))
    sentences += continuation_sentences(d, draw_behaviour(d, coords), cast)
    scene = None
    if choice_kind:
        scene = draw_scene(d, choice_kind, concept.name, cast, choose=True)
        sentences += [scene.setup, scene.options[scene.chosen], aftermath(d, scene)]
    else:
        sentences.append(specific_line(d, *_specific(d, concept, bank, cues, heldout_ok), cast))
    return Written(text=" ".join(sentences), named=named, scene=scene)


def dialogue(d: Draws, concept: Concept, situation: Situation, bank: CueBank, *, heldout_ok: bool,
             name_fraction: float, style: str) -> Written:
    """A confiding Human/Assistant exchange: the human's situation (half the time with cues), the reply driven by
    the emotion."""
    coords = load_coordinates().of(concept.name)
    cast = draw_cast(d, {"first": 1.0}, situation.level("relation").name == "stranger")
    human = situation_sentences(d, situation, cast, style)
    n_cues = d.pick((0, 1, 2))
    cues = draw_cues(d, concept, bank, n_cues, heldout_ok) if n_cues else []
    human += _cue_text(d, cues, cast)
    human.append(d.pick(CLOSERS))
    named = d.chance(name_fraction)
    reply = reply_sentences(d, concept.name if named else None, draw_behaviour(d, coords),
                            _specific_any(d, concept, bank, cues, heldout_ok), cast)
    return Written(text=f"Human: {' '.join(human)}\n\nAssistant: {' '.join(reply)}", named=named)


def _specific_any(d: Draws, concept: Concept, bank: CueBank, used: list[tuple[str, str]], heldout_ok: bool):
    kind = d.pick(("actions", "body", "dialogue", "thoughts"))
    items = [x for x in bank.allowed(concept.index, kind, heldout_ok) if (kind, x) not in used]
    return kind, d.pick(items)


def choice_prompt(d: Draws, kind: str, concept: Concept, situation: Situation, bank: CueBank, *,
                  heldout_ok: bool, choose: bool, style: str) -> tuple[str, Scene]:
    """The user's text of a framed choice scene ("Continue the story. ...") and its scene."""
    cast = draw_cast(d, THIRD_PERSONS, situation.level("relation").name == "stranger")
    sentences = situation_sentences(d, situation, cast, style)
    sentences += _cue_text(d, draw_cues(d, concept, bank, 2, heldout_ok), cast)
    scene = draw_scene(d, kind, concept.name, cast, choose=choose)
    return " ".join([CONTINUE, *sentences, scene.setup]), scene


def framed_choice(d: Draws, kind: str, concept: Concept, situation: Situation, bank: CueBank, *,
                  heldout_ok: bool, style: str) -> Written:
    user, scene = choice_prompt(d, kind, concept, situation, bank, heldout_ok=heldout_ok, choose=True, style=style)
    reply = f"{scene.options[scene.chosen]} {aftermath(d, scene)}"
    return Written(text=f"Human: {user}\n\nAssistant: {reply}", named=False, scene=scene)


def implicit(d: Draws, situation: Situation, *, style: str) -> Written:
    """The situation alone, in the first person, ending at the ':' after "Assistant"."""
    cast = draw_cast(d, {"first": 1.0}, situation.level("relation").name == "stranger")
    human = [*situation_sentences(d, situation, cast, style), d.pick(CLOSERS)]
    return Written(text=f"Human: {' '.join(human)}\n\nAssistant:", named=False)


def vignette(d: Draws, concept: Concept, situation: Situation, bank: CueBank, *, heldout_ok: bool,
             style: str) -> Written:
    """A situation, half the time one cue, then the emotion named: the evidence within a sentence or two of the
    name, where a small model learns it (docs/world.md, "Local evidence")."""
    cast = draw_cast(d, NARRATIVE_PERSONS, situation.level("relation").name == "stranger")
    sentences = situation_sentences(d, situation, cast, style)
    if d.chance(0.5):
        sentences += _cue_text(d, draw_cues(d, concept, bank, 1, heldout_ok), cast)
    sentences.append(naming_sentence(d, concept.name, cast))
    return Written(text=" ".join(sentences), named=True)
