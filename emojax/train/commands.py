"""`emojax train-lm --config FILE [key=value ...] --out DIR`: a thin shell over `train_lm`."""

from __future__ import annotations

import argparse

from emojax.train.config import PRESETS


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the train-lm subcommand to the `emojax` parser's subparsers."""
    p = subparsers.add_parser(
        "train-lm", help="train the small built-in Llama-shape model (BPE tokenizer, AdamW) into an HF folder",
        description="Trains a small Llama-shape model on the built-in corpus and writes a Hugging Face-format "
                    "folder (config.json, model.safetensors, tokenizer.json, train.json). An interrupted run "
                    "resumes from its last checkpoint; a finished one is not redone.",
    )
    p.add_argument("--config", help="YAML run config (its train: section)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="base settings (default: the built-in default model)")
    p.add_argument("--out", help="output folder (default: the config's train.out)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="key=value settings of the train section, e.g. steps=200")
    p.set_defaults(func=cmd_train_lm)
    return p


def cmd_train_lm(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from emojax.train.builtin import read_train_json, train_lm
    from emojax.config_loader import load_section
    from emojax.train.config import TrainConfig

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
