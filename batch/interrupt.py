"""Graceful stop: the first SIGINT/SIGTERM stops at the next safe point, a second one at once."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading

log = logging.getLogger(__name__)
EXIT_INTERRUPTED = 130


class StopRequested(Exception):
    """Raised at a safe point (between batches) after a first interrupt."""


class Stop:
    """A stop signal a run checks between batches: the caller's, handed down (a nested run never
    installs handlers of its own, or a Ctrl-C would stop only the inner run)."""

    def __init__(self):
        self.requested = False

    def request(self) -> None:
        self.requested = True

    def check(self) -> None:
        """A safe point: raise StopRequested if a stop was asked for."""
        if self.requested:
            raise StopRequested()


class GracefulStop(Stop):
    """Installs the handlers for the duration of a run (main thread only; elsewhere a no-op).

    First signal: finish the batch in hand, flush the writer pool, commit the checkpoint.
    Second signal: exit at once. Atomic file writes and SQLite's journal keep the folder
    consistent either way; the next run removes any temp file and resumes.
    """

    def __init__(self):
        super().__init__()
        self.previous: dict = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            sys.stderr.write("\nstopping now; the checkpoint is safe: run the same command again to resume\n")
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        self.requested = True
        name = signal.Signals(signum).name
        log.warning("%s: stopping after the current batch (again to stop at once)", name)
