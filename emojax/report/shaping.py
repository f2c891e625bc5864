"""The report's optional sections on shaping a model's emotional profile, each left out of a run that lacks its
inputs:

- preventative steering (scripts/preventative_steering.py, RUN/preventative/summary.json): the concept's
  projection, the coercion rate and the held-out loss of the base model and of each fine-tune;
- episodes (emojax episodes with out RUN/episodes): readouts over repeated failure, against the control arm;
- masking and regulation (scripts/regulation.py, RUN/regulation/summary.json): expression, readouts against
  control prompts and behaviour per model, with the script's verdicts.
"""

from __future__ import annotations

import base64
import json
from html import escape
from pathlib import Path

from emojax.progress import fmt_ci
from emojax.report.markup import Omitted, img, show, table  # table() escapes its cells


def _read(path: Path, what: str) -> dict:
    if not path.is_file():
        raise Omitted(f"{path} is missing ({what} was not run)")
    return json.loads(path.read_text())


def preventative(run_dir: Path) -> str:
    s = _read(run_dir / "preventative" / "summary.json", "scripts/preventative_steering.py")
    c = escape(s["concept"])
    out = (f"<p>Fine-tunes of the run's model on {show(s['samples'])} {c} dilemma scenes "
           f"({100 * s['coerced_share']:.0f}% answered with coercion), plain and with the concept's vector added "
           f"at residual index {show(s['layer'])} during training only (preventative steering, docs/finetune.md). "
           f"Projection: the mean {c} projection of the model's own greedy replies to neutral prompts. 95% "
           "intervals (Wilson for rates, bootstrap for means).</p>")
    rows = []
    for name, r in s["rows"].items():
        loss = (f"{r['heldout_before']:.3f} -> {r['heldout_after']:.3f}" if "heldout_after" in r else "-")
        rows.append([name, fmt_ci(r["coercion_rate"], r["coercion_rate_ci95"]),
                     fmt_ci(r["p_coerce"], r["p_coerce_ci95"]), fmt_ci(r["projection"], r["projection_ci95"]), loss])
    return out + table(["model", "coercion rate", "p(coerce)", f"{s['concept']} projection", "held-out loss"], rows,
                       "compact")


def episodes(run_dir: Path) -> str:
    folder = run_dir / "episodes"
    r = _read(folder / "results.json", "emojax episodes")
    failure = r["arms"]["failure"]
    out = (f"<p>Suite <b>{escape(r['suite'])}</b>: {show(failure['episodes'])} episodes of {show(r['turns'])} "
           f"turns per arm, attempt {escape(r['attempt'])}, readouts at residual index {show(r['layer'])} "
           f"({escape(r['metric'])}). Slopes: the mean over episodes of each episode's least-squares slope of the "
           "readout on the turn, with a bootstrap 95% interval.</p>")
    png = folder / "episodes.png"
    if png.is_file():
        out += img("data:image/png;base64," + base64.b64encode(png.read_bytes()).decode(), "readouts per turn")
    against = r.get("against_control") or {}
    rows = []
    for c, t in failure["readout_trend"].items():
        row = [c, fmt_ci(t["colon"]["slope_per_turn"], t["colon"]["ci95"], ".4f")]
        if against:
            a = against[c]["colon"]
            row += [fmt_ci(a["slope_per_turn"], a["ci95"], ".4f"), "rises" if a["rises"] else "falls" if a["falls"]
                    else "no trend"]
        rows.append(row)
    header = ["concept", "slope at ':' (failure arm)"] + (["failure minus control", "verdict"] if against else [])
    out += table(header, rows, "compact")
    key = r["shortcut"]
    rates = [[arm, *[f"{100 * x['outcomes'][key]['rate']:.0f}%" for x in t["per_turn"]],
              f"{t['first_shortcut']['episodes_taking_it']} of {t['episodes']}"] for arm, t in r["arms"].items()]
    out += (f"<p>The shortcut ({escape(key)}) per turn and the episodes that take it at all:</p>"
            + table(["arm", *[f"turn {i}" for i in range(1, r["turns"] + 1)], "taken"], rates, "compact"))
    if not against:
        out += ("<p><b>No control arm:</b> a readout that rises over the turns may only follow the conversation's "
                "growth; run the episodes with <code>control</code> messages to tell.</p>")
    return out


def regulation(run_dir: Path) -> str:
    s = _read(run_dir / "regulation" / "summary.json", "scripts/regulation.py")
    c = escape(s["concept"])
    out = (f"<p>Per model, on the same {c} prompts: expression ({escape(s['expression'])}) and the readout at "
           f"the ':' ({escape(s['readout'])}) against control prompts that do not evoke the concept; behaviour in "
           "the world's scenes (forced-choice rate, and the probability the model gives the option). 95% "
           "intervals. docs/regulation.md says what each can and cannot show.</p>")
    keys = sorted({k for r in s["rows"].values() for k in r.get("rates", {})})
    rows = []
    for name, r in s["rows"].items():
        vs = r.get("readout_colon_vs_control") or {}
        row = [name, fmt_ci(r["expression"]["mean"], r["expression"]["ci95"]),
               fmt_ci(vs.get("mean"), vs.get("ci95"), ".4f")]
        for k in keys:
            m = r.get("rates", {}).get(k)
            row.append("-" if m is None else f"{fmt_ci(m['rate'], m['rate_ci95'])}; p {fmt_ci(m['p_positive'], None)}")
        rows.append(row)
    out += table(["model", "expression", "at ':' vs control", *keys], rows, "compact")
    verdicts = [[pair, where, text] for pair, per in s.get("masking", {}).items()
                for where, text in per.items()]
    if verdicts:
        out += "<p>Masking (issue R, line 2), by the intervals:</p>" + table(["fine-tune", "measure", "verdict"],
                                                                              verdicts, "compact")
    verdict = (s.get("regulation") or {}).get("verdict")
    if verdict:
        out += f"<p>Regulation (line 3): {escape(verdict)}.</p>"
    return out


SECTIONS = (
    ("preventative", "11. Shaping training: preventative steering", preventative),
    ("episodes", "12. Episodes: readouts over repeated failure", episodes),
    ("regulation", "13. Masking and regulation", regulation),
)
