"""The `emojax steer` and `emojax monitor` subcommands, and the library functions they are thin shells over.

    emojax steer --bank BANK --concept desperate --strength 0.05 --prompt TEXT [--model PATH_OR_PRESET]
    emojax steer --bank BANK --concept calm --sweep -0.1:0.1:5 --prompt TEXT      # 5 strengths, one batch
    emojax monitor --bank BANK --prompt TEXT [--rule 'desperate>0.3:3'] [--out monitor.jsonl]

`register(subparsers)` adds both to the `emojax` parser. The model defaults to the built-in default model.
A bank fitted on another model (other weights, even of the same shape) is refused unless --force.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from emojax.concepts.bank import ConceptBank, check_model, load_bank
from emojax.errors import InputError
from emojax.fileio import write_text
from emojax.models.lm import LanguageModel
from emojax.steer.decode import DecodeConfig, Decoder
from emojax.steer.interventions import default_layer, from_bank
from emojax.steer.monitor import AlertTracker, Rule, readout_from_bank
from emojax.steer.sampling import Sampling
from emojax.steer.text import encode_prompts, token_texts, tokenizer_for

DEFAULT_MODEL = "default"


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


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def check_bank_model(lm: LanguageModel, bank: ConceptBank, force: bool = False,
                     warn: Callable[[str], None] | None = None) -> None:
    """Raises BankModelError when `bank` was fitted on a model other than `lm` (compared by content, see
    emojax.concepts.bank.check_model), unless force; what cannot be checked (or is forced) goes to `warn`
    (default: warnings.warn)."""
    message = check_model(bank, lm.identity, lm.source or "this model", force=force)
    if message:
        (warn or _warn)(message)


def steer(lm: LanguageModel, bank: ConceptBank, prompts: Sequence[str], concepts: Sequence[str],
          strengths: Sequence[Sequence[float]], *, layers: Sequence[int] | None = None, positions: str = "all",
          unit: str = "norm", max_new_tokens: int = 48, temperature: float = 0.0, top_k: int = 0,
          top_p: float = 1.0, seed: int = 0, decoder: Decoder | None = None, force: bool = False,
          warn: Callable[[str], None] | None = None) -> list[dict]:
    """Generates every prompt under every strength setting, as one batch.

    strengths: one row per setting, one value per concept (a sweep is several rows). Returns one record per
    (setting, prompt) with the prompt, the strengths and the generated text. A bank fitted on another model is
    refused (BankModelError) unless force=True (see check_bank_model).
    """
    import jax

    check_bank_model(lm, bank, force, warn)
    settings = np.asarray(strengths, np.float32)
    if settings.ndim != 2 or settings.shape[1] != len(concepts):
        raise InputError(f"need one strength per concept ({len(concepts)}), got {settings.shape[-1]}")
    for name in concepts:
        bank.concept_index(name)
    layers = tuple(layers) if layers else (default_layer(bank, lm.config.n_layers),)
    tokenizer = tokenizer_for(lm)
    tokens, mask = encode_prompts(tokenizer, prompts)
    n_p = len(prompts)
    per_row = np.repeat(settings, n_p, axis=0)  # row = setting * n_p + prompt
    iv = from_bank(bank, lm.config.n_layers, concepts, per_row, layers=layers, positions=positions, unit=unit)
    decoder = decoder or Decoder(lm)
    B = len(per_row)
    gen = decoder.generate(np.tile(tokens, (len(settings), 1)), np.tile(mask, (len(settings), 1)),
                           max_new_tokens=max_new_tokens, interventions=iv,
                           sampling=Sampling.make(B, temperature, top_k, top_p) if temperature > 0 else None,
                           key=jax.random.key(seed))
    records = []
    for b in range(B):
        records.append({"prompt": prompts[b % n_p], "concepts": list(concepts),
                        "strengths": [float(s) for s in per_row[b]], "layers": list(layers), "unit": unit,
                        "positions": positions, "tokens": gen.generated(b),
                        "text": tokenizer.decode(gen.generated(b))})
    return records


def monitor(lm: LanguageModel, bank: ConceptBank, prompts: Sequence[str], *, layer: int | None = None,
            metric: str = "cosine", max_new_tokens: int = 32, rules: Sequence[Rule] = (), top: int = 3,
            on_alert=None, decoder: Decoder | None = None, force: bool = False,
            warn: Callable[[str], None] | None = None) -> list[dict]:
    """Generates from each prompt and reads every token's projections onto the bank's concepts.

    Returns one record per prompt: tokens with their text, source (prompt/generated), readings [C] and top
    concepts, plus the alerts of `rules`. Alerts are evaluated while the readings stream in (on_alert(alert)).
    A bank fitted on another model is refused (BankModelError) unless force=True (see check_bank_model).
    """
    check_bank_model(lm, bank, force, warn)
    layer = layer if layer is not None else default_layer(bank, lm.config.n_layers)
    bank.layer_index(layer)
    readout, names = readout_from_bank(bank, layer, metric)
    tracker = AlertTracker(rules, names)
    tokenizer = tokenizer_for(lm)
    tokens, mask = encode_prompts(tokenizer, prompts)
    decoder = decoder or Decoder(lm)

    def on_readings(positions, readings):
        for alert in tracker.feed(positions, readings):
            if on_alert is not None:
                on_alert(alert)

    gen = decoder.generate(tokens, mask, max_new_tokens=max_new_tokens, readout=readout,
                           on_readings=on_readings if rules else None)
    readings, valid = np.asarray(gen.readings), np.asarray(gen.valid)
    records = []
    for b, prompt in enumerate(prompts):
        cols = np.nonzero(valid[b])[0]
        ids = [int(t) for t in np.asarray(gen.tokens)[b, cols]]
        rows = []
        for pos, (col, text) in enumerate(zip(cols, token_texts(tokenizer, ids))):
            r = readings[b, col]
            best = np.argsort(-r, kind="stable")[:top]
            rows.append({"position": pos, "token": ids[pos], "text": text,
                         "source": "prompt" if col < gen.prompt_columns else "generated",
                         "readings": {n: float(v) for n, v in zip(names, r)},
                         "top": [[names[i], float(r[i])] for i in best]})
        records.append({"prompt": prompt, "layer": int(layer), "metric": metric,
                        "generated": tokenizer.decode(gen.generated(b)), "tokens": rows,
                        "alerts": [a.to_dict() for a in tracker.alerts() if a.row == b]})
    return records


def _load_model(spec: str, dtype: str) -> LanguageModel:
    import emojax

    if spec == DEFAULT_MODEL and not Path(spec).exists():
        from emojax.train.builtin import ensure_builtin_model

        spec = str(ensure_builtin_model())
    return emojax.load_model(spec, dtype=dtype)


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
    lm = _load_model(args.model, args.dtype)
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
    scale = 0.5 if metric == "cosine" else None
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
    lm = _load_model(args.model, args.dtype)
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
        p.add_argument("--model", default=DEFAULT_MODEL,
                       help="Hugging Face-format directory or preset such as random:tiny (default: the built-in model)")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
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
                   help="residual index to steer at (repeatable; default: the bank layer nearest 2/3 depth)")
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
    p.add_argument("--layer", type=int, help="residual index to read (default: the bank layer nearest 2/3 depth)")
    p.add_argument("--metric", choices=["cosine", "dot"], default="cosine")
    p.add_argument("--top", type=int, default=3, help="concepts shown per token")
    p.add_argument("--rule", action="append", help="alert rule such as 'desperate>0.3:3' (repeatable)")
    p.add_argument("--out", default="run/steer/monitor.jsonl", help="JSONL output (default: %(default)s)")
    p.set_defaults(func=cmd_monitor)
