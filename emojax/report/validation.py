"""Report section 5, validation: the top-activating tokens of each concept on held-out text (lift over chance)
and the numeric templates (monotone readouts as a quantity varies), from validate/top_tokens.json and
validate/templates.json. Every value goes through `escape`, `show` or `table` (markup.py)."""

from __future__ import annotations

from html import escape
from pathlib import Path

from emojax.concepts.top_tokens import MIN_CI_DOCUMENTS
from emojax.report import figures, inputs
from emojax.report.markup import NotRun, img, interval, is_number, show, table

VALIDATION_SHOWN = 6  # concepts of the top-token table with the highest and the lowest lift
TEMPLATE_OTHERS = 2  # concepts drawn and listed per template besides the expected ones: the largest |rho|


def _lift(e: dict) -> str:
    return interval(e, "lift", digits=2)


def _examples_html(examples: list, k: int = 3) -> str:
    """A concept's first `k` top tokens in context, the token itself in bold (every piece escaped)."""
    out = []
    for x in examples[:k]:
        if not isinstance(x, dict):
            continue
        pieces = [escape(str(x.get(key, "")).replace("\n", " ")) for key in ("left", "token", "right")]
        out.append(f"<code>{pieces[0]}<b>{pieces[1]}</b>{pieces[2]}</code>")
    return "<br>".join(out)


def _top_tokens(top: dict) -> str:
    s = top["summary"]
    sample = top.get("threshold_sample") or {}
    where = (f"exact over all {show(top.get('tokens'))} tokens" if sample.get("exact") else
             f"over a seeded uniform sample of {show(sample.get('tokens'))} tokens")
    text = (f"<p>Every token of the {escape(str(top['split']))} split ({show(top.get('tokens'))} tokens of "
            f"{show(top.get('documents'))} documents{', BOS left out' if top.get('bos_left_out') else ''}) read "
            f"with every concept at residual index {show(top['layer'])}. A token is top for a concept above the "
            f"concept's {show(top.get('percentile'))}th percentile ({where}). Lift: the share of a concept's top "
            "tokens lying in documents labelled with it, over that label's share of all tokens; 1 is chance. "
            f"Mean lift over {show(s.get('concepts'))} concepts, with a bootstrap interval over documents: "
            f"{interval(s, 'mean_lift', digits=2)}, against 1 by chance.")
    if is_number(s.get("with_interval")) and s["with_interval"]:
        text += (f" Of the {show(s['with_interval'])} concepts with enough documents for an interval of their own, "
                 f"{show(s.get('above_chance'))} lie above chance and {show(s.get('below_chance'))} below.")
    else:
        text += (" No concept has enough documents in the split for an interval of its own (at least "
                 f"{MIN_CI_DOCUMENTS}).")
    entries = sorted(((n, e) for n, e in top["concepts"].items() if isinstance(e, dict) and is_number(e.get("lift"))),
                     key=lambda ne: -ne[1]["lift"])
    if len(entries) > 2 * VALIDATION_SHOWN:
        entries = entries[:VALIDATION_SHOWN] + [("", None)] + entries[-VALIDATION_SHOWN:]
    rows = []
    for name, e in entries:
        if e is None:
            rows.append('<tr><td colspan="5">...</td></tr>')
            continue
        rows.append(f"<tr><td>{escape(name)}</td><td>{escape(_lift(e))}</td>"
                    f"<td>{show(e.get('in_label'))} / {show(e.get('above'))}</td><td>{show(e.get('documents'))}</td>"
                    f"<td>{_examples_html(e.get('examples') or [])}</td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("concept", "lift (95% CI)", "top tokens in its documents / top tokens",
                                              "its documents", "top tokens in context"))
    return (text + "</p><p>The concepts with the highest and the lowest lift:</p>"
            f'<table class="lens"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _template_rows(t: dict, names: list) -> list[tuple[str, int | None, int]]:
    """(concept, expected direction or None, column) of the concepts shown for template `t`: the expected ones,
    then the TEMPLATE_OTHERS others with the largest |rho|."""
    expected = {e["concept"]: (1 if e.get("direction") == "up" else -1) for e in t["expected"]
                if e.get("concept") in names}
    shown = [(c, d, names.index(c)) for c, d in expected.items()]
    others = sorted((i for i, r in enumerate(t["rho"]) if is_number(r) and names[i] not in expected),
                    key=lambda i: -abs(t["rho"][i]))
    return shown + [(names[i], None, i) for i in others[:TEMPLATE_OTHERS]]


def _templates(curves: dict) -> str:
    names = list(curves["concepts"])
    z = curves["metric"] == "z"
    unit = "z-score against neutral text" if z else "cos(x - center, v)"
    panels, rows = [], []
    for t in curves["templates"]:
        shown = _template_rows(t, names)
        panels.append({"name": t["name"], "values": t["values"],
                       "curves": {c: [row[i] for row in t["readouts"]] for c, _, i in shown},
                       "expected": {c: d for c, d, _ in shown if d is not None}})
        for c, d, i in shown:
            verdict = "-" if d is None else ("yes" if (t["rho"][i] or 0) * d > 0 else "no")
            rows.append([t["name"], c, "-" if d is None else ("up" if d > 0 else "down"), t["rho"][i], t["p"][i],
                         verdict])
    s = curves["summary"]
    text = (f"<p>Each template's sentence with its quantity varied, framed as a Human turn and read at the ':' "
            f"after \"Assistant\" at residual index {show(curves['layer'])}; readings are "
            f"{'z-scores against neutral text (as the monitor shows them)' if z else 'centred cosines'}. Monotonicity: "
            "Spearman rho of value against readout, with a permutation p-value over orderings of the values; the "
            "intervals below resample templates, the independent unit.")
    if is_number(s.get("expected")) and s["expected"]:
        text += (f" Expected directions: {show(s.get('agree'))} of {show(s['expected'])} as expected, "
                 f"{interval(s, 'agree_rate', 100, 1, '%')}, against 50% for a random "
                 f"sign (permutation null 95% range {_range(s.get('agree_chance_range95'))}; p = "
                 f"{show(s.get('agree_p_value'))}).")
    if is_number(s.get("curves")) and s["curves"]:
        text += (f" Curves monotone at p &lt; 0.05: {show(s.get('monotone'))} of {show(s['curves'])}, "
                 f"{interval(s, 'monotone_rate', 100, 1, '%')}, against 5% by chance "
                 f"(permutation null 95% range, which keeps a template's concepts together: "
                 f"{_range(s.get('monotone_chance_range95'))}; p = {show(s.get('monotone_p_value'))}).")
    return (text + "</p>" + img(figures.template_curves(panels, unit), "numeric template curves")
            + table(["template", "concept", "expected", "Spearman rho", "permutation p", "as expected"], rows))


def _range(bounds) -> str:
    if isinstance(bounds, list) and len(bounds) == 2 and all(is_number(b) for b in bounds):
        return f"{100 * bounds[0]:.1f}-{100 * bounds[1]:.1f}%"
    return "-"


def validation(run_dir: Path) -> str:
    top, curves = inputs.top_tokens(run_dir), inputs.template_curves(run_dir)
    if top is None and curves is None:
        raise NotRun("validate/top_tokens.json and validate/templates.json are missing")
    parts = []
    if top is not None:
        parts.append("<h3>Top-activating tokens on held-out text</h3>" + _top_tokens(top))
    if curves is not None:
        parts.append("<h3>Numeric templates</h3>" + _templates(curves))
    return "".join(parts)
