"""Progress on long work: a bar on a terminal, nothing when stderr is a file or a pipe."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, label: str, total: int | None = None, stream: TextIO | None = None):
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self._started = time.monotonic()
        self._last = 0.0

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        rate = done / max(now - self._started, 1e-9)
        if self.total:
            share = min(done / self.total, 1.0)
            bar = "#" * int(share * 30)
            line = f"{self.label} [{bar:<30}] {done}/{self.total} ({rate:,.0f}/s)"
        else:
            line = f"{self.label}: {done} ({rate:,.0f}/s)"
        self.stream.write("\r" + line)
        self.stream.flush()

    def done(self, count: int) -> None:
        if not self.enabled:
            return
        self._last = 0.0
        self.update(count)
        self.stream.write("\n")
        self.stream.flush()
