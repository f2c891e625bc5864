"""Matplotlib figures without pyplot (no global state, no display): the one way emojax lays out a grid of panels,
shared by the report and the experiment harness's own figures."""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100


def panel_grid(n: int, per_row: int, height: float) -> tuple[Figure, np.ndarray]:
    """A figure of n panels, `per_row` to a row (4.6 wide, `height` high each): the figure and its n axes (the
    grid's unused cells hidden)."""
    cols = min(per_row, max(n, 1))
    rows = -(-n // cols)
    fig = Figure(figsize=(4.6 * cols, height * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]
