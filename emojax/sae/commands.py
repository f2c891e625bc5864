"""`emojax sae --config FILE [key=value ...]`: a thin shell over `train_sae` and `export_sae`."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the sae subcommand to the `emojax` parser's subparsers."""
    p = subparsers.add_parser(
        "sae", help="train sparse autoencoders on an activation store (a sweep in one pass; resumable)",
        description="Trains the SAE(s) of the config's sae: section on token activations of one layer of an "
                    "activation store, checkpointing to sae.out (an interrupted run resumes exactly), and exports "
                    "each SAE SAELens-style to sae.out/sae_<i> (cfg.json + sae_weights.safetensors).",
    )
    p.add_argument("--config", help="YAML run config (its sae: section)")
    p.add_argument("--quiet", action="store_true", help="no per-step log lines")
    p.add_argument("overrides", nargs="*", help="key=value settings of the sae section, e.g. k=64 steps=2000")
    p.set_defaults(func=cmd_sae)
    return p


def cmd_sae(args) -> int:
    import json
    from pathlib import Path

    from emojax.errors import ConfigError
    from emojax.fileio import write_json
    from emojax.locks import WriterLock
    from emojax.run.resolve import stage_config
    from emojax.sae.export import export_sae
    from emojax.sae.train import train_sae
    from emojax.store import ActivationStore

    config = stage_config("sae", args.config, args.overrides)
    if not config.store or not config.out:
        raise ConfigError("sae.store and sae.out must be set (in the config file or as store=... out=...)")
    # One writer for training and the exports together (train_sae re-enters the same lock).
    model = ActivationStore(config.store).state.get("model_identity")  # the model the activations came from
    with WriterLock(config.out, what="SAE output"):
        result = train_sae(config, log=None if args.quiet else print)
        summary = {"steps": config.steps, "tokens": result.tokens, "seconds": result.seconds,
                   "input_scale": result.input_scale, "saes": []}
        for i in range(config.n_sae):
            folder = export_sae(result.sae(i), Path(config.out) / f"sae_{i}", hook_layer=config.layer,
                                extra={"sweep": config.sweep, "value": config.values(config.sweep)[i]
                                       if config.sweep else None, "model_identity": model})
            last = result.history[-1] if result.history else {}
            summary["saes"].append({"folder": str(folder), **{k: v[i] for k, v in last.items()
                                                             if isinstance(v, list)}})
        write_json(Path(config.out) / "sae.json", summary, indent=2)
    print(json.dumps(summary, indent=2))
    return 0
