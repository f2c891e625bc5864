"""The report: one self-contained HTML file of a run's results (figures embedded as PNG data URIs)."""

from emojax.report.build import build_report
from emojax.report.inputs import ReportError

__all__ = ["ReportError", "build_report"]
