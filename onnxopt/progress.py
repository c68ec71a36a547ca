"""Progress reporting for long runs, silenced by ``-q``.

Core code reports through a ``Progress`` object it is handed; it never prints on its own.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


class Progress:
    def __init__(self, enabled: bool = True, stream=None, min_interval: float = 0.2):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval = min_interval

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    @contextmanager
    def task(self, description: str, total: int | None = None):
        bar = _Bar(self, description, total)
        try:
            yield bar
        finally:
            bar.close()


class _Bar:
    def __init__(self, progress: Progress, description: str, total: int | None):
        self.p = progress
        self.description = description
        self.total = total
        self.done = 0
        self.start = time.perf_counter()
        self._last = 0.0
        self._tty = bool(getattr(progress.stream, "isatty", lambda: False)())

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.p.enabled and self._tty and now - self._last >= self.p.min_interval:
            self._last = now
            self._draw(end="")

    def _draw(self, end: str) -> None:
        elapsed = time.perf_counter() - self.start
        if self.total:
            pct = 100.0 * self.done / self.total
            text = f"{self.description}: {self.done}/{self.total} ({pct:.0f}%) {elapsed:.1f}s"
        else:
            text = f"{self.description}: {self.done} {elapsed:.1f}s"
        prefix = "\r" if self._tty else ""
        print(f"{prefix}{text}", end=end, file=self.p.stream, flush=True)

    def close(self) -> None:
        if self.p.enabled:
            self._draw(end="\n")


SILENT = Progress(enabled=False)
