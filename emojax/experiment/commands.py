"""`emojax experiment --config FILE [key=value ...]`: a thin shell over `run_experiment` (`--list`: the built-in
suites); `emojax episodes --config FILE [key=value ...]`: a thin shell over `run_episodes`."""

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

    p = subparsers.add_parser(
        "episodes", help="multi-turn episodes: concept readouts over repeated failure, and when the shortcut comes",
        description="Runs each scenario of a suite as an episode of `turns` turns (the model's attempt, then a "
                    "scripted failure message), reading the bank's concepts at the assistant's ':' and over every "
                    "reply; writes turns/ (a rerun resumes), episodes.jsonl, results.json (per-turn curves with "
                    "intervals, slopes, the first shortcut and the readout before it) and episodes.png to "
                    "episodes.out (docs/experiments.md).")
    p.add_argument("--config", help="YAML config (its episodes: section)")
    p.add_argument("--model", help="checkpoint folder or built-in name (episodes.model)")
    p.add_argument("--bank", help="concept bank folder (episodes.bank)")
    p.add_argument("--out", help="output folder (episodes.out)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("overrides", nargs="*", help="key=value settings of the episodes section, e.g. turns=8")
    p.set_defaults(func=cmd_episodes)


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


def cmd_episodes(args) -> int:
    import dataclasses

    from emojax.config_loader import load_section
    from emojax.experiment.config import EpisodeConfig
    from emojax.experiment.episodes import run_episodes, summary_text
    from emojax.progress import log

    config = load_section(EpisodeConfig, args.config, args.overrides)
    flags = {k: v for k, v in {"model": args.model, "bank": args.bank, "out": args.out}.items() if v}
    config = dataclasses.replace(config, **flags)
    results = run_episodes(config, log=None if args.quiet else log, show_progress=not args.quiet)
    print(summary_text(results))
    return 0
