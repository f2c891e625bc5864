"""Progress bars, log lines and number formatting for every long stage (train-lm, dump, fit, SAE, run).

Bars and log lines share one console on stderr (a log line prints above a live bar), so stdout keeps only a
command's results; every number in them prints through `fmt`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def fmt(value) -> str:
    """A number as log lines print it: floats to 4 significant digits (0.07479999959468842 -> "0.0748"), ints
    with thousands separators (12345 -> "12,345"), arrays and lists element by element ("[0.0748, 12]")."""
    if np.ndim(value):
        return "[" + ", ".join(fmt(v) for v in np.ravel(value).tolist()) + "]"
    value = np.asarray(value).item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def fmt_ci(value, ci, spec: str = ".3f", scale: float = 1.0, unit: str = "", label: str | None = None,
           missing: str = "-") -> str:
    """A value with its interval, formatted by `spec` after multiplying by `scale`: "0.512 [0.401, 0.603]", or with
    a `label` "51.2% (95% CI 40.1-60.3%)"; `missing` for no value, the value alone for no interval."""
    if value is None:
        return missing

    def num(x):
        return f"{scale * x:{spec}}{unit}"

    if not ci:
        return num(value)
    if label is None:
        return f"{num(value)} [{num(ci[0])}, {num(ci[1])}]"
    return f"{num(value)} ({label}{scale * ci[0]:{spec}}-{num(ci[1])})"


def log(message: str, style: str | None = None) -> None:
    """One log line on stderr, above any live progress bar (the text as is: no rich markup)."""
    console.print(message, style=style, markup=False, highlight=False, soft_wrap=True)


@contextmanager
def progress_bar(description: str, total: float, *, enabled: bool = True,
                 completed: float = 0) -> Iterator[Callable[..., None]]:
    """A bar of `total` units on stderr; yields update(advance=, completed=, status=), status being the text shown
    after the percentage. Silent when `enabled` is False or stderr is not a terminal."""
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                   console=console, disable=not (enabled and console.is_terminal))
    task = bar.add_task(description, total=max(total, 1), completed=completed, status="")
    with bar:
        yield lambda **changes: bar.update(task, **changes)
