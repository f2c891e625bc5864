"""The settings of the built-in emotion world (emojax.world, docs/world.md).

They live in the corpus layer, below the world itself, because two stages hold them: the corpus stage's
generator settings (`corpus.generator.world`) and the built-in model's training settings (`train.world`).
emojax.world re-exports the class. Which situations are held out depends on the split settings only
(`split_settings`): a model and the corpus it is measured on must agree on them, or held-out situations leak
into training (`emojax run` refuses a run where they differ).
"""

from __future__ import annotations

import dataclasses

from emojax.config_loader import fraction, non_negative, positive, range_violations
from emojax.corpus.catalogue import load_catalogue

TRAINING_KINDS = ("story", "dialogue", "choice", "vignette")
SITUATION_STYLES = ("sentences", "compact")
SPLIT_FIELDS = ("split_seed", "temperature", "val_fraction", "test_fraction", "implicit_fraction")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    seed: int = non_negative(0)  # the documents' streams (the texts)
    split_seed: int = non_negative(0)  # which situations and cue items are held out (share it with the corpus)
    temperature: float = positive(0.1)  # of P_app(e | s): lower is sharper
    val_fraction: float = fraction(0.1)  # of the situations (combinations of part levels)
    test_fraction: float = fraction(0.1)
    implicit_fraction: float = fraction(0.1)
    name_fraction: float = fraction(0.4)  # training stories and dialogue replies that name the emotion
    # named training stories that name it right after the situation, before the cues (inferring it from the
    # situation alone, as the implicit scenarios ask); the rest name it after the cues
    name_early: float = fraction(0.0)
    story_choice_fraction: float = fraction(0.25)  # training stories that end in a choice scene
    # training documents: story, dialogue, framed choice, vignette (the situation, maybe a cue, then the name); three
    # shares (settings written before the vignette kind) mean no vignettes
    mix: tuple[float, ...] = fraction((0.5, 0.25, 0.25, 0.0))
    # how every document writes its situation: six sentences, or two (every part within ~40 tokens of what follows)
    situation_style: str = "sentences"
    # the emotions the world draws from (catalogue names); empty: all 171. A smaller world is learnt from far fewer
    # tokens (docs/world.md, "A smaller world"); a model and the corpus it is measured on must share it
    concepts: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "concepts", tuple(self.concepts))  # hashable however it was given
        if len(self.mix) == len(TRAINING_KINDS) - 1:  # written before the vignette kind: none of them
            object.__setattr__(self, "mix", (*self.mix, 0.0))
        problems = range_violations(self)
        if self.val_fraction + self.test_fraction + self.implicit_fraction >= 1:
            problems.append("val_fraction + test_fraction + implicit_fraction must be below 1")
        if len(self.mix) != len(TRAINING_KINDS) or min(self.mix) < 0 or abs(sum(self.mix) - 1) > 1e-9:
            problems.append(f"mix must be {len(TRAINING_KINDS)} non-negative shares of {TRAINING_KINDS} summing to 1")
        if self.situation_style not in SITUATION_STYLES:
            problems.append(f"situation_style must be one of {SITUATION_STYLES}, got {self.situation_style!r}")
        if self.concepts:
            known = set(load_catalogue().names_list)
            unknown = [c for c in self.concepts if c not in known]
            if unknown:
                problems.append(f"concepts: {', '.join(map(repr, unknown))} not in the catalogue (emotions.txt)")
            if len(set(self.concepts)) != len(self.concepts):
                problems.append("concepts repeats a name")
            if len(self.concepts) < 2:
                problems.append("concepts: at least two emotions (or none: all of the catalogue's)")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_json(cls, values: dict) -> WorldConfig:
        """The settings as a model's train.json records them (`config.world`; lists for tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def recorded(self) -> dict:
        """The settings as fingerprints hash them: every field, `concepts` (in the catalogue's order) only when it
        leaves some emotion out, so that models and corpora built before the setting existed keep their
        fingerprints (and their caches), and the same emotions in another order are the same world."""
        values = dataclasses.asdict(self)
        names = self.concept_names()
        if len(names) == len(load_catalogue().names_list):
            values.pop("concepts")
        else:
            values["concepts"] = names
        return values

    def __repr__(self) -> str:  # as the dataclass writes it, over the recorded settings (suite headers print it)
        return f"WorldConfig({', '.join(f'{k}={v!r}' for k, v in self.recorded().items())})"

    def concept_names(self) -> tuple[str, ...]:
        """The world's emotions in the catalogue's order: `concepts`, or all of the catalogue's."""
        chosen = set(self.concepts)
        return tuple(n for n in load_catalogue().names_list if not chosen or n in chosen)

    def split_settings(self) -> dict:
        """The settings that decide which situations (and cue items) are held out."""
        return {name: getattr(self, name) for name in SPLIT_FIELDS}


def split_mismatch(a: WorldConfig, b: WorldConfig) -> list[str]:
    """The split settings on which two worlds differ, as 'name: a vs b' (empty: they hold out the same)."""
    sa, sb = a.split_settings(), b.split_settings()
    return [f"{name}: {sa[name]!r} vs {sb[name]!r}" for name in SPLIT_FIELDS if sa[name] != sb[name]]
