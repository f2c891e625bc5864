"""The HTML pieces the report's sections build with, and the exceptions a section raises when its inputs are absent.

Every value read from the run directory reaches the page through `escape` (directly, or through `show`, `table`
and `img`): labels, prompts and generated text are user text, and a run directory may come from someone else.
"""

from __future__ import annotations

from html import escape

from emojax.progress import fmt_ci


class NotRun(Exception):
    """The section's inputs are absent; the message says which files."""


class Omitted(NotRun):
    """The inputs of an optional section are absent: the section is left out of the page (not shown as "not run")."""


def need(value, what: str):
    """`value`, or NotRun(what) when it is None or empty."""
    if value is None or (hasattr(value, "__len__") and not len(value)):
        raise NotRun(what)
    return value


def show(value) -> str:
    """A value of a stage's JSON as report text: numbers as log lines print them, dicts as k=v, long lists cut."""
    if isinstance(value, bool) or value is None:
        return escape(str(value).lower() if isinstance(value, bool) else "-")
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, dict):
        return ", ".join(f"{escape(str(k))}={show(v)}" for k, v in value.items() if not isinstance(v, (dict, list)))
    if isinstance(value, list):
        return escape(", ".join(str(v) for v in value[:20]) + (" ..." if len(value) > 20 else ""))
    return escape(str(value))


def table(header: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{show(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{escape(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def img(uri: str, alt: str) -> str:
    return f'<img src="{escape(uri)}" alt="{escape(alt)}">'


def interval(m: dict, key: str, scale: float = 1.0, digits: int = 3, unit: str = "") -> str:
    """A metric of eval.json with its bootstrap interval, e.g. '5.1% (95% CI 2.3-8.2%)'; '-' for what is not a
    number (eval.json is read, never trusted)."""
    value, ci = m.get(key), m.get(f"{key}_ci95")
    if not is_number(value):
        return "-"
    ok = isinstance(ci, list) and len(ci) == 2 and all(is_number(c) for c in ci)
    return fmt_ci(value, ci if ok else None, f".{digits}f", scale, unit, label="95% CI ")


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
