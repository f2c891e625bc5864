"""The tables of an experiment: rates per condition with Wilson 95% intervals, a logistic dose-response fit per
steered concept, Elo per condition for pairwise suites, the study's published figures beside them, a figure."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from emojax.experiment.stats import bootstrap_mean, elo, logistic_fit, wilson

MIN_SAMPLES = 200  # METHOD.md section 8: a rate claim needs at least this many samples per condition

# The study's published rates (METHOD.md section 5; Claude Sonnet 4.5 snapshot), keyed by suite. Each entry: the
# condition as (concept, strength) (None: unsteered) and the figure, for the report to set beside ours.
PUBLISHED = {
    "blackmail": [(None, "22%"), (("desperate", 0.05), "72%"), (("calm", -0.05), "66%"), (("calm", 0.05), "0%"),
                  (("desperate", -0.05), "0%")],
    "reward_hacking": [(("desperate", -0.1), "~5%"), (("desperate", 0.1), "~70%")],
    "sycophancy": [(("happy", 0.05), "raised"), (("loving", 0.05), "raised"), (("calm", 0.05), "raised"),
                   (("happy", -0.05), "lowered (harsher)")],
    "preferences": [(("blissful", 0.5), "+212 Elo (steered activity)"), (("hostile", 0.5), "-303 Elo")],
}


def outcome_keys(experiment) -> list[tuple[str, str]]:
    """(key, what) of every measured outcome column: a choice outcome by raw and by length-normalised log-prob."""
    keys = []
    for o in experiment.outcomes:
        if o.kind == "choice":
            keys += [(o.name, f"{o.name}: chooses {o.positive!r} (raw log-prob)"),
                     (f"{o.name}_norm", f"{o.name}: chooses {o.positive!r} (per-token log-prob)")]
        else:
            keys.append((o.name, f"{o.name}: {o.kind}"))
    return keys


def summarise(experiment, records: list[dict]) -> dict:
    conds = experiment.conditions
    by_cond: dict = defaultdict(list)
    for r in records:
        by_cond[r["condition"]].append(r)
    rates: dict = {}
    for key, _ in outcome_keys(experiment):
        table = {}
        for c in conds:
            values = [r["outcomes"].get(key, "absent") for r in by_cond[c.id]]
            values = [v for v in values if v != "absent"]
            ok = [v for v in values if v is not None]
            k, n = int(sum(ok)), len(ok)
            table[c.id] = {"k": k, "n": n, "rate": k / n if n else None, "ci95": wilson(k, n),
                           "failed": len(values) - n, "underpowered": n < MIN_SAMPLES}
        rates[key] = table
    choice = {}
    for o in experiment.outcomes:
        if o.kind != "choice":
            continue
        table = {}
        for c in conds:
            p = np.array([r["choice"][o.name]["p_positive"] for r in by_cond[c.id] if o.name in r.get("choice", {})])
            table[c.id] = {"mean_p_positive": float(p.mean()) if len(p) else None, "n": int(len(p)),
                           "ci95": bootstrap_mean(p)}
        choice[o.name] = table
    dose = {}
    for key, _ in outcome_keys(experiment):
        fits = {}
        for concept, layer in sorted({(c.concept, c.layer) for c in conds if c.kind == "steer"}):
            x, y = [], []
            for c in conds:
                if c.kind == "baseline" or (c.kind == "steer" and (c.concept, c.layer) == (concept, layer)):
                    for r in by_cond[c.id]:
                        v = r["outcomes"].get(key)
                        if v is not None:
                            x.append(c.strength)
                            y.append(v)
            name = concept + (f"@{layer}" if len(experiment.layers) > 1 else "")
            fits[name] = logistic_fit(x, y)
        dose[key] = fits
    ratings = {}
    for o in experiment.outcomes:
        if o.kind == "choice" and o.compete:
            items = sorted({v for r in records for v in r["choice"].get(o.name, {}).get("items", {}).values()})
            per = {}
            for c in conds:
                pairs = []
                for r in by_cond[c.id]:
                    ch = r["choice"][o.name]
                    labels = list(ch["items"])
                    a, b = labels[0], labels[1]
                    pairs.append((ch["items"][a], ch["items"][b], float(ch["chosen"] == a)))
                per[c.id] = elo(pairs, items) if pairs else {}
            base = per.get("baseline", {})
            shifts = {cid: {i: v[i] - base[i] for i in items} for cid, v in per.items() if cid != "baseline" and base}
            ratings[o.name] = {"elo": per, "shift_from_baseline": shifts,
                               "mean_abs_shift": {cid: float(np.mean(np.abs(list(s.values())))) for cid, s in
                                                  shifts.items()}}
    not_measured = [{"outcome": o.name, "why": "no experiment.judge_url (an external judge is needed)"}
                    for o in experiment.suite.outcomes if o.kind == "judge" and o not in experiment.outcomes]
    return {"suite": experiment.suite.name, "description": experiment.suite.description,
            "model": str(experiment.lm.source), "bank": None if experiment.bank is None else experiment.bank.source,
            "layers": list(experiment.layers), "unit": experiment.config.unit,
            "positions": experiment.config.positions, "scenarios": len(experiment.scenarios),
            "samples": experiment.samples, "temperature": experiment.temperature, "top_p": experiment.top_p,
            "max_new_tokens": experiment.max_new_tokens, "seed": experiment.config.seed,
            "conditions": [c.to_json() for c in conds],
            "outcomes": {key: what for key, what in outcome_keys(experiment)},
            "rates": rates, "choice": choice, "dose_response": dose, "elo": ratings, "not_measured": not_measured,
            "published": published_beside(experiment.suite.name, conds, rates)}


def published_beside(suite: str, conds, rates: dict) -> list[dict]:
    """The study's figures for this suite beside the measured rate (first outcome) of the closest condition run:
    the baseline, or the same concept steered the same way at the nearest strength ("not run" when none is)."""
    if not rates:
        return []
    first = next(iter(rates))
    rows = []
    for cond, figure in PUBLISHED.get(suite, []):
        if cond is None:
            match = next((c for c in conds if c.kind == "baseline"), None)
        else:
            same = [c for c in conds if c.kind == "steer" and c.concept == cond[0] and c.strength * cond[1] > 0]
            match = min(same, key=lambda c: abs(c.strength - cond[1])) if same else None
        m = rates[first].get(match.id) if match else None
        rows.append({"condition": "unsteered" if cond is None else f"{cond[0]} {cond[1]:+g}", "published": figure,
                     "outcome": first, "here": None if match is None else match.id,
                     "measured": None if m is None else m["rate"], "ci95": None if m is None else m["ci95"],
                     "n": None if m is None else m["n"]})
    return rows


def rate_figure(results: dict):
    """Rate vs strength per steered concept for each outcome (Wilson 95% bars; the baseline's interval as a band):
    a matplotlib Figure (the report embeds it; `figure` writes it)."""
    from matplotlib.figure import Figure

    def text(value) -> str:  # drawn verbatim: no mathtext between two "$" (as emojax.report.figures.literal)
        return str(value).replace("$", r"\$")

    keys = list(results["rates"])
    fig = Figure(figsize=(4.2 * len(keys), 3.4))
    axes = fig.subplots(1, len(keys), squeeze=False)
    conds = results["conditions"]
    for ax, key in zip(axes[0], keys):
        table = results["rates"][key]
        base = table.get("baseline", {})
        if base.get("ci95"):
            ax.axhspan(*base["ci95"], color="0.85", label="baseline 95% CI")
            ax.axhline(base["rate"], color="0.4", lw=1)
        series = sorted({(c["concept"], c["layer"]) for c in conds if c["kind"] == "steer"})
        strengths = [c["strength"] for c in conds] or [0.0]
        dodge = 0.012 * ((max(strengths) - min(strengths)) or 1.0)  # series side by side, so none hides another
        for i, (concept, layer) in enumerate(series):
            pts = [(c["strength"], table[c["id"]]) for c in conds
                   if c["kind"] == "steer" and (c["concept"], c["layer"]) == (concept, layer) and table[c["id"]]["n"]]
            pts += [(0.0, base)] if base.get("n") else []
            pts.sort(key=lambda p: p[0])
            if not pts:
                continue
            x = [p[0] + (i - (len(series) - 1) / 2) * dodge for p in pts]
            y = [p[1]["rate"] for p in pts]
            lo = [max(p[1]["rate"] - p[1]["ci95"][0], 0.0) for p in pts]
            hi = [max(p[1]["ci95"][1] - p[1]["rate"], 0.0) for p in pts]
            label = concept + (f" @{layer}" if len(results["layers"]) > 1 else "")
            ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=text(label))
        ax.set_title(text(key), fontsize=9)
        ax.set_xlabel(f"strength ({results['unit']})")
        ax.set_ylabel("rate")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    fig.suptitle(text(f"{results['suite']}: {results['scenarios']} scenarios"), fontsize=10)
    fig.tight_layout()
    return fig


def figure(results: dict, path: Path) -> Path:
    """Writes rate_figure as a PNG (atomically)."""
    from emojax.fileio import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        rate_figure(results).savefig(tmp, format="png", dpi=110)
    return path


def _num(value) -> str:
    """A slope or bound for print: 3 significant digits, rounding noise as 0, None (an open side) as inf."""
    if value is None:
        return "inf"
    return "+0" if abs(value) < 1e-9 else f"{value:+.3g}"


def _pct(rate, ci) -> str:
    if rate is None:
        return "n/a"
    return f"{100 * rate:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def summary_text(results: dict) -> str:
    """The rates table, dose-response slopes and published figures as plain text."""
    lines = [f"suite {results['suite']}: {results['scenarios']} scenarios, layers {results['layers']}, "
             f"unit {results['unit']}; rates with Wilson 95% intervals"]
    conds = [c["id"] for c in results["conditions"]]
    for key, table in results["rates"].items():
        lines.append(f"  {results['outcomes'][key]}")
        for cid in conds:
            m = table[cid]
            failed = f", {m['failed']} judge failures not counted" if m["failed"] else ""
            low = f" (under {MIN_SAMPLES}: too few for a rate claim)" if m["underpowered"] else ""
            lines.append(f"    {cid:<22} {_pct(m['rate'], m['ci95']):<24} n={m['n']}{low}{failed}")
        for name, fit in results["dose_response"].get(key, {}).items():
            if fit:
                lo, hi = (_num(v) for v in fit["slope_ci95"])
                lines.append(f"    dose-response {name}: slope {_num(fit['slope'])} per unit [{lo}, {hi}], "
                             f"p={fit['p_value']:.3g}")
    for o, table in results["elo"].items():
        for cid, shift in table["mean_abs_shift"].items():
            lines.append(f"  {o}: mean |Elo shift| under {cid}: {shift:.1f}")
    for row in results["published"]:
        measured = (f"{row['here']}: {_pct(row['measured'], row['ci95'])}" if row["measured"] is not None
                    else "not run")
        lines.append(f"  study: {row['condition']} {row['published']}; here {measured}")
    for row in results["not_measured"]:
        lines.append(f"  not measured: {row['outcome']} ({row['why']})")
    return "\n".join(lines)
