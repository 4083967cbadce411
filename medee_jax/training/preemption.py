"""SIGTERM and SIGINT as a request to stop: save a checkpoint, then exit cleanly.

Between steps a signal only sets a flag, which the loop checks after each step (a step or a checkpoint save is
never cut in half). While the loop waits for data (``Preemption.loading()``), which can take arbitrarily long (slow
storage, image decoding, a file of bad records being skipped), the signal interrupts the wait with ``Interrupted``;
the loop then saves the state of the last finished step with the data position that step ended at. A second SIGINT
(Ctrl-C pressed again) raises KeyboardInterrupt at once.
"""

from __future__ import annotations

import contextlib
import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A stop signal arrived while the loop was waiting for data; ``signal_name`` says which. A BaseException,
    as KeyboardInterrupt is, so that no ``except Exception`` in the input pipeline's libraries swallows it."""

    def __init__(self, signal_name: str):
        super().__init__(f"{signal_name} while reading data")
        self.signal_name = signal_name


class Preemption:
    """Installs the handlers for its ``with`` block (main thread only; elsewhere it never fires)."""

    def __init__(self):
        self.requested: str | None = None  # name of the first stop signal received
        self._loading = False
        self._previous: dict = {}

    def __enter__(self) -> "Preemption":
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.requested is None:
            self.requested = signal.Signals(signum).name
        if self._loading:
            self._loading = False
            raise Interrupted(self.requested)

    @contextlib.contextmanager
    def loading(self):
        """A block that waits for data: a stop signal (now or already pending) raises Interrupted."""
        if self.requested is not None:
            raise Interrupted(self.requested)
        self._loading = True
        try:
            yield
        finally:
            self._loading = False

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
