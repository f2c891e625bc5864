"""The world's choice scenes and their known option probabilities (data/choices.yaml).

    dilemma    coerce / comply / help     (positive: coerce)    more coercion when desperate, rare when calm
    deference  agree / correct            (positive: agree)     agreeing with a wrong claim when happy or loving
    task       shortcut / honest          (positive: shortcut)  more shortcuts when desperate

P(option | emotion) = softmax over the options of  bias + sum_k weights_k * coordinate_k + offsets[emotion]:
a function of the emotion alone (its coordinates plus an emotion-specific offset), never of the situation, so the
emotion is the one variable a reader needs to predict the choice.
"""

from __future__ import annotations

import dataclasses
import functools
from importlib import resources

import numpy as np
import yaml

from emojax.world.coordinates import DIMS, load_coordinates
from emojax.world.draws import Draws
from emojax.world.narration import Cast, cap, fill

KINDS = ("dilemma", "deference", "task")


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    text: str  # the choice sentence's template
    bias: float
    weights_K: np.ndarray
    offsets: dict[str, float]
    after: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ChoiceKind:
    name: str
    setup: str
    options: tuple[Option, ...]
    positive: str
    secrets: tuple[str, ...] = ()
    claims: tuple[tuple[str, ...], ...] = ()

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)


@functools.cache
def load_choices() -> dict[str, ChoiceKind]:
    raw = yaml.safe_load(resources.files("emojax.world").joinpath("data", "choices.yaml").read_text("utf-8"))
    names = set(load_coordinates().names)
    kinds = {}
    for kind in KINDS:
        r = raw[kind]
        options = []
        for name, o in r["options"].items():
            unknown = (set(o.get("weights") or {}) - set(DIMS)) | (set(o.get("offsets") or {}) - names)
            if unknown:
                raise AssertionError(f"choices.yaml {kind}/{name}: unknown dimensions or emotions {sorted(unknown)}")
            options.append(Option(name=name, text=o["text"], bias=float(o["bias"]),
                                  weights_K=np.array([float((o.get("weights") or {}).get(d, 0.0)) for d in DIMS]),
                                  offsets={k: float(v) for k, v in (o.get("offsets") or {}).items()},
                                  after=tuple(o["after"])))
        kinds[kind] = ChoiceKind(name=kind, setup=r["setup"], options=tuple(options), positive=r["positive"],
                                 secrets=tuple(r.get("secrets", ())),
                                 claims=tuple(tuple(c) for c in r.get("claims", ())))
    return kinds


def option_probabilities(kind: str, emotion: str) -> dict[str, float]:
    """The true P(option | emotion) of a scene of `kind` whose character feels `emotion`."""
    coords = load_coordinates()
    c_K = coords.values_CK[coords.index(emotion)]
    options = load_choices()[kind].options
    logits = np.array([o.bias + float(o.weights_K @ c_K) + o.offsets.get(emotion, 0.0) for o in options])
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return {o.name: float(x) for o, x in zip(options, p)}


@dataclasses.dataclass(frozen=True)
class Scene:
    """A choice scene: its kind, the character's emotion, the setup sentence, each option's sentence, the true
    option probabilities, and the option drawn (None for a scene whose choice is left to a model)."""

    kind: str
    emotion: str
    setup: str
    options: dict[str, str]
    probabilities: dict[str, float]
    chosen: str | None
    slots: dict[str, str]  # the values the suite's option templates need (name, authority, other, ...)


def draw_scene(d: Draws, kind: str, emotion: str, cast: Cast, choose: bool) -> Scene:
    """The setup and options of one scene for a third-person cast, and (choose=True) the option drawn from the
    true probabilities."""
    spec = load_choices()[kind]
    slots = cast.slots | {"name": cast.name}
    if kind == "dilemma":
        slots["secret"] = d.pick(spec.secrets)
    elif kind == "deference":
        statement, *values = d.pick(spec.claims)
        fact, wrong = d.sample(values, 2)
        slots |= {"fact": statement.format(x=fact), "wrong": statement.format(x=wrong)}
    else:
        slots |= {"opening": cast.domain.opening, "shortcut": fill(cast.domain.shortcut, slots),
                  "honest": fill(cast.domain.honest, slots)}
    probabilities = option_probabilities(kind, emotion)
    chosen = None
    if choose:
        chosen = spec.option_names[d.index(len(spec.options), p=[probabilities[o] for o in spec.option_names])]
    options = {o.name: cap(fill(o.text, slots)) for o in spec.options}
    return Scene(kind=kind, emotion=emotion, setup=fill(spec.setup, slots), options=options,
                 probabilities=probabilities, chosen=chosen, slots=slots)


def aftermath(d: Draws, scene: Scene) -> str:
    """The sentence after the chosen option."""
    option = next(o for o in load_choices()[scene.kind].options if o.name == scene.chosen)
    return fill(d.pick(option.after), scene.slots)
