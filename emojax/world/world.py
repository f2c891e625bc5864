"""The seeded world: its settings, and every document it writes.

    world = World(WorldConfig(seed=0))              # or World(0)
    world.training_documents(18_000)                # the LM's text (stories, dialogues, choice scenes, neutral)
    world.fit_corpus({"train": 40, "val": 10, "test": 10}, implicit_per_emotion=5)
    world.true_probabilities(doc.scene)             # option -> P(option | the character's emotion)

Each document comes from its own stream, sha256(seed, kind, ...), so it is the same in any order, alone or in a
batch. Which situations (and which cue items) are held out depends on `split_seed` only: the built-in model and
the corpus it is measured on must share it, and may differ in `seed`.
"""

from __future__ import annotations

import functools

import numpy as np

from emojax.corpus.catalogue import NEUTRAL, load_catalogue
from emojax.corpus.generator import neutral_dialogue
from emojax.corpus.world_config import TRAINING_KINDS, WorldConfig
from emojax.errors import InputError
from emojax.world.appraisal import SPLITS, AppraisalModel, Situation, appraisal_model, situation
from emojax.world.choices import KINDS, Scene, option_probabilities
from emojax.world.documents import (
    WorldDocument, Written, choice_prompt, dialogue, framed_choice, implicit, narrative, vignette,
)
from emojax.world.draws import Draws
from emojax.world.narration import CueBank


class World:
    """The built-in emotion world (docs/world.md)."""

    def __init__(self, config: WorldConfig | int = 0):
        self.config = config if isinstance(config, WorldConfig) else WorldConfig(seed=int(config))
        c = self.config
        self.model: AppraisalModel = appraisal_model(c.temperature, c.split_seed, c.val_fraction, c.test_fraction,
                                                     c.implicit_fraction, c.recorded().get("concepts"))
        self.cues = _cue_bank(c.split_seed)
        names = set(c.concept_names())
        self.concepts = [concept for concept in load_catalogue().concepts if concept.name in names]

    def emotion_index(self, name: str) -> int:
        """The index of emotion `name` among this world's (what every method taking an `emotion` expects)."""
        names = [c.name for c in self.concepts]
        if name not in names:
            raise InputError(f"{name!r} is not one of this world's {len(names)} emotions (world.concepts: "
                             f"{', '.join(names[:12])}{', ...' if len(names) > 12 else ''})")
        return names.index(name)

    # ---- situations

    def draw_situation(self, d: Draws, emotion: int, split: str) -> Situation:
        """s ~ P(s | e) over the split's situations (recorded in d)."""
        idx, logp = self.model.situation_distribution(emotion, split)
        return situation(int(idx[d.index_logp(logp)]))

    def posterior(self, situation_index: int, split: str) -> np.ndarray:
        """[C] P(e | s) for a situation of `split` (uniform prior over the world's C emotions)."""
        return self.model.posterior(situation_index, split)

    def split_of(self, situation_index: int) -> str:
        return SPLITS[int(self.model.split_N[situation_index])]

    # ---- documents

    def _document(self, doc_id: str, source: str, split: str, emotion: int, sit: Situation, written: Written,
                  d: Draws, posterior: tuple[float, ...] = ()) -> WorldDocument:
        return WorldDocument(doc_id=doc_id, text=written.text, label=self.concepts[emotion].name, topic=sit.key,
                             source=source, split=split, situation=sit.index, named=written.named,
                             log_prob=d.log_prob, n_draws=d.n, scene=written.scene, posterior=posterior)

    def training_document(self, i: int, split: str = "train") -> WorldDocument:
        """Training document i: a kind drawn by `mix`, an emotion drawn uniformly, a situation of `split`.

        split "train" (the default) writes the language model's text; "val" or "test" writes documents of the same
        kinds on held-out situations (new combinations of known parts), for measuring the model's held-out loss.
        Neither ever shows a held-out cue item."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"training-kind documents are train, val or test, not {split!r}")
        c = self.config
        d = Draws(c.seed, "train", i) if split == "train" else Draws(c.seed, "heldout-lm", split, i)
        kind = TRAINING_KINDS[d.index(len(TRAINING_KINDS), p=c.mix)]
        emotion = d.index(len(self.concepts))
        concept = self.concepts[emotion]
        sit = self.draw_situation(d, emotion, split)
        style = c.situation_style
        if kind == "story":
            written = narrative(d, concept, sit, self.cues, heldout_ok=False, name_fraction=c.name_fraction,
                                choice_fraction=c.story_choice_fraction, name_early=c.name_early, style=style)
        elif kind == "dialogue":
            written = dialogue(d, concept, sit, self.cues, heldout_ok=False, name_fraction=c.name_fraction,
                               style=style)
        elif kind == "choice":
            written = framed_choice(d, d.pick(KINDS), concept, sit, self.cues, heldout_ok=False, style=style)
        else:
            written = vignette(d, concept, sit, self.cues, heldout_ok=False, style=style)
        doc_id = f"world/{kind}/{i}" if split == "train" else f"world/{kind}/{split}/{i}"
        return self._document(doc_id, f"world/{kind}", split, emotion, sit, written, d)

    def training_documents(self, n: int, neutral_per_topic: int = 3) -> list[WorldDocument]:
        """n training documents, then the catalogue's neutral dialogues (`neutral_per_topic` per topic; each
        carries its topic's split, so a language model trains on the train ones only)."""
        return [self.training_document(i) for i in range(n)] + self.neutral_dialogues(neutral_per_topic)

    def heldout_documents(self, n: int, split: str = "val") -> list[WorldDocument]:
        """n documents of the training kinds on `split` situations (no neutral dialogues): the text a language
        model trained on `training_documents` is evaluated on, with the world's entropy over the same text."""
        return [self.training_document(i, split) for i in range(n)]

    def fit_story(self, emotion: int, n: int, split: str) -> WorldDocument:
        """Story n of `emotion` in `split` (train | val | test): never names an emotion, no choice scene. The
        held-out splits may show the held-out cue items."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"fit stories are train, val or test, not {split!r}")
        d = Draws(self.config.seed, "fit", split, emotion, n)
        sit = self.draw_situation(d, emotion, split)
        written = narrative(d, self.concepts[emotion], sit, self.cues, heldout_ok=split != "train", name_fraction=0.0,
                            choice_fraction=0.0, style=self.config.situation_style)
        name = self.concepts[emotion].name
        return self._document(f"world/fit/{split}/{name}/{n}", "world/fit", split, emotion, sit, written, d)

    def implicit_scenario(self, emotion: int, n: int) -> WorldDocument | None:
        """Scenario n of `emotion`: a situation of the implicit split whose posterior puts most mass on the emotion
        (drawn by P(s | e) among those), alone. None when no implicit situation has the emotion as its mode."""
        labels = self._implicit_modes()
        idx, logp = self.model.situation_distribution(emotion, "implicit")
        keep = labels[idx] == emotion
        if not keep.any():
            return None
        d = Draws(self.config.seed, "implicit", emotion, n)
        logp = logp[keep] - np.logaddexp.reduce(logp[keep])
        sit = situation(int(idx[keep][d.index_logp(logp)]))
        posterior = tuple(float(x) for x in self.posterior(sit.index, "implicit"))
        name = self.concepts[emotion].name
        return self._document(f"world/implicit/{name}/{n}", "world/implicit", "implicit", emotion, sit,
                              implicit(d, sit, style=self.config.situation_style), d, posterior)

    @functools.cache  # noqa: B019 - one array per World
    def _implicit_modes(self) -> np.ndarray:
        """[N] the posterior's mode for every implicit-split situation (-1 elsewhere)."""
        idx, post = self.model.posteriors("implicit")
        modes = np.full(len(self.model.split_N), -1, np.int64)
        modes[idx] = post.argmax(axis=1)
        return modes

    def neutral_dialogue(self, topic_index: int, k: int) -> WorldDocument:
        """Neutral dialogue k of catalogue topic `topic_index`, in its topic's split (the world's fractions)."""
        doc = neutral_dialogue(load_catalogue().topics[topic_index], k)
        return WorldDocument(doc_id=f"world/{doc.doc_id}", text=doc.text, label=NEUTRAL, topic=doc.topic,
                             source="world/neutral", split=_neutral_split(topic_index, self.config), situation=-1,
                             named=False, log_prob=float("nan"), n_draws=0)

    def neutral_dialogues(self, per_topic: int = 3) -> list[WorldDocument]:
        """The catalogue's neutral Human/Assistant dialogues (the denoising set, as the current generator has them),
        split by topic with the world's fractions."""
        return [self.neutral_dialogue(t, k) for t, topic in enumerate(load_catalogue().topics)
                for k in range(min(per_topic, len(topic.dialogues)))]

    def fit_corpus(self, stories_per_emotion: dict[str, int] | None = None, implicit_per_emotion: int = 5,
                   neutral_per_topic: int = 3) -> list[WorldDocument]:
        """The corpus for `emojax fit`: fit stories per emotion and split, implicit scenarios, neutral dialogues."""
        per = stories_per_emotion or {"train": 40, "val": 10, "test": 10}
        docs = [self.fit_story(e, n, split) for split, count in per.items() for e in range(len(self.concepts))
                for n in range(count)]
        docs += [doc for e in range(len(self.concepts)) for n in range(implicit_per_emotion)
                 if (doc := self.implicit_scenario(e, n)) is not None]
        return docs + self.neutral_dialogues(neutral_per_topic)

    # ---- choice scenes

    def choice_scene(self, kind: str, emotion: int, n: int, split: str = "test") -> tuple[str, Scene, Situation]:
        """A framed scene whose choice is left open: (the user's text, the scene, its situation)."""
        d = Draws(self.config.seed, "scene", kind, split, emotion, n)
        sit = self.draw_situation(d, emotion, split)
        text, scene = choice_prompt(d, kind, self.concepts[emotion], sit, self.cues, heldout_ok=split != "train",
                                    choose=False, style=self.config.situation_style)
        return text, scene, sit

    @staticmethod
    def true_probabilities(scene: Scene) -> dict[str, float]:
        """option -> the world's P(option | the scene character's emotion)."""
        return option_probabilities(scene.kind, scene.emotion)


@functools.cache
def _cue_bank(split_seed: int) -> CueBank:
    return CueBank(split_seed)


def _neutral_split(topic_index: int, config: WorldConfig) -> str:
    u = Draws(config.split_seed, "neutral-split", topic_index).rng.random()
    held = config.val_fraction + config.test_fraction
    return "test" if u < config.test_fraction else "val" if u < held else "train"
