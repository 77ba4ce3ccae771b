"""Several processes under torchrun / accelerate launch: which rank am I, which device, which batch next.

The launcher owns process creation and rendezvous. Ranks share nothing but its key-value
store (torch.distributed's TCPStore, reached through `env://` rendezvous) and the output
folder: no collective op runs, so a batch that takes an hour cannot trip a process-group
timeout. A single-process run never imports torch.distributed (`Ranks.single()`).

- Each rank validates and plans the manifest identically; rank 0 alone syncs the checkpoint
  (under the folder lock) and says "ready" through the store.
- Batches are claimed in plan order from an atomic counter in the store (`store.add`), so a
  rank loads each model once and a fast rank is never idle while a slow one has a queue.
- Each rank journals its images into its own SQLite file in OUT (see checkpoint.py).
- Rank 0 waits for every rank's "finished" by polling the store, then writes the reports.
"""
from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass

from .errors import BatchError

log = logging.getLogger(__name__)
POLL_S = 0.5
_CLAIMS_MADE = [0]  # runs started in this process (the Python API may start several under one launch)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the launch: rank, world size, local rank (its GPU on this host), host."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    host: str = platform.node()

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def single(cls) -> Ranks:
        return cls()

    @classmethod
    def from_env(cls) -> Ranks:
        """RANK, WORLD_SIZE, LOCAL_RANK as torchrun and accelerate launch set them; one process otherwise."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError as e:
            raise BatchError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {e}") from e
        return cls(rank, world, local, platform.node())


def rank_device(requested: str, ranks: Ranks) -> str:
    """Under a launcher, rank r of a host uses cuda:LOCAL_RANK (or the CPU); alone, what was asked."""
    if not ranks.distributed:
        return requested
    if requested.startswith("cuda:"):
        raise BatchError(f"--device {requested} under a launcher: every rank would use that one GPU; "
                         "give --device cuda (each rank takes cuda:LOCAL_RANK) or limit CUDA_VISIBLE_DEVICES")
    if requested == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if ranks.local_rank >= count:
            raise BatchError(f"local rank {ranks.local_rank} but only {count} CUDA device(s) on {ranks.host}: "
                             "start at most one process per GPU")
        return f"cuda:{ranks.local_rank}"
    if requested == "cuda":
        raise BatchError("--device cuda but CUDA is not available")
    return "cpu"


class Claims:
    """What to do next, in plan order: a shared atomic counter under a launcher, a plain one alone."""

    def __init__(self, ranks: Ranks, namespace: str = "run"):
        self.ranks = ranks
        self.store = None
        self.local = 0
        if ranks.distributed:
            import datetime as dt

            import torch.distributed as dist

            timeout = dt.timedelta(seconds=float(os.environ.get("SDBATCH_STORE_TIMEOUT_S", "600")))
            self.store, _, _ = next(dist.rendezvous("env://", rank=ranks.rank, world_size=ranks.world_size,
                                                    timeout=timeout))
        # A restarted group (torchrun --max-restarts) starts new counters: its plan is new too.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        _CLAIMS_MADE[0] += 1
        self.prefix = (f"sdbatch/{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}/{attempt}/{namespace}"
                       f"/{_CLAIMS_MADE[0]}")

    def next_batch(self) -> int:
        """The next unclaimed batch number (0, 1, 2, ... across every rank)."""
        if self.store is None:
            self.local += 1
            return self.local - 1
        return int(self.store.add(f"{self.prefix}/next", 1)) - 1

    # --- handshakes, by polling: nothing here can time out a long run ---------------------------

    def announce(self, name: str, value: str = "1") -> None:
        if self.store is not None:
            self.store.set(f"{self.prefix}/{name}", value)

    def await_announcement(self, name: str) -> str:
        """Wait (polling, without limit) until rank 0 announces `name`; its value."""
        if self.store is None:
            return ""
        key = f"{self.prefix}/{name}"
        while not self.store.check([key]):
            time.sleep(POLL_S)
        return self.store.get(key).decode()

    def finished(self) -> None:
        """This rank has no more batches to claim and has recorded all its images."""
        if self.store is not None:
            self.store.add(f"{self.prefix}/finished", 1)

    def await_all_finished(self) -> None:
        if self.store is None:
            return
        key, waited = f"{self.prefix}/finished", 0.0
        while int(self.store.add(key, 0)) < self.ranks.world_size:
            time.sleep(POLL_S)
            waited += POLL_S
            if waited % 60 < POLL_S:
                log.info("waiting for the other ranks to finish (%d of %d done)", int(self.store.add(key, 0)),
                         self.ranks.world_size)
