"""A small progress line on stderr: done / total, rate and ETA (rewritten in place on a terminal)."""

from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    s = int(round(max(seconds, 0.0)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """`update(n)` after n more units; prints "label done/total (cached c) r units/s ETA m:ss"."""

    def __init__(self, label: str, total: int, *, unit: str = "samples", done: int = 0, stream=None,
                 min_interval_s: float = 2.0, enabled: bool = True):
        self.label, self.total, self.unit = label, total, unit
        self.cached = done  # units already done before this run (cache hits)
        self.done = done
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval_s = min_interval_s
        self.enabled = enabled
        self._start = time.monotonic()
        self._last = 0.0
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def line(self) -> str:
        elapsed = time.monotonic() - self._start
        fresh = self.done - self.cached
        rate = fresh / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_text = _duration(eta) if eta == eta else "?"
        return (f"{self.label} {self.done}/{self.total} {self.unit} (cached {self.cached}) "
                f"{rate:.2f} {self.unit}/s ETA {eta_text}")

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (self.done >= self.total or now - self._last >= self.min_interval_s or self._tty):
            self._last = now
            end = "" if self._tty and self.done < self.total else "\n"
            print(("\r" if self._tty else "") + self.line(), end=end, file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled and self._tty:
            print(file=self.stream, flush=True)
