"""The report's figures, drawn with matplotlib's Agg canvas (no display, no pyplot global state) and returned
as PNG data URIs ready for an <img src=...>.

User text (concept names, SAE names, tokens) passes through `literal` before it reaches matplotlib, which would
otherwise parse anything between two `$` as mathtext: a label "$x$" would render as an italic x, and one like
"$\\foo$" would fail the whole figure.
"""

from __future__ import annotations

import base64
import io

import matplotlib
import numpy as np
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from emojax.plotting import DPI, panel_grid


def literal(text) -> str:
    """`text` as matplotlib draws it verbatim: every `$` escaped, so no mathtext is parsed. (Escaping rather than
    Text.set_parse_math(False), because tick labels are re-created at draw time without that setting.)"""
    return str(text).replace("$", r"\$")


def _new(width: float, height: float, ncols: int = 1):
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def to_data_uri(fig: Figure) -> str:
    """The figure as a base64 PNG data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def emotion_map(names: list[str], scores_C2: np.ndarray, valence: list[float | None], explained: list[float],
                clusters: list[int] | None = None) -> str:
    """PC1 vs PC2 of the concept vectors; colour = graded valence (-1..+1, grey when a concept has none)."""
    C = len(names)
    side = float(np.clip(4 + 0.06 * C, 7, 14))
    fig, (ax,) = _new(side, side * 0.8)
    known = np.array([v is not None for v in valence])
    vals = np.array([v if v is not None else 0.0 for v in valence], float)
    if (~known).any():
        ax.scatter(scores_C2[~known, 0], scores_C2[~known, 1], c="#999999", s=30, label="no valence annotation")
    sc = ax.scatter(scores_C2[known, 0], scores_C2[known, 1], c=vals[known], cmap="coolwarm_r", vmin=-1, vmax=1,
                    s=40, edgecolors="k", linewidths=0.4)
    fig.colorbar(sc, ax=ax, shrink=0.7, label="valence (graded: -1 very unpleasant, +1 very pleasant)")
    size = float(np.clip(11 - C / 25, 5, 10))
    for i, name in enumerate(names):
        tag = f"{name} [{clusters[i]}]" if clusters is not None else name
        ax.annotate(literal(tag), scores_C2[i], xytext=(3, 2), textcoords="offset points", fontsize=size)
    pct = [f"{100 * e:.0f}%" for e in (list(explained) + [0, 0])[:2]]
    ax.set_xlabel(f"PC1 ({pct[0]} of variance)")
    ax.set_ylabel(f"PC2 ({pct[1]} of variance)")
    ax.axhline(0, color="#ccc", lw=0.6, zorder=0)
    ax.axvline(0, color="#ccc", lw=0.6, zorder=0)
    if (~known).any():
        ax.legend(loc="best", fontsize=8)
    return to_data_uri(fig)


def cluster_order(cos_CC: np.ndarray) -> np.ndarray:
    """Row order from average-linkage hierarchical clustering on cosine distance (1 - cos)."""
    C = len(cos_CC)
    if C < 3:
        return np.arange(C)
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    dist = np.clip(1.0 - (cos_CC + cos_CC.T) / 2, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    return leaves_list(linkage(squareform(dist, checks=False), method="average"))


def cosine_heatmap(names: list[str], cos_CC: np.ndarray, order: np.ndarray) -> str:
    """The cosine-similarity matrix with rows and columns in `order`."""
    C = len(names)
    side = float(np.clip(3 + 0.12 * C, 6, 22))
    fig, (ax,) = _new(side, side * 0.9)
    im = ax.imshow(cos_CC[np.ix_(order, order)], cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.6, label="cosine similarity")
    labels = [literal(names[i]) for i in order]
    size = float(np.clip(12 - C / 15, 3, 9))
    ax.set_xticks(range(C), labels, rotation=90, fontsize=size)
    ax.set_yticks(range(C), labels, fontsize=size)
    return to_data_uri(fig)


def accuracy_by_layer(layers: list[int], series: dict[str, list[float | None]], n_concepts: int,
                      best: int | None) -> str:
    """Held-out accuracy per layer; `series` maps 'split readout topk' to one value (or None) per layer."""
    fig, axes = _new(11, 4, ncols=2)
    for ax, k in zip(axes, ("top1", "top5")):
        for label, values in series.items():
            if not label.endswith(k):
                continue
            ys = [np.nan if v is None else v for v in values]
            style = "-" if " test " in f" {label} " else "--"
            ax.plot(layers, ys, style, marker="o", label=literal(label.rsplit(" ", 1)[0]))
        chance = min(1.0, (1 if k == "top1" else 5) / max(n_concepts, 1))
        ax.axhline(chance, color="grey", ls=":", label=f"chance ({chance:.2f})")
        if best is not None:
            ax.axvline(best, color="#d62728", alpha=0.3, lw=6, label=literal(f"best layer {best}"))
        ax.set_title(f"{k.replace('top', 'top-')} accuracy")
        ax.set_xlabel("residual index (0 = embeddings)")
        ax.set_ylim(0, 1.02)
        ax.set_xticks(layers)
        ax.legend(fontsize=7)
    return to_data_uri(fig)


def sae_tradeoff(rows: list[dict]) -> str:
    """L0 vs FVU per SAE (left) and the dead-latent fraction per SAE (right)."""
    fig, (ax, bx) = _new(11, 4, ncols=2)
    names = [literal(r["name"]) for r in rows]
    l0 = np.array([float(r["l0"]) for r in rows])
    fvu = np.array([float(r["fvu"]) for r in rows])
    ax.scatter(l0, fvu, c=range(len(rows)), cmap="viridis", s=50, edgecolors="k")
    for x, y, n in zip(l0, fvu, names):
        ax.annotate(n, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=8)
    if len(rows) > 1 and (l0 > 0).all() and l0.max() / l0.min() > 8:
        ax.set_xscale("log")
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("FVU (fraction of variance unexplained)")
    ax.set_title("sparsity vs reconstruction")
    bx.bar(range(len(rows)), [float(r["dead_fraction"]) for r in rows], color="#8c564b")
    bx.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    bx.set_ylabel("dead fraction")
    bx.set_ylim(0, 1)
    bx.set_title("dead latents")
    return to_data_uri(fig)


def steering_curves(concepts: dict[str, dict]) -> str:
    """Concept readout, fluency (perplexity) and, when given, log-prob shift against steering strength."""
    panels = [("readout", "concept readout"), ("fluency_ppl", "fluency: perplexity")]
    if any(c.get("logprob_shift") for c in concepts.values()):
        panels.append(("logprob_shift", "log-prob shift (nats)"))
    fig, axes = _new(5 * len(panels), 4, ncols=len(panels))
    for ax, (key, title) in zip(axes, panels):
        for name, curve in concepts.items():
            ys = curve.get(key)
            if ys:
                ax.plot(curve["strengths"], [np.nan if y is None else y for y in ys], marker="o", ms=3,
                        label=literal(name))
        ax.axvline(0, color="#ccc", lw=0.8)
        ax.set_xlabel("steering strength (fraction of mean residual norm)")
        ax.set_title(title)
        values = [y for c in concepts.values() for y in (c.get(key) or []) if y is not None and y > 0]
        if key == "fluency_ppl" and values and max(values) / min(values) > 20:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    return to_data_uri(fig)


def monitor_heatmap(tokens: list[str], concepts: list[str], readings_TC: np.ndarray, per_row: int = 48) -> str:
    """Concept (rows) x token (columns) readings scaled to +-1 by the sample's 99th percentile of |reading|
    (the study's transcript scaling); long samples wrap into several panels."""
    scale = float(np.percentile(np.abs(readings_TC), 99)) if readings_TC.size else 1.0
    scaled = np.clip(readings_TC / max(scale, 1e-12), -1, 1)
    T = len(tokens)
    n_panels = max(1, -(-T // per_row))
    width = float(np.clip(2 + 0.22 * min(T, per_row), 6, 14))
    fig = Figure(figsize=(width, n_panels * (0.9 + 0.28 * len(concepts))), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_panels, 1, squeeze=False)[:, 0]
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="white")
    cols = min(T, per_row)
    im = None
    for p, ax in enumerate(axes):
        lo, hi = p * per_row, min(T, (p + 1) * per_row)
        panel = np.full((cols, len(concepts)), np.nan)  # the last panel keeps the others' column width
        panel[:hi - lo] = scaled[lo:hi]
        im = ax.imshow(np.ma.masked_invalid(panel.T), cmap=cmap, vmin=-1, vmax=1, aspect="auto",
                       interpolation="nearest")
        ax.set_yticks(range(len(concepts)), [literal(c) for c in concepts], fontsize=8)
        ax.set_xticks(range(hi - lo), [literal(repr(t)[1:-1]) for t in tokens[lo:hi]], rotation=90, fontsize=7)
    fig.colorbar(im, ax=list(axes), shrink=0.8, label=f"reading / {scale:.3g} (99th pct |reading|)")
    return to_data_uri(fig)


def template_curves(templates: list[dict], unit: str, per_row: int = 3) -> str:
    """One panel per numeric template: each listed concept's readout against the template's value. `templates`:
    [{"name", "values", "curves": {label: readings}, "expected": {label: +1 or -1}}]; an expected concept is drawn
    solid (its label marks the direction), the others dashed. A log x axis when the values span over 20x."""
    fig, axes = panel_grid(len(templates), per_row, 3.6)
    for ax, t in zip(axes, templates):
        values = np.asarray(t["values"], float)
        for label, ys in t["curves"].items():
            direction = t["expected"].get(label)
            tag = f"{label} (expected {'up' if direction > 0 else 'down'})" if direction else label
            ax.plot(values, ys, "-" if direction else "--", marker="o", ms=3, label=literal(tag))
        if (values > 0).all() and values.max() / values.min() > 20:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(literal(t["name"]), fontsize=10)
        ax.set_xlabel("value of {x}")
        ax.set_ylabel(unit)
        ax.legend(fontsize=7)
    return to_data_uri(fig)


def score_histograms(panels: list[dict], score: str, per_row: int = 3) -> str:
    """One panel per screened concept: the histogram of every sample's `score` (log counts) with the flag cutoff.
    `panels`: [{"concept", "scores", "cutoff", "flagged"}]."""
    fig, axes = panel_grid(len(panels), per_row, 3.4)
    for ax, p in zip(axes, panels):
        scores = np.asarray(p["scores"], float)
        ax.hist(scores, bins=int(np.clip(np.sqrt(len(scores)), 10, 60)), color="#4c72b0", log=True)
        if np.isfinite(p["cutoff"]):
            ax.axvline(p["cutoff"], color="#d62728", lw=1.5, label=f"flag cutoff ({p['flagged']:,} flagged)")
            ax.legend(fontsize=7)
        ax.set_title(literal(p["concept"]), fontsize=10)
        ax.set_xlabel(f"{score} (projection on the unit vector)")
        ax.set_ylabel("samples")
    return to_data_uri(fig)
