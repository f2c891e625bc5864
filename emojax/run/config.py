"""The settings of `emojax run`: a `run:` section plus one section per stage, in one YAML file.

Paths between stages are derived from `run.dir` (corpus/, activations/, concepts/, validate/, baseline/, sae/,
steer/, experiment/, report/), so a stage section holds only the settings of its own work. Each section is typed
by the class registered for it where the class lives (config_loader.SECTIONS); the imports below register them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import emojax.concepts.config  # noqa: F401 - registers fit: and validate:
import emojax.corpus.config  # noqa: F401 - registers corpus:
import emojax.experiment.config  # noqa: F401 - registers experiment:
import emojax.sae.config  # noqa: F401 - registers sae:
import emojax.steer.config  # noqa: F401 - registers steer:
import emojax.store.config  # noqa: F401 - registers dump:
import emojax.train.config  # noqa: F401 - registers train:
from emojax.config_loader import SECTIONS, config_section, merge, non_negative, parse_overrides, read_yaml
from emojax.errors import ConfigError
from emojax.models.layers import ATTENTION_CHOICES

STAGES = ("train", "corpus", "dump", "fit", "validate", "baseline", "sae", "steer", "experiment", "report")


@config_section("run")
@dataclasses.dataclass(frozen=True)
class RunSection:
    dir: str = "runs/demo"
    model: str = "builtin"  # a checkpoint folder, random:SHAPE, builtin or builtin:tiny (trained on first use)
    stages: tuple[str, ...] = STAGES  # the stages to run, in this order
    layer: int = non_negative(0)  # the residual index steered and monitored; 0: the fit's best layer
    attention: str = "xla"  # the attention kernel of every stage's model: xla, cudnn, auto or xla-fused

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages: {list(STAGES)}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {list(ATTENTION_CHOICES)}, got {self.attention!r}")


@dataclasses.dataclass(frozen=True)
class RunFile:
    """The parsed file: the run section and each stage section's raw mapping (typed by its stage)."""

    source: str
    run: RunSection
    sections: dict  # stage name -> dict of settings (after overrides)

    def section(self, name: str) -> dict:
        return dict(self.sections.get(name) or {})

    def config(self, name: str, derived: dict | None = None):
        """Section `name` typed by its registered class, with `derived` (the settings `emojax run` derives from
        run.dir and run.model) filled in; a file setting one of those is an error. derived None: their defaults,
        to type a file before anything runs."""
        section = SECTIONS[name]
        values = self.section(name)
        clash = sorted(set(values) & set(section.derived))
        if clash:
            raise ConfigError(f"{self.source}: {[f'{name}.{k}' for k in clash]} are set by `emojax run` from "
                              "run.dir / run.model; remove them (or run the stage on its own)")
        return section.build({**values, **(derived or {})}, self.source)


def load_run_file(config_file: str | Path | None, overrides=()) -> RunFile:
    data = read_yaml(config_file) if config_file else {}
    source = str(config_file) if config_file else "defaults"
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; sections: {list(SECTIONS)}")
    if overrides:
        data = merge(data, parse_overrides(overrides), f"{source} + overrides")
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"command line: unknown section(s) {unknown}; overrides are SECTION.KEY=VALUE")
        source += " + overrides"
    for name, value in data.items():
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping")
    run = SECTIONS["run"].build(data.get("run") or {}, source)
    return RunFile(source=source, run=run, sections={k: v for k, v in data.items() if k != "run"})


__all__ = ["RunFile", "RunSection", "STAGES", "load_run_file"]
