"""`emojax fit --config FILE [key=value ...]` and `emojax concepts show BANK`: thin shells over `fit` and
`load_bank`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the fit and concepts subcommands to the `emojax` parser's subparsers."""
    p = subparsers.add_parser(
        "fit", help="fit concept vectors from an activation store into a concept bank",
        description="Fits one vector per concept and layer (the study's recipe or an alternative: fit.method), "
                    "evaluates them on held-out splits and writes bank.safetensors, bank.json and eval.json.")
    p.add_argument("--config", help="YAML run config (its fit: section)")
    p.add_argument("--out", help="output folder (default: the config's fit.out)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("overrides", nargs="*", help="key=value settings of the fit section, e.g. method=probe")
    p.set_defaults(func=cmd_fit)

    c = subparsers.add_parser("concepts", help="inspect concept banks")
    sub = c.add_subparsers(dest="concepts_command", required=True)
    s = sub.add_parser("show", help="print a readable summary of a concept bank")
    s.add_argument("bank", help="a bank folder (bank.json, bank.safetensors, eval.json)")
    s.add_argument("--concepts", type=int, default=8, help="concepts listed (default 8)")
    s.set_defaults(func=cmd_show)


def cmd_fit(args) -> int:
    from emojax.concepts.fit import fit
    from emojax.progress import log
    from emojax.run.resolve import stage_config

    config = stage_config("fit", args.config, args.overrides, flags={"out": args.out})
    fit(config, log=None if args.quiet else log)
    print(summary(config.out, max_concepts=8))
    return 0


def cmd_show(args) -> int:
    print(summary(args.bank, args.concepts))
    return 0


def summary(path: str | Path, max_concepts: int = 8) -> str:
    """Best layer, readout accuracy, nearest concepts and logit-lens words of a bank, as text."""
    import numpy as np

    from emojax.concepts.bank import load_bank
    from emojax.concepts.geometry import cosine_matrix

    bank = load_bank(path)
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    report = json.loads((folder / "eval.json").read_text()) if (folder / "eval.json").is_file() else {}
    best = report.get("best_layer")
    layer = best if best is not None else bank.layers[len(bank.layers) * 2 // 3]
    lines = [f"concept bank {folder}: {len(bank.names)} concepts, layers {list(bank.layers)}, d_model "
             f"{bank.d_model}, method {bank.method}",
             f"best layer: {best if best is not None else 'n/a (no eval.json)'}"]
    per_layer = report.get("per_layer", {})
    for key in map(str, bank.layers):
        m = per_layer.get(key, {})
        parts = [f"resid_norm {m.get('resid_norm', float('nan')):.3g}"]
        for split in ("test", "implicit"):
            for readout in ("nearest", "probe"):
                r = m.get(split, {}).get(readout, {})
                if r.get("n"):
                    auc = r.get("macro_auroc")
                    parts.append(f"{split}/{readout} top1 {r['top1']:.3f} top5 {r['top5']:.3f}"
                                 + (f" auroc {auc:.3f}" if auc is not None else ""))
        lines.append(f"  layer {key}: " + "; ".join(parts))
    cos = cosine_matrix(bank.at_layer(layer).astype(np.float64))
    lens = per_layer.get(str(layer), {}).get("logit_lens", {})
    lines.append(f"layer {layer}: nearest concepts" + (" and logit lens" if lens else ""))
    for c, name in enumerate(bank.names[:max_concepts]):
        near = [bank.names[j] for j in np.argsort(-cos[c]) if j != c][:3]
        line = f"  {name}: near {', '.join(near)}"
        if name in lens:
            entry = lens[name]
            line += f" | promotes {' '.join(map(repr, entry['top'][:5]))}"
            if "own_rank" in entry:
                line += f" | own word rank {entry['own_rank']}"
        lines.append(line)
    if len(bank.names) > max_concepts:
        lines.append(f"  ... {len(bank.names) - max_concepts} more")
    return "\n".join(lines)
