"""What a run measures: per-group tallies (timings per stage, per-image seconds, memory) for the checkpoint and report."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from .plan import Group


@dataclass
class Execution:
    """What generating the plan left: per-group tallies, whether it was stopped, device memory seen."""

    tallies: list[GroupTally]
    interrupted: bool
    device_used_bytes: int | None  # the most the whole device held with a model loaded (CUDA)


@dataclass
class Stages:
    """Seconds per stage, summed over batches."""

    encode_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0
    write_s: float = 0.0

    def add(self, other: Stages) -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class GroupTally:
    """What one group's run measured, stored in the checkpoint for the report."""

    group: Group
    load_s: float = 0.0
    warmup_s: float = 0.0
    wall_s: float = 0.0
    per_image_s: list[float] = field(default_factory=list)
    failed: int = 0
    batches: int = 0  # the batches this process ran: under a launcher, its share of the group's
    peak_vram_bytes: int | None = None
    freed_before_bytes: int | None = None  # GPU memory freed by unloading the previous model
    vram_estimate_bytes: int | None = None  # what `validate --estimate-vram` predicts, beside the measured peak
    working_batch_size: int | None = None  # set when an out-of-memory made the group go on smaller
    stages: Stages = field(default_factory=Stages)

    def as_dict(self) -> dict:
        g, times = self.group, sorted(self.per_image_s)
        made = len(times)
        return {
            "model": g.model, "family": g.family, "mode": g.mode, "width": g.width, "height": g.height, "lora": g.lora,
            "images": made, "failed": self.failed, "batches": self.batches,
            "batch_size": max(len(b.tasks) for b in g.batches),
            "working_batch_size": self.working_batch_size or max(len(b.tasks) for b in g.batches),
            "load_s": round(self.load_s, 4), "warmup_s": round(self.warmup_s, 4), "wall_s": round(self.wall_s, 4),
            "images_per_s": round(made / self.wall_s, 4) if self.wall_s > 0 else 0.0,
            "s_per_image_p50": round(percentile(times, 50), 4) if times else None,
            "s_per_image_p95": round(percentile(times, 95), 4) if times else None,
            "peak_vram_bytes": self.peak_vram_bytes,
            "vram_estimate_bytes": self.vram_estimate_bytes,
            "freed_before_bytes": self.freed_before_bytes,
            "stages": {k: round(v, 4) for k, v in vars(self.stages).items()},
        }


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile of already sorted values (inclusive method)."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[int(q) - 1]


def peak_rss_bytes() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    except ImportError:  # Windows
        import psutil

        return psutil.Process().memory_info().peak_wset
