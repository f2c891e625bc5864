"""The `emojax` command line: thin shells over library functions.

User errors (`EmojaxError`) print one line and exit with status 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from emojax.errors import EmojaxError
from emojax.fileio import is_disk_full


def _mesh_arg(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mesh takes data,fsdp,tensor sizes like 1,2,4; got {text!r}") from None
    if len(shape) != 3:
        raise argparse.ArgumentTypeError(f"--mesh takes three sizes (data,fsdp,tensor); got {text!r}")
    return shape


def _load(args):
    from emojax.models import load_model, make_mesh

    return load_model(args.model, dtype=args.dtype, mesh=make_mesh(args.mesh) if args.mesh else None)


def cmd_info(args) -> int:
    import jax
    from rich.console import Console
    from rich.table import Table

    lm = _load(args)
    table = Table(title=f"{lm.source}", show_header=False)
    for key, value in lm.config.to_dict().items():
        table.add_row(key, str(value))
    table.add_row("parameters", f"{lm.num_params:,}")
    table.add_row("dtype", str(lm.dtype))
    table.add_row("mesh", str(dict(lm.mesh.shape)))
    table.add_row("devices", f"{len(jax.devices())} x {jax.devices()[0].platform}")
    table.add_row("tokenizer", lm.tokenizer.source if lm.tokenizer else "none")
    Console().print(table)
    return 0


def cmd_forward(args) -> int:
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    lm = _load(args)
    if args.tokens is not None:
        tokens = np.asarray([[int(t) for t in args.tokens.split(",")]], np.int32)
        mask = np.ones_like(tokens)
    elif lm.tokenizer is not None:
        tokens, mask = lm.tokenizer.batch([args.text])
    else:
        raise EmojaxError(f"{lm.source} has no tokenizer.json; pass token ids with --tokens 1,2,3")
    out = lm(tokens, mask, capture=tuple(args.capture))
    logits = np.asarray(out.logits[0, -1])
    top = np.argsort(-logits)[: args.top_k]
    console = Console()
    table = Table(title="next-token prediction", min_width=32)
    table.add_column("token id")
    if lm.tokenizer:
        table.add_column("token")
    table.add_column("logit", justify="right")
    for t in top:
        text = [repr(lm.tokenizer.decode([t], skip_special_tokens=False))] if lm.tokenizer else []
        table.add_row(str(t), *text, f"{logits[t]:.3f}")
    console.print(table)
    for index, hidden in zip(args.capture, out.hidden):
        norms = np.linalg.norm(np.asarray(hidden[0], np.float32), axis=-1)
        console.print(f"residual index {index}: mean norm {norms.mean():.3f} over {len(norms)} positions")
    return 0


def cmd_init_random(args) -> int:
    from emojax.models import random_model
    from emojax.models.presets import SHAPES

    from emojax.models.hf_config import config_to_hf_dict

    if args.shape not in SHAPES:
        raise EmojaxError(f"unknown shape {args.shape!r}; shapes: {', '.join(SHAPES)}")
    config_to_hf_dict(SHAPES[args.shape])  # refuses shapes it cannot write before allocating anything
    lm = random_model(SHAPES[args.shape], dtype=args.dtype, seed=args.seed)
    out = lm.save(args.out)
    print(f"wrote {out} ({lm.num_params:,} parameters, random, seed {args.seed})")
    return 0


def cmd_corpus_build(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from emojax.config_loader import merge, parse_overrides
    from emojax.pipelines.corpus import build_corpus
    from emojax.run.resolve import stage_config

    reader = {k: getattr(args, k) for k in ("text_column", "label_column", "id_column") if getattr(args, k) is not None}
    given = {"n_shards": args.shards, "labels_file": args.labels_file, "reader": reader or None}
    overrides = merge(parse_overrides(args.overrides), {k: v for k, v in given.items() if v is not None})
    config = stage_config("corpus", args.config, overrides, flags={"out": args.out, "tokenizer": args.tokenizer})
    if args.input:
        config = dataclasses.replace(config, inputs=tuple(args.input))
    if args.extra_label:
        config = dataclasses.replace(config, extra_labels=tuple(args.extra_label))
    manifest = build_corpus(config, args.beam_args)
    table = Table(title=f"corpus -> {config.out}", show_header=False)
    for key in ("documents_in", "documents_written", "rejected", "deduplicated", "tokens_written"):
        table.add_row(key, f"{manifest[key]:,}")
    table.add_row("splits", ", ".join(f"{k} {v:,}" for k, v in manifest["per_split"].items()))
    table.add_row("labels", f"{len(manifest['per_label'])}")
    table.add_row("shards", f"{len(manifest['shards'])}")
    Console().print(table)
    if manifest["rejected"] or manifest["deduplicated"]:
        print(f"rejected and duplicate rows, with reasons: {config.out}/rejected.jsonl")
    return 0


def _start_distributed(args) -> None:
    """jax.distributed for multi-host runs: explicit coordinator flags, or auto-detection (TPU, SLURM)."""
    if not (args.distributed or args.coordinator):
        return
    import jax

    if args.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", args.cpu_collectives)
    if args.coordinator:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    else:
        jax.distributed.initialize()


def cmd_dump(args) -> int:
    from emojax.run.resolve import stage_config
    from emojax.store import dump

    _start_distributed(args)
    config = stage_config("dump", args.config, args.overrides, show_progress=not args.quiet,
                          flags={"corpus": args.corpus, "model": args.model, "out": args.out})
    dump(config, show_progress=not args.quiet)
    return 0


def cmd_corpus_prompts(args) -> int:
    from emojax.corpus.prompts import write_prompts

    n = write_prompts(args.out, stories_per_prompt=args.stories_per_prompt, concepts=tuple(args.concept or ()),
                      n_topics=args.topics)
    print(f"wrote {n} prompts to {args.out}")
    return 0


def cmd_corpus_collect(args) -> int:
    from emojax.corpus.prompts import collect_responses

    result = collect_responses(args.responses, args.out, text_field=args.text_field)
    print(f"kept {result['kept']} stories in {args.out}; rejected {len(result['rejected'])}")
    for r in result["rejected"][:20]:
        print(f"  line {r['line']}: {r['reason']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emojax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p):
        p.add_argument("model", help="Hugging Face-format directory, or a preset such as random:tiny")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
        p.add_argument("--mesh", type=_mesh_arg, help="device mesh data,fsdp,tensor (default: one device)")

    p = sub.add_parser("info", help="load a model and print its configuration")
    model_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("forward", help="run one forward pass and print next-token predictions and residual norms")
    model_args(p)
    p.add_argument("--text", default="The quick brown fox")
    p.add_argument("--tokens", help="comma-separated token ids instead of --text")
    p.add_argument("--capture", type=int, nargs="*", default=[], help="residual indices to read (0 = embeddings)")
    p.add_argument("--top-k", type=int, default=5)
    p.set_defaults(func=cmd_forward)

    p = sub.add_parser("init-random", help="write a randomly initialised Hugging Face-format checkpoint")
    p.add_argument("shape", help="a named shape: tiny, llama-56m, tinyllama-1.1b, llama-3.1-8b")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init_random)

    corpus = sub.add_parser("corpus", help="build, prompt for and collect emotion corpora")
    csub = corpus.add_subparsers(dest="corpus_command", required=True)
    p = csub.add_parser("build", help="shard a corpus (built-in generator or files) with Apache Beam",
                        epilog="Other --options are Beam pipeline options, e.g. --runner=FlinkRunner "
                               "--flink_master=HOST:PORT, or --direct_num_workers=2 "
                               "--direct_running_mode=multi_processing.")
    p.add_argument("--config", help="YAML run config (its corpus: section)")
    p.add_argument("--input", action="append", help="JSONL/CSV/Parquet file or glob (repeatable)")
    p.add_argument("--text-column")
    p.add_argument("--label-column")
    p.add_argument("--id-column")
    p.add_argument("--labels-file", help="label names, one per line, for comma-separated label ids")
    p.add_argument("--extra-label", action="append", help="a label outside the catalogue (repeatable)")
    p.add_argument("--out")
    p.add_argument("--tokenizer", help="'byte' (default), a tokenizer.json or a checkpoint directory")
    p.add_argument("--shards", type=int)
    p.add_argument("overrides", nargs="*", help="key=value settings of the corpus section")
    p.set_defaults(func=cmd_corpus_build, beam_args=[])

    p = sub.add_parser("dump", help="run the model over the corpus and write activations to a TensorStore store",
                       epilog="A rerun resumes: complete shards are skipped, partial ones rewritten.")
    p.add_argument("--config", help="YAML run config (its dump: section)")
    p.add_argument("--corpus")
    p.add_argument("--model")
    p.add_argument("--out", help="a folder or a kvstore URL such as gs://bucket/run/activations")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: jax.distributed.initialize() with auto-detection (TPU pods, SLURM)")
    p.add_argument("--coordinator", help="multi-host: coordinator HOST:PORT (with --num-processes, --process-id)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--cpu-collectives", choices=["gloo", "mpi"], help="collectives for multi-process CPU runs")
    p.add_argument("overrides", nargs="*", help="key=value settings of the dump section")
    p.set_defaults(func=cmd_dump)

    p = csub.add_parser("prompts", help="write JSONL prompts for an LLM to write the corpus")
    p.add_argument("--out", required=True)
    p.add_argument("--stories-per-prompt", type=int, default=12)
    p.add_argument("--concept", action="append")
    p.add_argument("--topics", type=int, help="first N topics (default all 100)")
    p.set_defaults(func=cmd_corpus_prompts)

    p = csub.add_parser("collect", help="turn an LLM's answers to the prompts into a labelled JSONL corpus")
    p.add_argument("--responses", required=True, help="JSONL with the prompt id and the model's text")
    p.add_argument("--out", required=True)
    p.add_argument("--text-field", default="response")
    p.set_defaults(func=cmd_corpus_collect)

    # Stages whose subcommands live beside their library code.
    from emojax.concepts.commands import register as register_fit
    from emojax.experiment.commands import register as register_experiment
    from emojax.report.commands import register as register_report
    from emojax.run.commands import register as register_run
    from emojax.run.plan import register as register_plan
    from emojax.sae.commands import register as register_sae
    from emojax.screen.commands import register as register_screen
    from emojax.serve.commands import register as register_serve
    from emojax.steer.commands import register as register_steer
    from emojax.train.commands import register as register_train_lm

    register_train_lm(sub)
    register_fit(sub)
    register_sae(sub)
    register_steer(sub)
    register_experiment(sub)
    register_screen(sub)
    register_serve(sub)
    register_report(sub)
    register_run(sub)
    register_plan(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # key=value overrides may come after options (argparse takes positionals in one run only).
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *(u for u in unknown if "=" in u and not u.startswith("-"))]
        unknown = [u for u in unknown if not ("=" in u and not u.startswith("-"))]
    if unknown:
        if not hasattr(args, "beam_args") or not all(u.startswith("--") for u in unknown):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.beam_args = unknown
    try:
        return args.func(args)
    except EmojaxError as e:
        print(f"emojax: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if not is_disk_full(e):
            raise
        where = f" while writing {e.filename}" if e.filename else ""
        print(f"emojax: error: no space left on the device{where}; free some space and rerun (finished work is "
              "kept)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
