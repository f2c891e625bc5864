"""`emojax train-lm --config FILE [key=value ...] --out DIR`: a thin shell over `train_lm`, and
`emojax train-lm --finetune DATA [DATA ...] --from MODEL [--bank B --steer concept=strength@layer ...] --out DIR
[key=value ...]`: one over `finetune` (docs/finetune.md)."""

from __future__ import annotations

import argparse
import dataclasses

from emojax.errors import InputError
from emojax.train.config import PRESETS, FinetuneConfig


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the train-lm subcommand to the `emojax` parser's subparsers."""
    p = subparsers.add_parser(
        "train-lm", help="train the small built-in Llama-shape model (BPE tokenizer, AdamW) into an HF folder, or "
                         "fine-tune a model (--finetune), optionally steered during training",
        description="Trains a small Llama-shape model on the built-in corpus and writes a Hugging Face-format "
                    "folder (config.json, model.safetensors, tokenizer.json, train.json). With --finetune DATA "
                    "--from MODEL: fine-tunes MODEL on prompt/response samples (the loss on responses only), "
                    "optionally adding --steer concept vectors during training only (docs/finetune.md). An "
                    "interrupted run resumes from its last checkpoint; a finished one is not redone.",
    )
    p.add_argument("--config", help="YAML run config (its train: section)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="base settings (default: the built-in default model)")
    p.add_argument("--out", help="output folder (default: the config's train.out)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--finetune", nargs="+", metavar="DATA",
                   help="fine-tune --from MODEL on these prompt/response sample files (JSONL, CSV, Parquet) instead; "
                        "key=value settings are then those of the finetune section (docs/finetune.md)")
    p.add_argument("--from", dest="source", metavar="MODEL",
                   help="with --finetune: the model to fine-tune (a checkpoint folder, builtin, builtin:tiny)")
    p.add_argument("--bank", help="with --steer: the concept bank (fitted on --from) whose vectors are added")
    p.add_argument("--steer", nargs="+", metavar="CONCEPT=STRENGTH@LAYER",
                   help="with --finetune: add the concept's vector at that residual index during training only; "
                        "strength in the study's unit, a fraction of the layer's mean residual norm (e.g. 0.1)")
    p.add_argument("overrides", nargs="*", help="key=value settings of the train section, e.g. steps=200")
    p.set_defaults(func=cmd_train_lm)
    return p


def cmd_train_lm(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from emojax.train.builtin import read_train_json, train_lm
    from emojax.config_loader import load_section
    from emojax.train.config import TrainConfig

    if args.finetune:
        return cmd_finetune(args)
    stray = [flag for flag, value in (("--from", args.source), ("--bank", args.bank), ("--steer", args.steer))
             if value]
    if stray:
        raise InputError(f"{', '.join(stray)}: only with --finetune DATA (training from scratch reads none)")
    overrides = list(args.overrides)
    if args.preset:
        overrides.insert(0, f"preset={args.preset}")
    if args.out:
        overrides.append(f"out={args.out}")
    config = load_section(TrainConfig, args.config, overrides)
    out = train_lm(config, progress=not args.quiet)
    info = read_train_json(out)
    table = Table(title=f"train-lm -> {out}", show_header=False)
    table.add_row("parameters", f"{info['parameters']:,}")
    table.add_row("trained on", f"{info['tokens']['trained_on']:,} tokens ({config.steps} steps)")
    table.add_row("held-out perplexity", f"{info['heldout_perplexity']:.2f}")
    table.add_row("unigram perplexity", f"{info['unigram_perplexity']:.2f}")
    table.add_row("held-out loss", f"{info['heldout_nll']:.3f} nats/token (unigram {info['unigram_nll']:.3f})")
    if info.get("world_entropy"):
        table.add_row("world entropy", f"{info['world_entropy']['nats_per_token']:.3f} nats/token (the floor)")
    tps = info["timing"]["tokens_per_second"]
    table.add_row("train time", f"{info['timing']['train_seconds']:.0f} s"
                  + (f" ({tps:,.0f} tok/s)" if tps else ""))
    Console().print(table)
    return 0


def _settings_of(values: list[str]) -> tuple[list[str], list[str]]:
    """(values, finetune key=value settings among them): `--finetune a.jsonl lr=3e-4` takes the setting too."""
    keys = {f.name for f in dataclasses.fields(FinetuneConfig)}

    def is_setting(v: str) -> bool:
        return "=" in v and "@" not in v and v.split("=", 1)[0].split(".")[0] in keys

    return [v for v in values if not is_setting(v)], [v for v in values if is_setting(v)]


def cmd_finetune(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from emojax.config_loader import load_section
    from emojax.models import load_model
    from emojax.train.builtin import read_train_json
    from emojax.steer.interventions import bank_steering
    from emojax.train.finetune import finetune, parse_steer

    data, settings = _settings_of(args.finetune)
    steer, more = _settings_of(args.steer or [])
    if args.preset:
        raise InputError("--preset: presets are for training from scratch; --finetune starts from --from MODEL")
    if not args.source:
        raise InputError("--finetune needs --from MODEL: the checkpoint folder (or builtin) to fine-tune")
    if not args.out:
        raise InputError("--finetune needs --out DIR: the folder the fine-tuned model is written to")
    if not data:
        raise InputError("--finetune needs at least one sample file (JSONL, CSV or Parquet)")
    if steer and not args.bank:
        raise InputError("--steer needs --bank BANK: the concept vectors it adds come from a concept bank")
    if args.bank and not steer:
        raise InputError(f"--bank {args.bank}: given without --steer it changes nothing; add --steer "
                         "concept=strength@layer or drop --bank")
    steers = [parse_steer(s) for s in steer]
    config = load_section(FinetuneConfig, args.config, [*args.overrides, *settings, *more])
    lm = load_model(args.source)
    steering = bank_steering(args.bank, lm, steers) if steers else None
    out = finetune(config, data, lm, args.out, steering=steering, progress=not args.quiet)
    info = read_train_json(out)
    table = Table(title=f"train-lm --finetune -> {out}", show_header=False)
    table.add_row("from", str(args.source))
    table.add_row("samples", f"{info['samples']['train']:,} train, {info['samples']['heldout']:,} held out")
    table.add_row("steering", ", ".join(f"{s['concept']} {s['strength']:+g} @ {s['layer']}" for s in info["steering"])
                  or "none")
    table.add_row("steps", f"{info['steps']:,}")
    table.add_row("held-out loss", f"{info['heldout_nll_before']:.3f} -> {info['heldout_nll_after']:.3f} nats per "
                                   "response token")
    table.add_row("train time", f"{info['timing']['train_seconds']:.0f} s")
    Console().print(table)
    return 0
