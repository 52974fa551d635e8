"""Progress reporting: a tqdm bar on a terminal, one line per event otherwise, nothing if quiet.

Errors of single rows are always reported (to stderr), quiet or not, but at most
``MAX_ROW_ERRORS`` of them one by one; the rest are counted in the final line. Warnings about the
whole run (``warning``) are always shown.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

MAX_ROW_ERRORS = 20
LOG_EVERY_SECONDS = 30.0


class Reporter:
    def __init__(self, quiet: bool = False, stream: TextIO | None = None, tty: bool | None = None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = self.stream.isatty() if tty is None else tty
        self._bar = None
        self._row_errors = 0
        self._last_log = 0.0
        self._started = time.monotonic()
        self._total = self._done_before = 0

    def event(self, message: str, error: bool = False) -> None:
        """One line about something that happened (a resume, a bad row, a written file)."""
        if error:
            self._row_errors += 1
            if self._row_errors > MAX_ROW_ERRORS:
                return
            if self._row_errors == MAX_ROW_ERRORS:
                message += " (further row errors are not shown one by one)"
        elif self.quiet:
            return
        self._write(message)

    def warning(self, message: str) -> None:
        """A line about the whole run (shown even when quiet, however many row errors came
        before it: those are capped, this is not)."""
        self._write(message)

    def _write(self, message: str) -> None:
        line = f"jobrunner: {message}"
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def start(self, total: int, done_before: int) -> None:
        self._total, self._done_before = total, done_before
        # the first line after LOG_EVERY_SECONDS too: a rate from the first batch alone (model
        # warm-up, kernels compiled) gave an ETA many times too long
        self._started = self._last_log = time.monotonic()
        if self.quiet or not self.tty:
            self.event(f"running {total - done_before} rows ({done_before} done before)")
            return
        from tqdm import tqdm

        self._bar = tqdm(
            total=total, initial=done_before, unit="row", file=self.stream, dynamic_ncols=True
        )

    def update(self, rows: int, generated_tokens: int, errors: int) -> None:
        """Cumulative counts of this session."""
        elapsed = max(time.monotonic() - self._started, 1e-9)
        if self._bar is not None:
            self._bar.n = self._done_before + rows
            self._bar.set_postfix(tok_s=f"{generated_tokens / elapsed:.1f}", errors=errors)
            return
        now = time.monotonic()
        if self.quiet or now - self._last_log < LOG_EVERY_SECONDS:
            return
        self._last_log = now
        left = self._total - self._done_before - rows
        rate = rows / elapsed
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        self.event(
            f"progress {self._done_before + rows}/{self._total} rows, {rate:.2f} rows/s, "
            f"{generated_tokens / elapsed:.1f} tok/s, {errors} errors, eta {eta}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
