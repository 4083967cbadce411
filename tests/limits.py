"""A time limit for test blocks that used to hang: they fail with TimeoutError instead of stalling the suite."""

from __future__ import annotations

import signal


class alarm:
    """``with alarm(seconds):`` raises TimeoutError in the block after ``seconds`` (main thread, SIGALRM)."""

    def __init__(self, seconds: int):
        self.seconds = seconds

    def __enter__(self):
        def fail(signum, frame):
            raise TimeoutError(f"still running after {self.seconds} s")

        self.previous = signal.signal(signal.SIGALRM, fail)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)
