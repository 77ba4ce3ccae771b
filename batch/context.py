"""How a run is being run: its place among processes, its device and its stop signal.

The entry point (the CLI, the Python API, a trainer's validation) builds one `RunContext` and
hands it to `runner.run`; nothing below it reads `WORLD_SIZE` or installs signal handlers. A
nested run (validation inside training, a run under `if accelerator.is_main_process:`) is
given `RunContext.single(...)` with the caller's stop, so it never waits for other processes
and a Ctrl-C stops the caller too.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from .interrupt import Stop
from .ranks import Ranks, rank_device


@dataclass(frozen=True)
class RunContext:
    """Ranks (one process unless a launcher started several), the resolved device, the stop signal."""

    ranks: Ranks
    device: str  # "cpu" or an indexed "cuda:N": what every CUDA call and `.to()` is given
    stop: Stop = field(default_factory=Stop)

    @classmethod
    def single(cls, device: str = "auto", stop: Stop | None = None) -> RunContext:
        """One process, whatever the environment says."""
        from .models import resolve_device

        return cls(Ranks.single(), resolve_device(device), stop if stop is not None else Stop())

    @classmethod
    def launched(cls, device: str = "auto", stop: Stop | None = None,
                 environ: Mapping[str, str] = os.environ) -> RunContext:
        """This process's place in a torchrun / accelerate launch (one process when there is none);
        rank r of a host takes cuda:LOCAL_RANK."""
        from .models import resolve_device

        ranks = Ranks.from_env(environ)
        return cls(ranks, resolve_device(rank_device(device, ranks)), stop if stop is not None else Stop())
