"""`emojax experiment --config FILE [key=value ...]`: a thin shell over `run_experiment`, and
`emojax experiment suites`: the built-in suites."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "experiment", help="behavioural experiments: rates under steering, with intervals (resumable)",
        description="Runs a suite of scenarios under the baseline, every concept x strength x layer and each "
                    "ablation (the config's experiment: section), scoring forced choices by option log-probabilities "
                    "and sampled replies by rules and an optional judge; writes shards (a rerun resumes), "
                    "transcripts.jsonl, results.json (rates with Wilson 95%% intervals, dose-response fits, Elo) and "
                    "experiment.png to experiment.out. `emojax experiment --list` shows the built-in suites.")
    p.add_argument("--config", help="YAML run config (its experiment: section)")
    p.add_argument("--list", action="store_true", help="list the built-in suites and exit")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("overrides", nargs="*", help="key=value settings of the experiment section, e.g. suite=blackmail")
    p.set_defaults(func=cmd_experiment)


def cmd_experiment(args) -> int:
    from emojax.experiment import builtin_suites, load_suite

    if args.list:
        for name in builtin_suites():
            suite = load_suite(name)
            print(f"{name}: {len(suite.scenarios)} scenarios; outcomes "
                  f"{', '.join(f'{o.name} ({o.kind})' for o in suite.outcomes)}")
        return 0
    from emojax.experiment import run_experiment
    from emojax.experiment.results import summary_text
    from emojax.progress import log
    from emojax.run.resolve import stage_config

    config = stage_config("experiment", args.config, args.overrides)
    results = run_experiment(config, log=None if args.quiet else log, show_progress=not args.quiet)
    print(summary_text(results))
    return 0
