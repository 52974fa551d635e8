"""Progress reporting: a bar on a terminal, plain lines otherwise, only row errors when quiet."""

from __future__ import annotations

import io

from jobrunner import progress
from jobrunner.progress import Reporter


def test_log_lines_when_not_a_terminal(monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 0.0)
    out = io.StringIO()
    reporter = Reporter(stream=out, tty=False)
    reporter.start(total=10, done_before=4)
    reporter.update(rows=3, generated_tokens=30, errors=1)
    reporter.event("wrote out.parquet")
    lines = out.getvalue().splitlines()
    assert lines[0] == "jobrunner: running 6 rows (4 done before)"
    assert lines[1].startswith("jobrunner: progress 7/10 rows,") and "1 errors" in lines[1]
    assert lines[2] == "jobrunner: wrote out.parquet"
    assert "\r" not in out.getvalue()  # no bar redraws in logs


def test_the_first_progress_line_waits_its_interval_too():
    """A rate from the first batch alone (warm-up included) gave an ETA far too long: the first
    line, like the others, comes LOG_EVERY_SECONDS after the start."""
    out = io.StringIO()
    reporter = Reporter(stream=out, tty=False)
    reporter.start(total=10, done_before=0)
    reporter.update(rows=1, generated_tokens=10, errors=0)
    assert out.getvalue().splitlines() == ["jobrunner: running 10 rows (0 done before)"]


def test_quiet_reports_only_row_errors_and_caps_them():
    out = io.StringIO()
    reporter = Reporter(quiet=True, stream=out, tty=False)
    reporter.start(total=5, done_before=0)
    reporter.event("resuming")
    for i in range(progress.MAX_ROW_ERRORS + 5):
        reporter.event(f"row {i}: broken", error=True)
    lines = out.getvalue().splitlines()
    assert len(lines) == progress.MAX_ROW_ERRORS
    assert lines[0] == "jobrunner: row 0: broken"
    assert "not shown one by one" in lines[-1]


def test_bar_on_a_terminal():
    out = io.StringIO()
    reporter = Reporter(stream=out, tty=True)
    reporter.start(total=8, done_before=2)
    reporter.update(rows=4, generated_tokens=40, errors=0)
    reporter.close()
    text = out.getvalue()
    assert "6/8" in text and "row" in text and "tok_s" in text
