"""`emojax sae --config FILE [key=value ...]`: a thin shell over `emojax.sae.evaluate.train_and_evaluate`."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the sae subcommand to the `emojax` parser's subparsers."""
    p = subparsers.add_parser(
        "sae", help="train sparse autoencoders on an activation store (a sweep in one pass; resumable)",
        description="Trains the SAE(s) of the config's sae: section on token activations of one layer of an "
                    "activation store, checkpointing to sae.out (an interrupted run resumes exactly), exports "
                    "each SAE SAELens-style to sae.out/sae_<i> (cfg.json + sae_weights.safetensors) and writes "
                    "their held-out metrics to sae.out/metrics.json.",
    )
    p.add_argument("--config", help="YAML run config (its sae: section)")
    p.add_argument("--quiet", action="store_true", help="no per-step log lines")
    p.add_argument("overrides", nargs="*", help="key=value settings of the sae section, e.g. k=64 steps=2000")
    p.set_defaults(func=cmd_sae)
    return p


def cmd_sae(args) -> int:
    import json
    from pathlib import Path

    from emojax.fileio import write_json
    from emojax.progress import log
    from emojax.run.resolve import stage_config
    from emojax.sae.evaluate import train_and_evaluate

    config = stage_config("sae", args.config, args.overrides)
    summary, _ = train_and_evaluate(config, log=None if args.quiet else log)
    write_json(Path(config.out) / "sae.json", summary, indent=2)
    print(json.dumps(summary, indent=2))
    return 0
