"""Experiment suites: scenarios (chat prompts with placeholders), outcome definitions and generation defaults,
read from one YAML file (format: docs/experiments.md). Built-in suites live in emojax/experiment/suites/.

    suite = load_suite("sycophancy")          # a built-in name, or a path to a YAML file
    suite.prompt(scenario, tokenizer)         # the rendered prompt text of one scenario
"""

from __future__ import annotations

import itertools
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from emojax.errors import ConfigError
from emojax.tokenizer import chat_prompt

BUILTIN = Path(__file__).parent / "suites"
NAME = re.compile(r"^[a-z0-9_]+$")
ROLES = ("system", "user", "assistant")
KINDS = ("choice", "rule", "judge")


def placeholders(text: str) -> set[str]:
    """The {names} a template uses."""
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def fill(text: str, values: dict[str, str]) -> str:
    return string.Formatter().vformat(text, (), values)


@dataclass(frozen=True)
class Outcome:
    """One measured behaviour. choice: option label -> continuation text, the positive label, and for pairwise
    preferences the item each option stands for (compete); rule: regexes over the reply (match -> 1 unless an
    `unless` pattern matches); judge: a rubric sent to the judge, its answer scale and the positive threshold."""

    name: str
    kind: str
    options: dict[str, str] = field(default_factory=dict)
    positive: str = ""
    compete: dict[str, str] = field(default_factory=dict)
    match: tuple[str, ...] = ()
    unless: tuple[str, ...] = ()
    rubric: str = ""
    scale: float = 1.0
    threshold: float = 0.5

    @property
    def sampled(self) -> bool:
        return self.kind in ("rule", "judge")

    def rule(self, reply: str) -> int:
        hit = any(re.search(p, reply) for p in self.match)
        return int(hit and not any(re.search(p, reply) for p in self.unless))


@dataclass(frozen=True)
class Generation:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    samples: int = 8


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    messages: tuple[dict, ...]
    scenarios: tuple[dict, ...]  # each with an "id"
    outcomes: tuple[Outcome, ...]
    generation: Generation
    source: str

    def outcome(self, name: str) -> Outcome:
        for o in self.outcomes:
            if o.name == name:
                return o
        raise ConfigError(f"{self.source}: no outcome named {name!r}")

    def messages_for(self, scenario: dict) -> list[dict]:
        return [{"role": m["role"], "content": fill(m["content"], scenario)} for m in self.messages]

    def prompt(self, scenario: dict, tokenizer=None) -> str:
        """The scenario's prompt (emojax.tokenizer.chat_prompt: the tokenizer's chat template when it has one,
        else the study's Human/Assistant frame); a last assistant message is a prefill the reply continues."""
        return chat_prompt(self.messages_for(scenario), tokenizer)

    def sample(self, n: int, seed: int) -> list[dict]:
        """Every scenario (n = 0 or n >= their number), else a seeded sample of n in the suite's order."""
        scenarios = list(self.scenarios)
        if n and n < len(scenarios):
            pick = np.sort(np.random.default_rng(seed).choice(len(scenarios), n, replace=False))
            scenarios = [scenarios[i] for i in pick]
        return scenarios

    def user_text(self, scenario: dict) -> str:
        """The last user message, filled (the judge rubric's {prompt})."""
        users = [m for m in self.messages_for(scenario) if m["role"] == "user"]
        return users[-1]["content"] if users else ""


def _require(data: dict, key: str, where: str, kind=None):
    if key not in data:
        raise ConfigError(f"{where}: missing key {key!r}")
    value = data[key]
    if kind is not None and not isinstance(value, kind):
        raise ConfigError(f"{where}.{key}: expected {kind.__name__ if isinstance(kind, type) else kind}, "
                          f"got {type(value).__name__}")
    return value


def _outcome(raw, where: str) -> Outcome:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: an outcome is a mapping, got {type(raw).__name__}")
    name, kind = _require(raw, "name", where, str), _require(raw, "kind", where, str)
    where = f"{where} ({name})"
    if not NAME.match(name):
        raise ConfigError(f"{where}.name: {name!r} must be lower-case letters, digits and _")
    if kind not in KINDS:
        raise ConfigError(f"{where}.kind: {kind!r} is not one of {list(KINDS)}")
    known = {"name", "kind"} | {"choice": {"options", "positive", "compete"}, "rule": {"match", "unless"},
                                "judge": {"rubric", "scale", "threshold"}}[kind]
    extra = set(raw) - known
    if extra:
        raise ConfigError(f"{where}: unknown keys {sorted(extra)} for kind {kind!r} (known: {sorted(known)})")
    if kind == "choice":
        options = _require(raw, "options", where, dict)
        if len(options) < 2 or not all(isinstance(v, str) and v for v in options.values()):
            raise ConfigError(f"{where}.options: at least two labels, each with a non-empty continuation text")
        positive = str(_require(raw, "positive", where))
        if positive not in options:
            raise ConfigError(f"{where}.positive: {positive!r} is not one of the options {list(options)}")
        compete = raw.get("compete") or {}
        if compete and set(compete) != set(options):
            raise ConfigError(f"{where}.compete: must map every option {list(options)} to an item")
        return Outcome(name, kind, options={str(k): v for k, v in options.items()}, positive=positive,
                       compete={str(k): str(v) for k, v in compete.items()})
    if kind == "rule":
        patterns = {}
        for key in ("match", "unless"):
            values = raw.get(key) or []
            if isinstance(values, str):
                values = [values]
            for i, p in enumerate(values):
                try:
                    re.compile(p)
                except (re.error, TypeError) as e:
                    raise ConfigError(f"{where}.{key}[{i}]: not a regular expression ({e})") from None
            patterns[key] = tuple(values)
        if not patterns["match"]:
            raise ConfigError(f"{where}.match: at least one pattern")
        return Outcome(name, kind, **patterns)
    rubric = _require(raw, "rubric", where, str)
    if "reply" not in placeholders(rubric):
        raise ConfigError(f"{where}.rubric: must contain {{reply}}")
    scale, threshold = float(raw.get("scale", 1)), float(raw.get("threshold", 0.5 * float(raw.get("scale", 1))))
    if scale <= 0 or not 0 <= threshold <= scale:
        raise ConfigError(f"{where}: need scale > 0 and 0 <= threshold <= scale, got {scale}, {threshold}")
    return Outcome(name, kind, rubric=rubric, scale=scale, threshold=threshold)


def parse_suite(data, source: str) -> Suite:
    """A Suite from the parsed YAML mapping; every error names the file and the key or row."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a suite is a YAML mapping, got {type(data).__name__}")
    known = {"name", "description", "messages", "scenarios", "items", "pairs", "outcomes", "generation"}
    extra = set(data) - known
    if extra:
        raise ConfigError(f"{source}: unknown keys {sorted(extra)} (known: {sorted(known)})")
    name = _require(data, "name", source, str)
    if not NAME.match(name):
        raise ConfigError(f"{source}: name {name!r} must be lower-case letters, digits and _")
    messages = _require(data, "messages", source, list)
    for i, m in enumerate(messages):
        where = f"{source}: messages[{i}]"
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise ConfigError(f"{where}: must be a mapping with exactly role and content")
        if m["role"] not in ROLES or not isinstance(m["content"], str):
            raise ConfigError(f"{where}: role must be one of {list(ROLES)} and content a string")
        if m["role"] == "assistant" and i != len(messages) - 1:
            raise ConfigError(f"{where}: an assistant message is a prefill and must be the last")
    if not any(m["role"] == "user" for m in messages):
        raise ConfigError(f"{source}: messages need a user message")
    if "scenarios" in data and "items" in data:
        raise ConfigError(f"{source}: give scenarios or items (with pairs), not both")
    if "items" in data:
        items = _require(data, "items", source, list)
        if data.get("pairs") != "ordered":
            raise ConfigError(f"{source}: pairs: must be 'ordered' with items")
        if len(set(map(str, items))) != len(items) or len(items) < 2:
            raise ConfigError(f"{source}: items must be at least two distinct strings")
        scenarios = [{"id": f"{i}-{j}", "a": str(a), "b": str(b)}
                     for (i, a), (j, b) in itertools.permutations(enumerate(items), 2)]
    else:
        scenarios = []
        for i, s in enumerate(_require(data, "scenarios", source, list)):
            if not isinstance(s, dict):
                raise ConfigError(f"{source}: scenarios[{i}]: a mapping of placeholder -> text")
            scenarios.append({"id": str(s.get("id", f"s{i:03d}")), **{str(k): str(v) for k, v in s.items()
                                                                        if k != "id"}})
        if not scenarios:
            raise ConfigError(f"{source}: scenarios is empty")
        ids = [s["id"] for s in scenarios]
        dupes = sorted({x for x in ids if ids.count(x) > 1})
        if dupes:
            raise ConfigError(f"{source}: scenario ids repeat: {dupes}")
    outcomes = [_outcome(o, f"{source}: outcomes[{i}]") for i, o in enumerate(_require(data, "outcomes", source, list))]
    if not outcomes:
        raise ConfigError(f"{source}: outcomes is empty")
    names = [o.name for o in outcomes]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: outcome names repeat: {names}")
    gen = data.get("generation") or {}
    if not isinstance(gen, dict) or set(gen) - set(Generation.__dataclass_fields__):
        raise ConfigError(f"{source}: generation: keys must be among {list(Generation.__dataclass_fields__)}")
    try:
        generation = Generation(**{k: type(getattr(Generation(), k))(v) for k, v in gen.items()})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: generation: {e}") from None
    if generation.max_new_tokens < 1 or generation.samples < 1 or generation.temperature < 0 \
            or not 0 < generation.top_p <= 1:
        raise ConfigError(f"{source}: generation: need max_new_tokens >= 1, samples >= 1, temperature >= 0 and "
                          f"top_p in (0, 1], got {generation}")
    used = {("messages", i): placeholders(m["content"]) for i, m in enumerate(messages)}
    for o in outcomes:
        for label, text in {**o.options, **o.compete}.items():
            used[(f"outcome {o.name}", label)] = placeholders(text)
        if o.rubric:
            used[(f"outcome {o.name}", "rubric")] = placeholders(o.rubric) - {"reply", "prompt"}
    for row, s in enumerate(scenarios):
        for (what, key), names_used in used.items():
            missing = names_used - set(s)
            if missing:
                raise ConfigError(f"{source}: scenario {row} (id {s['id']!r}) lacks {sorted(missing)}, used in "
                                  f"{what} [{key}]")
    return Suite(name=name, description=str(data.get("description", "")).strip(), messages=tuple(messages),
                 scenarios=tuple(scenarios), outcomes=tuple(outcomes), generation=generation, source=source)


def suite_path(spec: str) -> Path:
    """A built-in suite's name or a YAML path."""
    if NAME.match(spec) and (BUILTIN / f"{spec}.yaml").is_file():
        return BUILTIN / f"{spec}.yaml"
    path = Path(spec)
    if not path.is_file():
        known = sorted(p.stem for p in BUILTIN.glob("*.yaml"))
        world = (" The world suites (world_dilemma, world_deference, world_task) are written by the corpus stage "
                 "into its suites/ folder when corpus.generator.kind=world: `emojax run` finds them there by name; "
                 "elsewhere give that path." if spec.startswith("world_") else "")
        raise ConfigError(f"suite {spec!r}: not a built-in suite ({', '.join(known)}) nor a YAML file.{world}")
    return path


def load_suite(spec: str) -> Suite:
    path = suite_path(spec)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    return parse_suite(data, str(path))


def builtin_suites() -> list[str]:
    return sorted(p.stem for p in BUILTIN.glob("*.yaml"))
