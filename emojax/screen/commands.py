"""`emojax screen --data FILE --bank B --concepts a,b --out DIR [key=value ...]`: a thin shell over
emojax.screen.run.screen."""

from __future__ import annotations

import argparse
import dataclasses


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "screen", help="score prompt/response data by concept projections and flag the samples that stand out",
        description="Scores every sample of JSONL/CSV/Parquet prompt/response files (plain or chat rows) by the mean "
                    "projection of its response tokens on each concept at the bank's layer, and by the difference "
                    "from the model's own greedy response to the same prompt; writes shards (a rerun resumes), "
                    "scores.parquet, flags.jsonl and manifest.json to --out (docs/screen.md).",
        epilog="Other --options are Beam pipeline options, as for `emojax corpus build`, e.g. --runner=FlinkRunner "
               "--flink_master=HOST:PORT, or --direct_num_workers=2 --direct_running_mode=multi_processing.")
    p.add_argument("--config", help="YAML config (its screen: section)")
    p.add_argument("--data", action="append", help="a prompt/response file (repeatable)")
    p.add_argument("--bank", help="the concept bank folder (emojax fit)")
    p.add_argument("--concepts", help="comma-separated concepts of the bank, e.g. angry,afraid")
    p.add_argument("--out", help="the output folder")
    p.add_argument("--model", help="checkpoint folder or preset (default: the model the bank was fitted on)")
    p.add_argument("--layer", type=int, help="residual index (default: the bank's layer)")
    p.add_argument("--force", action="store_true", help="use a bank fitted on another model (with a warning)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("overrides", nargs="*", help="key=value settings of the screen section, e.g. flag.method=top "
                                                "flag.value=0.01")
    p.set_defaults(func=cmd_screen, beam_args=[])


def cmd_screen(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from emojax.config_loader import load_section
    from emojax.errors import ConfigError
    from emojax.progress import log
    from emojax.screen.config import ScreenConfig
    from emojax.screen.run import FLAGS_FILE, SCORES_FILE, screen

    config = load_section(ScreenConfig, args.config, args.overrides)
    flags = {"data": tuple(args.data) if args.data else None, "bank": args.bank, "out": args.out,
             "model": args.model, "layer": args.layer, "force": args.force or None,
             "concepts": tuple(c.strip() for c in args.concepts.split(",") if c.strip()) if args.concepts else None}
    try:
        config = dataclasses.replace(config, **{k: v for k, v in flags.items() if v is not None})
    except ValueError as e:
        raise ConfigError(f"command line: {e}") from None
    manifest = screen(config, args.beam_args, log=None if args.quiet else log)
    table = Table(title=f"screen -> {config.out}", show_header=True)
    for name in ("concept", "flagged", f"cutoff ({config.flag.by})", "mean", "std"):
        table.add_column(name)
    for concept, f in manifest["flags"].items():
        table.add_row(concept, f"{f['flagged']:,} of {manifest['samples']:,}", f"{f['cutoff']:.4g}", f"{f['mean']:.4g}",
                      f"{f['std']:.4g}")
    Console().print(table)
    print(f"scores: {config.out}/{SCORES_FILE}; flagged samples in rank order: {config.out}/{FLAGS_FILE}")
    return 0
