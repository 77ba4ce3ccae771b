"""How many CPU threads torch may use: the CPUs this process may run on, shared with its launch peers
and with whatever else keeps them busy.

torch's default is one thread per core of the machine. On a box whose cores are busy (another
job, a shared server, two ranks on one host) its threads then wait on each other and generation
runs many times slower than with one thread (issue 21: 0.3-0.8 img/s against 6.5 with
OMP_NUM_THREADS=1). The default here counts only the CPUs this process may use (affinity and the
cgroup's CPU quota), divides them among the processes of the launch on this host, and leaves out
the CPUs other programs keep busy right now.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import BatchError

log = logging.getLogger(__name__)
SAMPLE_S = 0.25  # how long the CPUs are watched to see which ones other programs keep busy


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    why: str  # for the log: where the number came from


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity, capped by the cgroup's CPU quota (containers)."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        count = os.cpu_count() or 1
    quota = cgroup_quota()
    return max(1, min(count, math.floor(quota)) if quota else count)


def cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota in CPUs (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`), None when unlimited."""
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def busy_cpus(seconds: float = SAMPLE_S) -> float:
    """How many of this process's CPUs other programs keep busy, watched for `seconds` (0 if unknown)."""
    try:
        import psutil

        mine = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        percents = psutil.cpu_percent(interval=seconds, percpu=True)
    except Exception:  # noqa: BLE001 - a guess that cannot be made leaves the CPUs counted as free
        return 0.0
    if mine is not None:
        percents = [percents[i] for i in mine if i < len(percents)]
    return sum(percents) / 100.0


def choose(requested: int | None, processes_on_host: int = 1, environ: Mapping[str, str] = os.environ,
           busy: float | None = None, previous: int | None = None) -> ThreadChoice:
    """--threads N wins; then OMP_NUM_THREADS; then `previous` (the count an earlier run of the same
    output folder used: a thread count can move a pixel by 1/255, and a resumed run must make the
    images an uninterrupted one would); else the free share of this process's CPUs (at least 1)."""
    if requested is not None:
        if requested < 1:
            raise BatchError(f"--threads must be >= 1 but is {requested}")
        return ThreadChoice(requested, "--threads")
    if environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(environ["OMP_NUM_THREADS"]) >= 1:
        return ThreadChoice(int(environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS")
    if previous is not None and previous >= 1:
        return ThreadChoice(previous, "as the earlier run of this output folder, for the same pixels")
    usable = usable_cpus()
    share = max(1, usable // max(1, processes_on_host))
    if processes_on_host > 1:  # the peers start together: what they keep busy is this launch's own share
        return ThreadChoice(share, f"{usable} usable CPU(s) shared by {processes_on_host} processes on this host")
    others = busy_cpus() if busy is None else busy
    free = max(1, min(share, round(usable - others)))
    if free < share:
        return ThreadChoice(free, f"{usable} usable CPU(s), about {others:.1f} kept busy by other programs")
    return ThreadChoice(share, f"{usable} usable CPU(s)")


def apply(choice: ThreadChoice) -> int:
    """Set torch's intra-op thread count; the number set."""
    import torch

    torch.set_num_threads(choice.threads)
    log.debug("using %d CPU thread(s) (%s)", choice.threads, choice.why)  # run.log and the report say it too
    return choice.threads


def configure(requested: int | None, processes_on_host: int = 1, out: Path | None = None) -> int:
    """Choose (see `choose`; `out`: the output folder whose earlier run's count a rerun keeps) and set."""
    return apply(choose(requested, processes_on_host, previous=previous_threads(out) if out is not None else None))


def processes_on_host(environ: Mapping[str, str] = os.environ) -> int:
    """LOCAL_WORLD_SIZE as torchrun and accelerate launch set it (an entry point's business), else 1."""
    try:
        return max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def previous_threads(out: Path) -> int | None:
    """The thread count the last run of output folder `out` recorded in run.json, if any."""
    import json

    try:
        value = json.loads((Path(out) / "run.json").read_text(encoding="utf-8")).get("threads")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None
