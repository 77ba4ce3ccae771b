"""Errors a user can cause. The CLI prints them as one message and exits 2; bugs stay tracebacks."""
from __future__ import annotations

from dataclasses import dataclass


class BatchError(Exception):
    """Base of every user-caused error (bad input, missing model, busy folder)."""

    exit_code = 2


@dataclass(frozen=True)
class RowError:
    """One problem in one manifest row: where it is, what was found, what is allowed."""

    line: int | None
    column: str | None
    value: object
    allowed: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else "manifest"
        if self.column:
            where += f", column '{self.column}'"
        if self.value is None:
            return f"{where}: {self.allowed}"
        value = repr(self.value)
        if len(value) > 80:
            value = value[:77] + "..."
        return f"{where}: {value} -- {self.allowed}"


class ManifestError(BatchError):
    """The manifest cannot be run: carries every row error found, not just the first."""

    def __init__(self, path, errors: list[RowError]):
        self.path = path
        self.errors = list(errors)
        shown = "\n".join(f"  {e}" for e in self.errors[:200])
        more = f"\n  ... and {len(self.errors) - 200} more" if len(self.errors) > 200 else ""
        noun = "error" if len(self.errors) == 1 else "errors"
        super().__init__(f"{path}: {len(self.errors)} {noun}\n{shown}{more}")


class ModelError(BatchError):
    """A model cannot be found or loaded."""


class OutputError(BatchError):
    """The output folder cannot be used."""
