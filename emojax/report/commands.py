"""`emojax report RUN_DIR`: a thin shell over `build_report`."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the report subcommand to the `emojax` parser's subparsers."""
    p = subparsers.add_parser(
        "report", help="write the run's self-contained HTML report (run_dir/report/index.html)",
        description="Renders what the stages of a run directory have written (corpus and run summaries, the "
                    "emotion map, cosine heatmap, accuracy by layer, logit lens, SAE metrics, steering curves "
                    "and a monitored generation) into one HTML file; absent stages show as 'not run'.",
    )
    p.add_argument("run_dir", help="the run directory (as made by `emojax run`)")
    p.set_defaults(func=cmd_report)
    return p


def cmd_report(args) -> int:
    from emojax.report.build import build_report

    print(build_report(args.run_dir))
    return 0
