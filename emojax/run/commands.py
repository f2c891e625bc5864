"""`emojax run --config FILE [SECTION.KEY=VALUE ...]`: the whole method, resumable, in one run directory."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "run", help="run every stage (train-lm if needed, corpus, dump, fit, sae, steer, report) in one run dir",
        description="Runs the stages in order; a stage whose outputs are complete and whose inputs are unchanged "
                    "is skipped, so a rerun after a crash or Ctrl-C resumes, and a changed setting recomputes "
                    "only what depends on it.",
    )
    p.add_argument("--config", help="YAML run config (configs/demo.yaml, configs/tiny.yaml, ...)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE, e.g. run.dir=runs/x dump.dtype=float32")
    p.set_defaults(func=cmd_run)
    return p


def cmd_run(args) -> int:
    from emojax.run.config import load_run_file
    from emojax.run.runner import run

    run_file = load_run_file(args.config, args.overrides)
    done = run(run_file, show_progress=not args.quiet)
    total = sum(r.get("seconds", 0.0) for r in done.values() if not r.get("skipped"))
    report = done.get("report", {}).get("summary", {}).get("path")
    print(f"run {run_file.run.dir}: {len(done)} stage(s), {total:.1f} s of work"
          + (f"; report: {report}" if report else ""))
    return 0
