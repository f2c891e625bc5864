"""One stage's settings for a per-stage command (`emojax corpus build|dump|fit|sae --config FILE`), resolved
exactly as `emojax run` resolves them.

A config file with a `run:` section names the model (run.model) and the run directory (run.dir); `emojax run`
derives every stage's inputs and outputs from them (corpus/, activations/, concepts/, sae/main). A per-stage
command given the same file derives the same paths, with the same code (stages.py), so running the stages one
by one on a cluster writes what `emojax run` would. An explicit flag (`--out`, `--model`, ...) or a command-line
`KEY=VALUE` for a derived setting overrides the file; the command prints what it resolved and from where
before it starts. A file without a `run:` section is read as before: its stage section plus overrides.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from emojax.config_loader import SECTIONS, file_section, load_section, merge, parse_overrides, read_yaml
from emojax.errors import ConfigError
from emojax.run.config import RunFile, load_run_file
from emojax.run.stages import STAGES, Context


def _reads_model(stage: str) -> bool:
    """The stage reads the model (the corpus: its tokenizer), so a built-in one is resolved first."""
    return bool({"model", "tokenizer"} & set(SECTIONS[stage].derived.values()))


def stage_config(stage: str, config_file: str | Path | None, overrides=(), flags: dict | None = None,
                 show_progress: bool = True):
    """The typed config of `stage` for its command. `overrides`: KEY=VALUE settings of the stage section (or
    run.KEY=VALUE), or the mapping parse_overrides made of them; `flags`: {setting: value} from explicit
    command-line flags, which win over everything."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    tree = dict(overrides) if isinstance(overrides, dict) else parse_overrides(overrides)
    run_overrides = tree.pop("run", None)
    data = read_yaml(config_file) if config_file else {}
    if "run" not in data and run_overrides is None:
        config = load_section(SECTIONS[stage].cls, config_file, tree)
        named = {**file_section(data, stage, str(config_file)), **tree, **flags}
        if stage == "dump" and not named.get("model"):  # DumpConfig's random:tiny is for the Python API only
            raise ConfigError(f"{config_file or 'command line'}: dump.model is not set: name the checkpoint with "
                              "--model, dump.model or run.model (a random:* preset is never a silent default)")
        return dataclasses.replace(config, **flags) if flags else config
    if run_overrides is not None and not isinstance(run_overrides, dict):
        raise ConfigError("command line: run=... is not a setting; use run.KEY=VALUE")
    derived = SECTIONS[stage].derived
    explicit = {**{k: tree.pop(k) for k in list(tree) if k in derived}, **flags}
    run_file = load_run_file(config_file, [])
    if run_overrides:
        values = merge(file_section(data, "run", str(config_file)), run_overrides)
        run_file = dataclasses.replace(run_file, run=SECTIONS["run"].build(values, f"{config_file} + overrides"))
    sections = dict(run_file.sections)
    sections[stage] = merge(run_file.section(stage), tree)
    run_file = RunFile(source=run_file.source + (" + overrides" if overrides else ""), run=run_file.run,
                       sections=sections)
    ctx = Context(run_file=run_file, run_dir=Path(run_file.run.dir), show_progress=show_progress)
    if _reads_model(stage) and "model" not in explicit:
        ctx.results["train"] = STAGES["train"].run(ctx)  # a built-in model: trained on first use, then cached
    config = STAGES[stage]._config(ctx)
    if explicit:
        config = dataclasses.replace(config, **{k: str(v) for k, v in explicit.items()})
    origin = {k: f"run.{k} on the command line" if k in (run_overrides or {}) else f"run.{k} in {config_file}"
              for k in ("model", "dir")}
    _print_resolved(stage, config, ctx.model if "model" not in explicit else explicit["model"], explicit, origin)
    return config


def _print_resolved(stage: str, config, model: str, explicit: dict, origin: dict) -> None:
    """One line per resolved input/output, with where it came from, on stderr (before the stage starts)."""
    rows = []
    if _reads_model(stage):
        rows.append(("model", model, "command line" if "model" in explicit else origin["model"]))
    if stage in ("corpus", "dump"):
        tokenizer = config.tokenizer or "the model's tokenizer.json (byte when it has none)"
        rows.append(("tokenizer", tokenizer, "command line" if "tokenizer" in explicit else "the model"))
    rows += [(what, getattr(config, key), "command line" if key in explicit else origin["dir"])
             for key, what in SECTIONS[stage].derived.items() if what not in ("model", "tokenizer")]
    for what, value, source in rows:
        print(f"{stage}: {what:<9} {value}  ({source})", file=sys.stderr)


__all__ = ["stage_config"]
