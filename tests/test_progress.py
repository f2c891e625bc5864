"""The one progress/log helper: numbers at 4 significant digits, counts with separators, log lines on stderr."""

from __future__ import annotations

import numpy as np

from emojax.progress import fmt, log, progress_bar


def test_fmt_prints_floats_at_4_significant_digits_and_counts_whole():
    assert fmt(0.07479999959468842) == "0.0748"
    assert fmt(np.float32(0.0748)) == "0.0748"
    assert fmt(123.456789) == "123.5" and fmt(2.0) == "2" and fmt(1.5e-7) == "1.5e-07"
    assert fmt(1234567) == "1,234,567" and fmt(np.int64(42)) == "42"
    assert fmt(np.array([0.07479999959468842, 12.0], np.float32)) == "[0.0748, 12]"
    assert fmt([3, 0.5]) == "[3, 0.5]"
    assert fmt(float("nan")) == "nan" and fmt(True) == "True" and fmt(None) == "None"


def test_log_lines_go_to_stderr_as_is_and_a_disabled_bar_prints_nothing(capsys):
    with progress_bar("stage", 10, enabled=False) as update:
        update(advance=4, status="4 tok/s")
        log("stage: [not markup] done")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "stage: [not markup] done\n"
