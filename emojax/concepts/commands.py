"""`emojax fit --config FILE [key=value ...]`, `emojax concepts show BANK` and the validations of a bank,
`emojax concepts templates` and `emojax concepts top-tokens`: thin shells over `fit`, `load_bank`,
`template_curves` and `top_activating_tokens`.

    emojax concepts templates --bank B [--model M] [--templates FILE] [--concepts afraid,calm] [--out DIR]
    emojax concepts top-tokens --bank B [--store S] [--split test] [--concepts afraid,calm] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
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

    t = sub.add_parser("templates", help="read every concept along numeric templates (a varying quantity)",
                       description="Fills each template's {x} with its values, runs the model once per template and "
                                   "reads every concept at the last token (the ':' after \"Assistant\") at the "
                                   "bank's layer; prints the curves' Spearman rho, permutation p-values and whether "
                                   "the expected directions hold. The templates file format is described in "
                                   "emojax/concepts/templates.py.")
    t.add_argument("--bank", required=True, help="a bank folder (bank.json, bank.safetensors)")
    t.add_argument("--model", help="the model the bank was fitted on (default: the one bank.json records)")
    t.add_argument("--templates", help="a templates YAML file (default: the built-in templates)")
    t.add_argument("--force", action="store_true", help="use the bank even on a model it was not fitted on")
    _validation_args(t)
    t.set_defaults(func=cmd_templates)

    k = sub.add_parser("top-tokens", help="each concept's top-activating tokens on held-out text",
                       description="Reads every token of a held-out split with every concept; per concept, the "
                                   "tokens above its percentile, the share of them in the concept's own documents "
                                   "against its share of the tokens (lift, chance 1) with a bootstrap 95% interval "
                                   "over documents, and example tokens in context.")
    k.add_argument("--bank", required=True, help="a bank folder (bank.json, bank.safetensors)")
    k.add_argument("--store", help="the activation store (default: the one bank.json records)")
    k.add_argument("--model", help="the model whose tokenizer decodes the examples (default: the store's)")
    k.add_argument("--split", help="the held-out split (default test)")
    k.add_argument("--percentile", type=float, help="a token is top above this percentile (default 90)")
    k.add_argument("--examples", type=int, help="example tokens per concept (default 5)")
    k.add_argument("--show", type=int, default=8, help="concepts printed with the highest and the lowest lift")
    k.add_argument("--quiet", action="store_true", help="no progress bars")
    _validation_args(k)
    k.set_defaults(func=cmd_top_tokens)


def _validation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concepts", help="comma-separated concepts to read (default: every concept of the bank)")
    p.add_argument("--layer", type=int, help="residual index (default: the fit's best layer)")
    p.add_argument("--out", help="a folder to write the JSON results to (templates.json / top_tokens.json)")


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


# ---- the validations


def _validate_config(args):
    """ValidateConfig (its defaults, the one source of them) with the flags given."""
    import dataclasses

    from emojax.concepts.config import ValidateConfig

    flags = {k: getattr(args, k, None) for k in ("split", "percentile", "examples", "templates")}
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        return dataclasses.replace(ValidateConfig(), **given)
    except ValueError as e:
        from emojax.errors import InputError

        raise InputError(str(e)) from None


def _concepts(args, bank) -> tuple[str, ...] | None:
    if not args.concepts:
        return None
    names = tuple(n.strip() for n in args.concepts.split(",") if n.strip())
    for name in names:
        bank.concept_index(name)  # a BankError naming the unknown concept
    return names


def cmd_templates(args) -> int:
    from emojax.concepts.bank import check_model, load_bank
    from emojax.concepts.layer import bank_layer
    from emojax.concepts.templates import known_concepts, load_templates, template_curves
    from emojax.errors import InputError
    from emojax.fileio import write_json
    from emojax.models import load_model
    from emojax.models.lm import tokenizer_for

    config = _validate_config(args)
    bank = load_bank(args.bank)
    concepts = _concepts(args, bank)
    templates = load_templates(config.templates or None, known_concepts(bank))
    model = args.model or bank.info.get("store_model")
    if not model:
        raise InputError(f"{args.bank}: bank.json records no model; pass --model (the model the bank was fitted on)")
    lm = load_model(model)
    warning = check_model(bank, lm.identity, str(model), force=args.force)
    if warning:
        print(f"emojax: warning: {warning}", file=sys.stderr)
    layer = bank_layer(bank, lm.config.n_layers, args.layer)
    result = template_curves(lm, bank, templates, layer, tokenizer_for(lm), concepts, config.permutations,
                             config.seed)
    if args.out:
        write_json(Path(args.out) / "templates.json", result)
    print(templates_text(result, shown=concepts))
    return 0


def cmd_top_tokens(args) -> int:
    from emojax.concepts.bank import load_bank
    from emojax.concepts.layer import bank_layer
    from emojax.concepts.top_tokens import store_tokenizer, top_activating_tokens
    from emojax.errors import InputError
    from emojax.fileio import write_json
    from emojax.store import ActivationStore

    config = _validate_config(args)
    bank = load_bank(args.bank)
    concepts = _concepts(args, bank)
    store_path = args.store or bank.info.get("store")
    if not store_path:
        raise InputError(f"{args.bank}: bank.json records no store; pass --store")
    store = ActivationStore(store_path)
    layer = bank_layer(bank, store.state.get("n_layers"), args.layer)
    result = top_activating_tokens(store, bank, layer, config.split, config.percentile, config.examples,
                                   config.context, store_tokenizer(store, args.model), config.threshold_tokens,
                                   config.n_boot, config.seed, config.chunk_rows, concepts,
                                   show_progress=not args.quiet)
    if args.out:
        write_json(Path(args.out) / "top_tokens.json", result)
    print(top_tokens_text(result, args.show, every=concepts is not None))
    return 0


def templates_text(result: dict, shown: tuple[str, ...] | None = None, strongest: int = 3) -> str:
    """The curves of every template as a table: the concepts `shown` (default: those with an expected direction,
    then the `strongest` others by |rho|), each reading per value, rho, p and whether the direction holds."""
    from emojax.progress import fmt_ci

    names = result["concepts"]
    unit = "z-scores against neutral text" if result["metric"] == "z" else "centred cosines"
    lines = [f"numeric templates at layer {result['layer']}: readouts in {unit}, {len(names)} concepts"]
    for t in result["templates"]:
        expected = {e["concept"]: e for e in t["expected"]}
        rows = list(shown) if shown else list(expected)
        if not shown:
            by_rho = sorted((i for i, r in enumerate(t["rho"]) if r is not None and names[i] not in expected),
                            key=lambda i: -abs(t["rho"][i]))
            rows += [names[i] for i in by_rho[:strongest]]
        lines.append(f"\n{t['name']}: {t['text']!r} (read at {t['read_at']!r})")
        width = max([len(r) + 7 for r in rows] + [12])
        lines.append("  " + "value".ljust(width) + "".join(f"{_value(v):>9}" for v in t["values"])
                     + "      rho        p  direction")
        for name in rows:
            c = names.index(name)
            label = f"{name} ({expected[name]['direction']})" if name in expected else name
            agrees = expected[name]["agrees"] if name in expected else None
            verdict = "-" if name not in expected else "as expected" if agrees else "opposite"
            rho, p = t["rho"][c], t["p"][c]
            lines.append("  " + label.ljust(width) + "".join(f"{row[c]:>9.3f}" for row in t["readouts"])
                         + (f"  {rho:+7.3f}  {p:7.4f}" if rho is not None else "        -        -") + f"  {verdict}")
        if t["not_read"]:
            lines.append(f"  not read (not in the bank or not selected): {', '.join(t['not_read'])}")
    s = result["summary"]
    if s["expected"]:
        agree = fmt_ci(s["agree_rate"], s["agree_rate_ci95"], ".1f", 100, "%", "95% CI over templates ")
        lines.append(f"\nexpected directions: {s['agree']}/{s['expected']} as expected, {agree}; chance "
                     f"50%, permutation null 95% range {_range(s['agree_chance_range95'])}, "
                     f"p = {s['agree_p_value']:.3g}")
    if s["curves"]:
        rate = fmt_ci(s["monotone_rate"], s["monotone_rate_ci95"], ".1f", 100, "%", "95% CI over templates ")
        lines.append(f"monotone curves (permutation p < 0.05): {s['monotone']}/{s['curves']}, {rate}; chance 5%, "
                     f"permutation null 95% range {_range(s['monotone_chance_range95'])}, "
                     f"p = {s['monotone_p_value']:.3g}")
    return "\n".join(lines)


def _range(bounds) -> str:
    return f"{100 * bounds[0]:.1f}-{100 * bounds[1]:.1f}%" if bounds else "-"


def _value(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def top_tokens_text(result: dict, show: int = 8, every: bool = False) -> str:
    """The top tokens as a table: every concept (`every`), else the `show` concepts with the highest and the
    lowest lift."""
    from emojax.progress import fmt_ci

    s = result["summary"]
    sample = result["threshold_sample"]
    lift = fmt_ci(s["mean_lift"], s["mean_lift_ci95"], ".2f", label="95% CI ")
    lines = [f"top-activating tokens at layer {result['layer']} on the {result['split']} split: "
             f"{result['tokens']:,} tokens of {result['documents']:,} documents"
             + (" (BOS left out)" if result["bos_left_out"] else "")
             + f"; a token is top above its concept's {result['percentile']:g}th percentile ("
             + ("exact" if sample["exact"] else f"over a seeded sample of {sample['tokens']:,} tokens") + ")",
             f"mean lift {lift} over {s['concepts']} concepts, chance 1; "
             f"of {s['with_interval']} concepts with an interval, {s['above_chance']} lie above chance and "
             f"{s['below_chance']} below"]
    entries = [(n, e) for n, e in result["concepts"].items() if e["lift"] is not None]
    entries.sort(key=lambda ne: -ne[1]["lift"])
    if not every and len(entries) > 2 * show:
        entries = entries[:show] + [("...", None)] + entries[-show:]
    width = max([len(n) for n, _ in entries] + [7])
    lines.append("  " + "concept".ljust(width) + "  lift (95% CI)          in label / top  docs  example")
    for name, e in entries:
        if e is None:
            lines.append("  ...")
            continue
        example = e["examples"][0] if e["examples"] else None
        shown = (f"{example['left'][-24:]}[{example['token']}]{example['right'][:24]}".replace("\n", " ")
                 if example else "")
        lines.append("  " + name.ljust(width) + f"  {fmt_ci(e['lift'], e['lift_ci95'], '.2f', label=''):<22}"
                     f"  {e['in_label']:>6}/{e['above']:<7} {e['documents']:>4}  {shown}")
    return "\n".join(lines)
