"""The settings of `emojax run`: a `run:` section plus one section per stage, in one YAML file.

Paths between stages are derived from `run.dir` (corpus/, activations/, concepts/, sae/, steer/, report/),
so a stage section holds only the settings of its own work.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from emojax.config_loader import build, load_section, merge, non_negative, parse_overrides, read_yaml
from emojax.errors import ConfigError

STAGES = ("train", "corpus", "dump", "fit", "sae", "steer", "report")
SECTIONS = ("run", "train", "corpus", "dump", "fit", "sae", "steer")


@dataclasses.dataclass(frozen=True)
class RunSection:
    dir: str = "runs/demo"
    model: str = "builtin"  # a checkpoint folder, random:SHAPE, builtin or builtin:tiny (trained on first use)
    stages: tuple[str, ...] = STAGES  # the stages to run, in this order
    layer: int = non_negative(0)  # the residual index steered and monitored; 0: the fit's best layer

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages: {list(STAGES)}")


@dataclasses.dataclass(frozen=True)
class RunFile:
    """The parsed file: the run section and each stage section's raw mapping (typed by its stage)."""

    source: str
    run: RunSection
    sections: dict  # stage name -> dict of settings (after overrides)

    def section(self, name: str) -> dict:
        return dict(self.sections.get(name) or {})


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
    run = build(RunSection, data.get("run") or {}, source, prefix="run.")
    return RunFile(source=source, run=run, sections={k: v for k, v in data.items() if k != "run"})


def typed_section(cls, run_file: RunFile, name: str, forced: dict):
    """Stage section `name` as `cls`, with the run's derived paths; setting one of them yourself is an error."""
    values = run_file.section(name)
    clash = sorted(set(values) & set(forced))
    if clash:
        raise ConfigError(f"{run_file.source}: {[f'{name}.{k}' for k in clash]} are set by `emojax run` from "
                          "run.dir / run.model; remove them (or run the stage on its own)")
    return build(cls, {**values, **forced}, run_file.source, prefix=f"{name}.")


__all__ = ["RunFile", "RunSection", "STAGES", "load_run_file", "load_section", "typed_section"]
