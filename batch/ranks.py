"""Several processes under torchrun / accelerate launch: which rank am I, which device, which batch next.

The launcher owns process creation and rendezvous. Ranks share nothing but its key-value
store (torch.distributed's TCPStore, reached through `env://` rendezvous) and the output
folder: no collective op runs, so a batch that takes an hour cannot trip a process-group
timeout. A single-process run never imports torch.distributed (`Ranks.single()`).

- The entry point (CLI, Python API) reads the launch once (`Ranks.from_env`) and hands it to
  the run in its `RunContext`; nothing below it reads the environment.
- Every run under a launch starts with a handshake (`Claims`): rank 0 draws a new generation
  number from the store and every other rank learns it, so all ranks of one launch attempt use
  one key prefix whatever each node's own restart count says, and a run started again in the
  same process (the Python API) never meets an earlier run's keys.
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
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import BatchError
from .interrupt import Stop

log = logging.getLogger(__name__)
POLL_S = 0.5
STORE_TIMEOUT_S = 600.0  # how long connecting to the launcher's store may take


@dataclass(frozen=True)
class Ranks:
    """This process's place in the launch: rank, world size, local rank (its GPU on this host), host."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    host: str = platform.node()
    run_id: str = "none"  # the launcher's run id (TORCHELASTIC_RUN_ID): keys of two launches never meet

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
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Ranks:
        """RANK, WORLD_SIZE, LOCAL_RANK as torchrun and accelerate launch set them; one process otherwise.

        For entry points only (the CLI, the Python API asked to join a launch): a run is told its ranks.
        """
        try:
            world = int(environ.get("WORLD_SIZE", "1"))
            rank = int(environ.get("RANK", "0"))
            local = int(environ.get("LOCAL_RANK", str(rank)))
        except ValueError as e:
            raise BatchError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {e}") from e
        return cls(rank, world, local, platform.node(), environ.get("TORCHELASTIC_RUN_ID", "none"))


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


def connect(ranks: Ranks, timeout_s: float = STORE_TIMEOUT_S):
    """The launcher's key-value store (env:// rendezvous: MASTER_ADDR, MASTER_PORT)."""
    import datetime as dt

    import torch.distributed as dist

    store, _, _ = next(dist.rendezvous("env://", rank=ranks.rank, world_size=ranks.world_size,
                                       timeout=dt.timedelta(seconds=timeout_s)))
    return store


class Claims:
    """What to do next, in plan order: a shared atomic counter under a launcher, a plain one alone.

    Close it (or use it as a context manager) when the run ends: under a launcher it holds a
    connection to the store.
    """

    def __init__(self, ranks: Ranks, stop: Stop, namespace: str = "run", store=None):
        self.ranks, self.stop = ranks, stop
        self.store = None
        self.local = 0
        self.prefix = f"local/{namespace}"
        if ranks.distributed:
            self.store = store if store is not None else connect(ranks)
            base = f"sdbatch/{ranks.run_id}/{namespace}"
            self.generation = self._join(base)
            self.prefix = f"{base}/g{self.generation}"

    def close(self) -> None:
        """Drop the store connection (a notebook may start many runs under one launch)."""
        self.store = None

    def __enter__(self) -> Claims:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _join(self, base: str) -> int:
        """One generation number for this run on every rank, from rank 0, through the store.

        Each other rank posts a fresh token under its rank and waits for rank 0's answer under that
        token, which no earlier run can have written; rank 0 answers every token it sees until each
        rank's current token has been answered and confirmed. No clock, no restart count.
        """
        store, world = self.store, self.ranks.world_size
        if not self.ranks.main:
            token = uuid.uuid4().hex
            store.set(f"{base}/join/{self.ranks.rank}", token)
            generation = int(self._wait_for(f"{base}/ack/{token}", "rank 0 to start the run"))
            store.set(f"{base}/g{generation}/joined/{self.ranks.rank}", token)
            return generation
        generation = int(store.add(f"{base}/generation", 1))
        answered: set[str] = set()
        waiting = set(range(1, world))
        waited = 0.0
        while waiting:
            for rank in sorted(waiting):
                key = f"{base}/join/{rank}"
                if not store.check([key]):
                    continue
                token = store.get(key).decode()
                if token not in answered:  # perhaps an earlier run's token: answering it harms nobody
                    store.set(f"{base}/ack/{token}", str(generation))
                    answered.add(token)
                joined = f"{base}/g{generation}/joined/{rank}"
                if store.check([joined]) and store.get(joined).decode() == token:
                    waiting.discard(rank)
            if waiting:
                self.stop.check()
                time.sleep(POLL_S)
                waited += POLL_S
                if waited % 60 < POLL_S:
                    log.info("waiting for rank(s) %s to join the run", sorted(waiting))
        return generation

    def _wait_for(self, key: str, what: str) -> str:
        """Poll (without limit, stoppable) until `key` exists; its value."""
        waited = 0.0
        while not self.store.check([key]):
            self.stop.check()
            time.sleep(POLL_S)
            waited += POLL_S
            if waited % 60 < POLL_S:
                log.info("waiting for %s", what)
        return self.store.get(key).decode()

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
        """Wait (polling, without limit; a stop ends it) until rank 0 announces `name`; its value."""
        if self.store is None:
            return ""
        return self._wait_for(f"{self.prefix}/{name}", f"rank 0's {name!r}")

    def finished(self) -> None:
        """This rank has no more batches to claim and has recorded all its images."""
        if self.store is not None:
            self.store.add(f"{self.prefix}/finished", 1)

    def await_all_finished(self) -> bool:
        """Wait until every rank has finished; False if a stop came first (a dead peer must not keep
        rank 0 from writing its reports: its journal is absorbed by the next run)."""
        if self.store is None:
            return True
        key, waited = f"{self.prefix}/finished", 0.0
        while (done := int(self.store.add(key, 0))) < self.ranks.world_size:
            if self.stop.requested:
                log.warning("stopped while waiting for the other ranks (%d of %d finished)", done,
                            self.ranks.world_size)
                return False
            time.sleep(POLL_S)
            waited += POLL_S
            if waited % 60 < POLL_S:
                log.info("waiting for the other ranks to finish (%d of %d done)", done, self.ranks.world_size)
        return True
