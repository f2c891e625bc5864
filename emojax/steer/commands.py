"""The `emojax steer` and `emojax monitor` subcommands: argument parsing and printing over emojax.steer.generate.

    emojax steer --bank BANK --concept desperate --strength 0.05 --prompt TEXT [--model PATH_OR_PRESET]
    emojax steer --bank BANK --concept calm --sweep -0.1:0.1:5 --prompt TEXT      # 5 strengths, one batch
    emojax monitor --bank BANK --prompt TEXT [--rule 'desperate>0.3:3'] [--out monitor.jsonl]

`register(subparsers)` adds both to the `emojax` parser. The model defaults to the built-in model.
A bank fitted on another model (other weights, even of the same shape) is refused unless --force.
"""

from __future__ import annotations

import json
import re
import sys

import numpy as np

from emojax.concepts.bank import load_bank
from emojax.errors import InputError
from emojax.fileio import write_text
from emojax.models import load_model
from emojax.models.layers import ATTENTION_CHOICES
from emojax.steer.decode import DecodeConfig, Decoder
from emojax.steer.generate import monitor, steer
from emojax.steer.monitor import METRICS, Rule


def parse_sweep(text: str) -> list[float]:
    """'-0.1:0.1:5' -> five strengths from -0.1 to 0.1."""
    parts = text.split(":")
    try:
        lo, hi, n = float(parts[0]), float(parts[1]), int(parts[2])
        if len(parts) != 3 or n < 1:
            raise ValueError
    except (ValueError, IndexError):
        raise InputError(f"--sweep takes START:STOP:COUNT like -0.1:0.1:5, got {text!r}") from None
    return [float(x) for x in np.linspace(lo, hi, n)]


def _decode_config(args) -> DecodeConfig:
    return DecodeConfig(unroll_layers=not args.scan_layers, beyond_max_positions=args.beyond_max_positions)


def _print_warning(message: str) -> None:
    print(f"emojax: warning: {message}", file=sys.stderr)


def _write_jsonl(path: str | None, records: list[dict]) -> None:
    if not path:
        return
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def cmd_steer(args) -> int:
    from rich.console import Console

    bank = load_bank(args.bank)
    concepts = list(args.concept)
    if args.sweep:
        if len(concepts) != 1 or args.strength:
            raise InputError("--sweep takes exactly one --concept and no --strength")
        settings = [[s] for s in parse_sweep(args.sweep)]
    else:
        strengths = args.strength or []
        if len(strengths) == 1 and len(concepts) > 1:
            strengths = strengths * len(concepts)
        if len(strengths) != len(concepts):
            raise InputError(f"give one --strength per --concept ({len(concepts)} concepts, {len(strengths)} "
                             "strengths), or --sweep START:STOP:COUNT")
        settings = [strengths]
    lm = load_model(args.model, dtype=args.dtype, attention=args.attention)
    records = steer(lm, bank, args.prompt, concepts, settings, layers=args.layer, positions=args.positions,
                    unit=args.unit, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed, decoder=Decoder(lm, _decode_config(args)),
                    force=args.force, warn=_print_warning)
    console = Console(highlight=False)
    for r in records:
        label = ", ".join(f"{c} {s:+g}" for c, s in zip(r["concepts"], r["strengths"]))
        console.print(f"[bold]{label}[/bold] | {r['prompt']}", markup=True)
        console.print(r["text"], markup=False)
        console.print()
    _write_jsonl(args.out, records)
    if args.out:
        print(f"wrote {len(records)} generations to {args.out}")
    return 0


def _colour(value: float, metric: str) -> str:
    scale = {"cosine": 0.5, "z": 3.0}.get(metric)
    if scale is None:
        return "bold"
    if value > 0.3 * scale:
        return "bold red" if value > scale else "red"
    if value < -0.3 * scale:
        return "bold blue" if value < -scale else "blue"
    return "dim"


def cmd_monitor(args) -> int:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    bank = load_bank(args.bank)
    rules = [Rule.parse(r) for r in args.rule or ()]
    lm = load_model(args.model, dtype=args.dtype, attention=args.attention)
    console = Console(highlight=False)
    records = monitor(lm, bank, args.prompt, layer=args.layer, metric=args.metric, max_new_tokens=args.max_new_tokens,
                      rules=rules, top=args.top, decoder=Decoder(lm, _decode_config(args)), force=args.force,
                      warn=_print_warning,
                      on_alert=lambda a: console.print(f"[bold red]ALERT[/bold red] row {a.row}: {a.rule} at "
                                                       f"tokens {a.start}..{a.trigger}"))
    for r in records:
        text = Text()
        for t in r["tokens"]:
            name, value = t["top"][0]
            text.append(t["text"], style=_colour(value, r["metric"]))
        console.print(text)
        table = Table(title=f"layer {r['layer']} ({r['metric']})", show_lines=False)
        table.add_column("pos", justify="right")
        table.add_column("token")
        table.add_column("source")
        table.add_column("top concepts")
        for t in r["tokens"]:
            top = Text(", ").join(Text(f"{n} {v:+.3f}", style=_colour(v, r["metric"])) for n, v in t["top"])
            table.add_row(str(t["position"]), repr(t["text"]), t["source"], top)
        console.print(table)
        for a in r["alerts"]:
            console.print(f"alert: {a['rule']} at tokens {a['start']}..{a['end']} (peak {a['peak']:+.3f})")
    _write_jsonl(args.out, records)
    print(f"wrote {len(records)} records to {args.out}")
    return 0


def register(subparsers) -> None:
    """Adds `steer` and `monitor` to an argparse subparsers object (of the `emojax` parser)."""

    def common(p):
        p.add_argument("--model", default="builtin",
                       help="Hugging Face-format directory or preset such as random:tiny (default: the built-in model)")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
        p.add_argument("--attention", default="xla", choices=list(ATTENTION_CHOICES),
                       help="attention kernel (default: %(default)s; cudnn/auto: cuDNN's fused kernel on a GPU)")
        p.add_argument("--bank", required=True, help="concept bank folder (written by `emojax fit`)")
        p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable: one batch)")
        p.add_argument("--max-new-tokens", type=int, default=48)
        p.add_argument("--scan-layers", action="store_true",
                       help="decode with a scan over the layers instead of unrolled layers (shorter compile)")
        p.add_argument("--force", action="store_true",
                       help="use a bank fitted on another model (a warning instead of an error)")
        p.add_argument("--beyond-max-positions", action="store_true",
                       help="let a RoPE model decode past its max_position_embeddings (extrapolation)")

    p = subparsers.add_parser("steer", help="generate with concept vectors added to the residual stream")
    common(p)
    p.add_argument("--concept", action="append", required=True, help="a bank concept (repeatable)")
    p.add_argument("--strength", type=float, action="append",
                   help="strength per --concept, in units of the layer's mean residual norm (see --unit)")
    p.add_argument("--sweep", help="START:STOP:COUNT strengths for one concept, run as one batch")
    # `--sweep -0.1:0.1:5` as documented: argparse takes only plain negative numbers for values otherwise.
    p._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^-[0-9.]+:[-0-9.]+:[0-9]+$")
    p.add_argument("--layer", type=int, action="append",
                   help="residual index to steer at (repeatable; default: the fit's best layer, from the bank's "
                        "eval.json, else the bank layer nearest 2/3 depth)")
    p.add_argument("--positions", choices=["prompt", "generated", "all"], default="all")
    p.add_argument("--unit", choices=["norm", "absolute"], default="norm",
                   help="norm: strength x unit vector x mean residual norm (the study's unit); absolute: x vector")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the generations as JSONL")
    p.set_defaults(func=cmd_steer)

    p = subparsers.add_parser("monitor", help="print per-token concept readings of a generation; write JSONL")
    common(p)
    p.set_defaults(max_new_tokens=32)
    p.add_argument("--layer", type=int, help="residual index to read (default: the fit's best layer, from the "
                                             "bank's eval.json, else the bank layer nearest 2/3 depth)")
    p.add_argument("--metric", choices=list(METRICS), default=None,
                   help="z: z-scores against neutral text (the default for a bank fitted with neutral documents; "
                        "rule thresholds are then in z-units); cosine: the fit's readout cos(x - center, v)")
    p.add_argument("--top", type=int, default=3, help="concepts shown per token")
    p.add_argument("--rule", action="append", help="alert rule such as 'desperate>0.3:3' (repeatable)")
    p.add_argument("--out", default="run/steer/monitor.jsonl", help="JSONL output (default: %(default)s)")
    p.set_defaults(func=cmd_monitor)
