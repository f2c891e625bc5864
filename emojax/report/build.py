"""Assembles the report: one self-contained HTML file (inline CSS, figures as PNG data URIs, no external URL)
at run_dir/report/index.html.

A section whose inputs are absent shows "not run" (an optional one, data screening and the shaping sections of
emojax.report.shaping, is left out); one whose inputs
exist but cannot be read shows the reason (and the rest of the report still renders). A small inline script records
on <body>, once the page has loaded, how many images decoded (data-images-loaded="N/M") and any script error
(data-error), so a headless browser can check the page.

Safety: every value from the run directory is HTML-escaped where it is placed (markup.py); anything inside the
<script> element has `</` written as `<\\/`, so no text can close it. The page is written atomically
(emojax.fileio): a crash or a full disk leaves the previous index.html, and a rerun completes.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from html import escape
from pathlib import Path

from emojax.errors import EmojaxError
from emojax.fileio import DiskFullError, write_text
from emojax.report import screening, sections, shaping
from emojax.report.markup import NotRun, Omitted

# The run's sections, then the optional ones (left out of the page when their inputs are absent).
SECTIONS = (*sections.SECTIONS,
            ("screening", "10. Data screening: concept scores of prompt/response samples", screening.screening),
            *shaping.SECTIONS)

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;
color:#222;background:#fff}
h1{margin-bottom:.1em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
.sub{color:#666;margin-top:0}
table{border-collapse:collapse;margin:.5em 1.5em .5em 0;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td{font-variant-numeric:tabular-nums}
table.compact td,table.compact th{padding:1px 6px;font-size:12px}
table.lens code{background:#f4f4f4;padding:0 3px;margin:1px;display:inline-block;font-size:12px}
.row{display:flex;flex-wrap:wrap;align-items:flex-start}
img{max-width:100%;height:auto;display:block;margin:.5em 0}
.status{display:inline-block;padding:.3em .8em;border-radius:4px;font-weight:600}
.not-run{background:#f1f1f1;color:#777}.failed{background:#fde8e8;color:#a12}
blockquote{background:#fafafa;border-left:4px solid #ccc;margin:.5em 0;padding:.5em 1em;white-space:pre-wrap}
nav a{margin-right:1em}
.tokens{font:12px/1.9 ui-monospace,monospace;white-space:pre-wrap;margin:.2em 0 1em;max-width:100%}
"""

SCRIPT = """
window.addEventListener("error", function (e) {
  document.body.setAttribute("data-error", String(e.message || e.type));
});
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; } else { imgs[i].setAttribute("data-broken", "1"); }
  }
  document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
});
"""


def script_text(code: str) -> str:
    """`code` (or JSON) safe inside <script>...</script>: the HTML parser ends the element at the first `</`
    whatever the JavaScript means, and `<\\/` is the same string to JavaScript and JSON."""
    return code.replace("</", "<\\/")


def _section(anchor: str, title: str, render: Callable[[Path], str], run_dir: Path, log) -> tuple[str, str]:
    """(status, html) of one section; status is ok, not-run, failed or omitted (html empty)."""
    try:
        body, status = render(run_dir), "ok"
    except DiskFullError:  # not a malformed input: stop, so the rerun after freeing space redoes the report
        raise
    except Omitted:
        return "omitted", ""
    except NotRun as e:
        body, status = f'<p><span class="status not-run">not run</span> {escape(str(e))}</p>', "not-run"
    except (EmojaxError, KeyError, ValueError, TypeError, IndexError) as e:  # malformed inputs: say so, go on
        log(f"report: section {anchor!r} failed: {type(e).__name__}: {e}")
        body = (f'<p><span class="status failed">could not render</span> '
                f"{escape(type(e).__name__)}: {escape(str(e))}</p>")
        status = "failed"
    return status, (f'<section id="{escape(anchor)}" data-status="{status}"><h2>{escape(title)}</h2>{body}'
                    "</section>")


def build_report(run_dir: str | Path, log: Callable[[str], None] | None = None) -> Path:
    """Writes run_dir/report/index.html from whatever stages of the run have finished; returns its path."""
    log = log or (lambda _msg: None)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EmojaxError(f"{run_dir}: no such run directory (made by `emojax run`)")
    parts, statuses = [], {}
    for anchor, title, render in SECTIONS:
        statuses[anchor], html = _section(anchor, title, render, run_dir, log)
        parts.append(html)
    nav = "".join(f'<a href="#{escape(a)}">{escape(t.split(":")[0])}</a>' for a, t, _ in SECTIONS
                  if statuses[a] != "omitted")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>emojax report: {escape(run_dir.resolve().name)}</title><style>{CSS}</style></head>"
        f"<body><h1>emojax report</h1><p class=\"sub\">{escape(str(run_dir.resolve()))} &middot; {stamp}</p>"
        f"<nav>{nav}</nav>{''.join(parts)}<script>{script_text(SCRIPT)}</script></body></html>\n"
    )
    out = write_text(run_dir / "report" / "index.html", page)
    shown = {a: s for a, s in statuses.items() if s != "omitted"}
    done = sum(s == "ok" for s in shown.values())
    log(f"report: wrote {out} ({done}/{len(shown)} sections; not run: "
        f"{[a for a, s in statuses.items() if s == 'not-run']})")
    return out
