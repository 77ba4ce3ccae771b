"""Progress: a rich bar on a terminal, plain periodic log lines otherwise (or with --quiet)."""
from __future__ import annotations

import contextlib
import logging
import sys
import time

log = logging.getLogger("batch.progress")


def in_notebook() -> bool:
    """Inside Jupyter (or another IPython kernel): rich draws its bar there too."""
    return "ipykernel" in sys.modules


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class _Bar:
    """A rich bar while in use (`with`), or None where plain log lines stand in for it."""

    bar = None

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()

    @contextlib.contextmanager
    def paused(self):
        """Stop drawing while something else prints (a validation run's own lines)."""
        if self.bar:
            self.bar.stop()
        try:
            yield
        finally:
            if self.bar:
                self.bar.start()


class Progress(_Bar):
    """Images done out of total, images/s, ETA and the current group."""

    def __init__(self, total: int, quiet: bool = False, every_s: float = 10.0, stream=None):
        self.total, self.done, self.group = total, 0, ""
        self.every_s = every_s
        self.started = self.last_line = time.monotonic()
        stream = stream or sys.stderr
        self.bar = None
        if not quiet and (stream.isatty() or in_notebook()) and total:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} img/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=Console(file=stream), transient=False,
            )
            self.task = self.bar.add_task("starting", total=total, rate="-")

    def __exit__(self, *exc):
        super().__exit__(*exc)
        if not self.bar and self.total:
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


class StepProgress(_Bar):
    """Training: step out of total, loss, it/s and ETA; a log line every 10 s without a terminal or with --quiet."""

    def __init__(self, name: str, total: int, start: int = 0, quiet: bool = False, every_s: float = 10.0):
        self.name, self.total, self.start, self.step = name, total, start, start
        self.started = self.last_line = time.monotonic()
        self.every_s = every_s
        if not quiet and (sys.stderr.isatty() or in_notebook()):
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} it/s"),
                                    TextColumn("ETA"), TimeRemainingColumn())
            self.task = self.bar.add_task("steps", total=total, completed=start, loss="-", rate="-")

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return (self.step - self.start) / elapsed if elapsed > 0 else 0.0

    def update(self, step: int, loss: float) -> None:
        self.step = step
        if self.bar:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", rate=f"{self.rate():.2f}")
        elif time.monotonic() - self.last_line >= self.every_s or step == self.total:
            self.last_line = time.monotonic()
            rate = self.rate()
            eta = (self.total - step) / rate if rate > 0 else None
            log.info("%s step %d/%d, loss %.4f, %.2f it/s, ETA %s", self.name, step, self.total, loss, rate, _eta(eta))
