"""Group images so one warm pipeline serves many rows, and split groups into batches."""
from __future__ import annotations

from dataclasses import dataclass

from .job import ImageTask


@dataclass(frozen=True)
class Batch:
    """Images that go through one UNet call: same steps, cfg, strength, scheduler."""

    index: int  # 0-based, within the run
    tasks: tuple[ImageTask, ...]

    @property
    def job(self):
        """The first job: it stands for the batch's shared settings."""
        return self.tasks[0].job


@dataclass(frozen=True)
class Group:
    """Images sharing model, LoRA, mode and resolution: one pipeline view, one warm shape."""

    model: str
    lora: str | None
    mode: str
    width: int
    height: int
    batches: tuple[Batch, ...]

    @property
    def family(self) -> str:
        """families.Family.name of the group's model (every row of a group shares its model)."""
        return self.batches[0].tasks[0].job.family

    @property
    def name(self) -> str:
        """Unique within a plan: report.csv's `group` and the checkpoint tell groups apart by it."""
        lora = f"+{self.lora}" if self.lora else ""
        return f"{self.model} {self.mode} {self.width}x{self.height}{lora}"

    @property
    def images(self) -> int:
        return sum(len(b.tasks) for b in self.batches)


@dataclass(frozen=True)
class Plan:
    groups: tuple[Group, ...]

    @property
    def images(self) -> int:
        return sum(g.images for g in self.groups)

    @property
    def batches(self) -> int:
        return sum(len(g.batches) for g in self.groups)

    def models(self) -> list[str]:
        """Models in first-use order (groups of one model are adjacent)."""
        return list(dict.fromkeys(g.model for g in self.groups))


def auto_batch_size(device: str, width: int, height: int) -> int:
    """A batch size that keeps a mid-size GPU busy without running out of memory."""
    if not device.startswith("cuda"):
        return 4
    pixels = width * height
    return max(1, min(16, (8 * 512 * 512) // pixels))


def group_key(job, default_model: str) -> tuple:
    """What a Group shares: (model, LoRA, mode, width, height)."""
    return (job.model or default_model, job.lora, job.mode, job.width, job.height)


def make_plan(tasks: list[ImageTask], default_model: str, batch_size: int | None, device: str = "cpu") -> Plan:
    """Group by model, LoRA, (mode, width, height), then by batch key; keep first-seen order.

    Each image has its own seeded generator, so where it lands does not change its pixels.
    """
    groups: dict[tuple, dict[tuple, list[ImageTask]]] = {}
    for task in tasks:
        groups.setdefault(group_key(task.job, default_model), {}).setdefault(task.job.batch_key(), []).append(task)
    # All groups of one model must be adjacent so it is loaded once.
    model_rank = {m: i for i, m in enumerate(dict.fromkeys(key[0] for key in groups))}
    order = sorted(groups, key=lambda key: model_rank[key[0]])
    built, index = [], 0
    for key in order:
        model_id, lora, mode, width, height = key
        size = batch_size or auto_batch_size(device, width, height)
        batches = []
        for same in groups[key].values():
            for start in range(0, len(same), size):
                batches.append(Batch(index=index, tasks=tuple(same[start : start + size])))
                index += 1
        built.append(Group(model_id, lora, mode, width, height, tuple(batches)))
    return Plan(tuple(built))


def layout(plan: Plan) -> list[list[list]]:
    """The plan as data: every batch's (id, k) pairs, in order (what rank 0 publishes to the other ranks)."""
    return [[[t.job.id, t.k] for t in batch.tasks] for group in plan.groups for batch in group.batches]


def from_layout(tasks: list[ImageTask], batches: list[list[list]], default_model: str) -> Plan:
    """Rebuild rank 0's plan, batch for batch, from this rank's own tasks (rows are validated on every rank;
    batch sizes are rank 0's, whatever this rank's device would choose)."""
    from .errors import BatchError

    by_key = {(t.job.id, t.k): t for t in tasks}
    groups: list[Group] = []
    current, members = None, []
    for index, pairs in enumerate(batches):
        try:
            chosen = tuple(by_key[(image_id, k)] for image_id, k in pairs)
        except KeyError as e:
            raise BatchError(f"rank 0 planned image {e.args[0]} that this rank's manifest does not have: "
                             "every rank must read the same manifest with the same options") from None
        key = group_key(chosen[0].job, default_model)
        if key != current and members:
            groups.append(Group(*current, tuple(members)))
            members = []
        current = key
        members.append(Batch(index=index, tasks=chosen))
    if members:
        groups.append(Group(*current, tuple(members)))
    return Plan(tuple(groups))
