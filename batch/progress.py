"""Progress: a rich bar on a terminal, plain periodic log lines otherwise (or with --quiet)."""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("batch.progress")


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Images done out of total, images/s, ETA and the current group."""

    def __init__(self, total: int, quiet: bool = False, every_s: float = 10.0, stream=None):
        self.total, self.done, self.group = total, 0, ""
        self.every_s = every_s
        self.started = self.last_line = time.monotonic()
        stream = stream or sys.stderr
        self.bar = None
        if not quiet and stream.isatty() and total:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} img/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=Console(file=stream), transient=False,
            )
            self.task = self.bar.add_task("starting", total=total, rate="-")

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()
        elif self.total:
            self._line()

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def set_group(self, name: str) -> None:
        self.group = name
        if self.bar:
            self.bar.update(self.task, description=name)

    def advance(self, images: int) -> None:
        self.done += images
        if self.bar:
            self.bar.update(self.task, advance=images, rate=f"{self.rate():.2f}")
        elif time.monotonic() - self.last_line >= self.every_s:
            self._line()

    def _line(self) -> None:
        self.last_line = time.monotonic()
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else None
        log.info("%d/%d images, %.2f img/s, ETA %s, group %s", self.done, self.total, rate, _eta(eta), self.group)
