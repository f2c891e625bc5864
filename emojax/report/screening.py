"""The report's data-screening section (emojax screen with --out RUN_DIR/screen): the score histograms with each
concept's flag cutoff, and the top flagged samples with their response tokens coloured by their projections. The
section is left out of the report of a run without a screen."""

from __future__ import annotations

from html import escape
from pathlib import Path

import numpy as np

from emojax.report import figures, inputs
from emojax.report.markup import Omitted, img, show, table
from emojax.screen.flags import rank
from emojax.screen.score import column

SHOWN = 5  # top flagged samples shown per concept


def highlighted(tokens: list[str], values: np.ndarray, scale: float) -> str:
    """Tokens as spans coloured by value / scale (red above 0, blue below, clipped at +-1), the value as a tooltip."""
    spans = []
    for token, v in zip(tokens, values):
        a = float(np.clip(abs(v) / scale, 0, 1)) if scale > 0 else 0.0
        rgb = "214,39,40" if v > 0 else "31,119,180"
        spans.append(f'<span title="{v:.4g}" style="background:rgba({rgb},{a:.2f})">'
                     f"{escape(token).replace(chr(10), '&#8629;<br>')}</span>")
    return f'<div class="tokens">{"".join(spans)}</div>'


def screening(run_dir: Path) -> str:
    found = inputs.screen_output(run_dir)
    if found is None:
        raise Omitted("screen/manifest.json is missing")
    manifest, scores = found
    rule = manifest["settings"].get("flag", {})
    by = rule.get("by", "diff")
    ids = np.asarray(scores.column("sample_id").to_pylist(), str)
    tokens = scores.column("tokens").to_pylist()
    panels, rows, examples = [], [], []
    for concept in manifest["concepts"]:
        f = manifest["flags"][concept]
        values = scores.column(column(by, concept)).to_numpy()
        panels.append({"concept": concept, "scores": values, "cutoff": float(f["cutoff"]), "flagged": f["flagged"]})
        rows.append([concept, f["flagged"], f["cutoff"], f["mean"], f["std"]])
        per_token = scores.column(column("tokens", concept)).to_pylist()
        shown = [int(i) for i in rank(values, ids)[:min(SHOWN, f["flagged"])] if tokens[i] is not None]
        if not shown:
            continue
        scale = float(np.percentile(np.abs(np.concatenate([per_token[i] for i in shown])), 99))
        examples.append(f"<h3>{escape(concept)}: the top {len(shown)} flagged samples</h3>" + "".join(
            f"<p>{show(str(ids[i]))}: {escape(by)} {show(float(values[i]))}</p>"
            + highlighted(tokens[i], np.asarray(per_token[i]), scale) for i in shown))
    text = (f"<p>{show(manifest['samples'])} samples screened at residual index {show(manifest['layer'])}: per sample "
            "and concept, proj = the mean over the response's tokens of the residual stream's projection on the "
            "concept's unit vector, own = the same over the model's own greedy response to the prompt, and diff = "
            f"proj - own. Flagged by {escape(by)}: {escape(str(rule.get('method')))} {show(rule.get('value'))} "
            "(threshold: score at least the value; zscore: standard deviations above the mean; top: a fraction of "
            "the samples). Tokens below are coloured by their projection, scaled to +-1 by the 99th percentile of "
            "|projection| over the samples shown.</p>")
    return (text + table(["concept", "flagged", f"cutoff ({by})", "mean", "std"], rows, "kv")
            + img(figures.score_histograms(panels, by), "score histograms") + "".join(examples))
