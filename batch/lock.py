"""One run per output folder: an OS file lock that dies with its process, so a killed run leaves no stale lock."""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

from .errors import OutputError

log = logging.getLogger(__name__)
LOCK_NAME = ".sdbatch.lock"


class FolderLock:
    """Held for the whole run. `flock` is released by the kernel when the holder dies, so a lock
    file left by a killed run is simply taken over (and said so in the log)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> FolderLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        previous = self._read()
        if not _try_lock(self.fd):
            os.close(self.fd)
            self.fd = None
            who = (f"pid {previous.get('pid')} on {previous.get('host')}, started {previous.get('started')}"
                   if previous else "another process")
            raise OutputError(f"{self.path.parent} is in use by another sdbatch run ({who}); "
                              "wait for it to finish, stop it, or choose another --out")
        if previous.get("pid") and previous.get("pid") != os.getpid():
            log.info("took over a stale lock left by pid %s (that run was killed)", previous["pid"])
        record = json.dumps({"pid": os.getpid(), "host": platform.node(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, record, 0)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing releases the lock
            self.fd = None

    def _read(self) -> dict:
        try:
            return json.loads(os.pread(self.fd, 4096, 0) or b"{}")
        except (ValueError, OSError):
            return {}


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows: msvcrt locks a byte range the same way
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
