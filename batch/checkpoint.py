"""The SQLite journal: one row per image, so any interruption resumes where it stopped.

An image is `done` only after its file is fully written (temp file, fsync, rename) and
its row is committed here, and a commit is on disk (fsynced) before the run goes on, so it
survives power loss. WAL mode lets `status` read while a run writes.

Several processes (see ranks.py): rank 0 registers the run's images in `checkpoint.sqlite`,
and every rank records what it makes in its own `journal-rank<R>.sqlite` (one writer per
file; rollback journal, not WAL, so a network filesystem is safe). Readers (`status`,
`report`, a resume with any number of processes) see `checkpoint.sqlite` with every journal
laid over it (`Checkpoint.merged`); the next run that writes absorbs the journals into
`checkpoint.sqlite` and removes them.

Two records of one image (id, k) are decided by precedence, never by a clock (the ranks' hosts may
disagree by hours): a `done` record is never replaced by a `failed` or `pending` one (its key is the
image's current key, so its file is a valid result; `sync` remakes it if the file is gone); otherwise
the later run wins (runs are rank 0's numbers, which every rank's journal carries); within one run
`done` beats `failed` beats `pending`. Only records with the key registered here count: another key
means the row's parameters have changed since, and the record is obsolete.

A journal is removed only once every row in it is decided. A rank holds its journal's `JournalLock`
while the file is open (`Checkpoint` takes it for a journal), so a run never absorbs and removes the
journal of a rank that is still alive, even one left running by an earlier launch.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: journals go unlocked there (a launcher's ranks run on Linux)
    fcntl = None

from .errors import OutputError
from .job import ImageTask

log = logging.getLogger(__name__)
FILE_NAME = "checkpoint.sqlite"
JOURNAL_GLOB = "journal-rank*.sqlite"
JOURNAL_BUSY_S = 10.0  # how long to wait for a journal's lock or write lock (a rank's commit takes milliseconds)
SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id TEXT NOT NULL,
    k INTEGER NOT NULL,
    ord INTEGER NOT NULL,          -- manifest order, for metadata.jsonl
    key TEXT NOT NULL,             -- hash of every parameter that changes the pixels
    status TEXT NOT NULL,          -- pending | done | failed
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    file TEXT,                     -- name under images/ once done
    meta TEXT,                     -- the metadata.jsonl line (JSON), once done
    row TEXT,                      -- the manifest row as read (JSON), for failed.jsonl
    run INTEGER,
    group_name TEXT,
    batch INTEGER,
    seconds REAL,                  -- this image's share of its batch's wall time
    updated_at REAL,
    PRIMARY KEY (id, k)
);
CREATE TABLE IF NOT EXISTS runs (
    run INTEGER PRIMARY KEY,
    started_at TEXT,
    settings TEXT,                 -- JSON: the report's "run" block
    totals TEXT                    -- JSON: timing totals, set when the run ends
);
CREATE TABLE IF NOT EXISTS groups (
    run INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    stats TEXT NOT NULL,           -- JSON: one entry of the report's "groups"
    PRIMARY KEY (run, idx)
);
CREATE TABLE IF NOT EXISTS ranks (  -- runs under a launcher: what each process did
    run INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    stats TEXT NOT NULL,           -- JSON: {rank, host, device, images, seconds, images_per_s}
    PRIMARY KEY (run, rank)
);
CREATE TABLE IF NOT EXISTS clip_scores (  -- `score` and `run --clip-score` (batch/score.py)
    key TEXT NOT NULL,             -- the image's key: same key, same pixels and prompt, same score
    model TEXT NOT NULL,           -- the CLIP model: its name @ a digest of its weights (or its hub commit)
    score REAL NOT NULL,           -- 100 * max(cos(image, prompt), 0), torchmetrics' clip_score
    PRIMARY KEY (key, model)
);
CREATE TABLE IF NOT EXISTS clip_models (  -- the CLIP models used here; metadata.jsonl shows the last one's scores
    model TEXT PRIMARY KEY,
    name TEXT NOT NULL,            -- as given: tiny-clip, org/name, a folder
    used_at REAL NOT NULL
);
"""


def _retry_locked(statement, seconds: float = 30.0):
    """Leaving WAL needs no other connection open: wait out a `status` reader instead of failing at once."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return statement()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def journal_name(rank: int) -> str:
    return f"journal-rank{rank}.sqlite"


class JournalLock:
    """An exclusive advisory lock (flock) on `<journal>.lock`, held by whoever writes or absorbs that journal.

    The kernel drops it when its process dies, however it dies. The holder removes the lock file
    before letting go, and `acquire` makes sure the file it locked is still the one at that path,
    so no lock files are left behind and no two processes hold the lock. A sidecar file, not the
    journal itself: on NFS flock becomes a POSIX lock, which SQLite's own locks on the journal would
    meet. Without fcntl, or on a filesystem that refuses flock, nothing is locked: journals are then
    absorbed as they stand, and only SQLite's own lock keeps a commit under way from being lost.
    """

    def __init__(self, journal: Path):
        self.path = Path(f"{journal}.lock")
        self._fd: int | None = None

    def acquire(self, wait: float = 0.0) -> bool:
        """Take the lock, trying for up to `wait` seconds; False if another process holds it."""
        if fcntl is None:
            return True
        deadline = time.monotonic() + wait
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)
                continue
            except OSError as e:  # ENOLCK and the like: this filesystem has no flock
                os.close(fd)
                self.path.unlink(missing_ok=True)
                log.warning("cannot lock %s (%s): going on without the lock", self.path, e)
                return True
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                current = False
            if current:
                self._fd = fd
                return True
            os.close(fd)  # the last holder removed this file after we opened it: lock the new one

    def release(self) -> None:
        """Remove the lock file, then let go (in that order: see the class)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


def _precedence(status: str, run: str) -> str:
    """SQL ordering two records of one image: see the module docstring. Never a clock."""
    return (f"({status} = 'done', COALESCE({run}, 0), "
            f"CASE {status} WHEN 'done' THEN 2 WHEN 'failed' THEN 1 ELSE 0 END)")


_JOURNAL_COLUMNS = ("id", "k", "key", "status", "error", "file", "meta", "run", "group_name", "batch", "seconds",
                    "updated_at")
# A journal's record replaces this checkpoint's only where it outranks it; a tie keeps what is here.
_ABSORB = f"""UPDATE images SET status = :status, error = :error, file = :file, meta = :meta, run = :run,
    group_name = :group_name, batch = :batch, seconds = :seconds, updated_at = :updated_at, attempts = attempts + 1
    WHERE id = :id AND k = :k AND key = :key AND {_precedence(':status', ':run')} > {_precedence('status', 'run')}"""


def _read_journal(source: sqlite3.Connection) -> tuple[list[dict], list, list, tuple[list, list]]:
    """A journal's outcomes, group figures, rank figures and CLIP scores (scores, models)."""
    rows = source.execute(f"SELECT {', '.join(_JOURNAL_COLUMNS)} FROM images "
                          "WHERE status IN ('done', 'failed')").fetchall()
    groups = source.execute("SELECT run, idx, stats FROM groups").fetchall()
    ranks = source.execute("SELECT run, rank, stats FROM ranks").fetchall()
    try:
        clip = (source.execute("SELECT key, model, score FROM clip_scores").fetchall(),
                source.execute("SELECT model, name, used_at FROM clip_models").fetchall())
    except sqlite3.OperationalError:  # a journal from before CLIP scores
        clip = ([], [])
    return [dict(zip(_JOURNAL_COLUMNS, row)) for row in rows], groups, ranks, clip


def _kept(journal: Path, error: Exception) -> None:
    log.warning("cannot absorb %s yet (%s): kept for a later run", journal, error)


_FILE_COLUMNS = ('"init_image"', '"prompt_image"', '"lora"')


@dataclass(frozen=True)
class Counts:
    total: int
    done: int
    failed: int

    @property
    def pending(self) -> int:
        return self.total - self.done - self.failed

    def as_dict(self) -> dict:
        return {"total": self.total, "done": self.done, "failed": self.failed, "pending": self.pending}


@dataclass(frozen=True)
class SyncResult:
    """What the checkpoint leaves to do for this run."""

    todo: list[ImageTask]
    skipped: int  # done earlier with the same parameters
    failed_kept: int  # failed earlier, not retried (no --retry-failed)


@dataclass(frozen=True)
class Outcome:
    """One image's end state, to be committed."""

    task: ImageTask
    ok: bool
    file: str | None = None
    meta: dict | None = None
    error: str | None = None
    group: str | None = None
    batch: int | None = None
    seconds: float | None = None


class Checkpoint:
    def __init__(self, path: Path, readonly: bool = False, wal: bool = True):
        """Open (or create) a checkpoint; a rank's journal (`journal_name`) is held under its
        `JournalLock` until `close`, and OutputError says so if another live process holds it."""
        self.path = Path(path)
        self.run: int | None = None
        self.lock: JournalLock | None = None
        if readonly:
            if not self.path.exists():
                raise OutputError(f"no checkpoint at {self.path}: is this an sdbatch output folder?")
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
            if not self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'images'").fetchone():
                self.db.close()  # the writer has created the file, not yet its tables
                raise OutputError(f"{self.path} is being created by a run that is starting: try again in a moment")
            return
        if fnmatch.fnmatch(self.path.name, JOURNAL_GLOB):
            self.lock = JournalLock(self.path)
            if not self.lock.acquire(wait=JOURNAL_BUSY_S):
                raise OutputError(f"{self.path} is being written by another process (a rank of an earlier launch "
                                  "still running?): stop that process or let it finish, then run again")
        try:
            self.db = sqlite3.connect(self.path, timeout=30)
            # WAL lets `status` read beside a single writer on a local disk; under a launcher every
            # file may sit on NFS, where WAL's shared memory is unsafe: rollback journal there.
            _retry_locked(lambda: self.db.execute(f"PRAGMA journal_mode={'WAL' if wal else 'DELETE'}"))
            # FULL: each commit fsyncs the WAL, so a committed image survives power loss, not only a
            # killed process (NORMAL's promise). One fsync per batch: nothing beside a UNet call.
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise

    @classmethod
    def merged(cls, out: Path) -> Checkpoint:
        """A read-only view of OUT: checkpoint.sqlite with every rank's journal laid over it (in memory)."""
        out = Path(out)
        main = cls(out / FILE_NAME, readonly=True)
        journals = sorted(out.glob(JOURNAL_GLOB))
        if not journals:  # a single-process folder: read the file itself (a million rows need no copy)
            return main
        view = cls.__new__(cls)
        view.path, view.run, view.lock = main.path, None, None
        view.db = sqlite3.connect(":memory:")
        main.db.backup(view.db)
        main.close()
        view.db.executescript(SCHEMA)  # a checkpoint from before the ranks table
        for journal in journals:
            view.absorb(journal)
        return view

    def absorb(self, journal: Path) -> int | None:
        """Lay a rank's journal over this checkpoint; returns how many images it changed, None if unreadable.

        Each record counts where this image is registered here with the same key and the record
        outranks this checkpoint's (see the module docstring); absorbing the same journal twice
        changes nothing. A journal being written is read as it stands (`status` during a run).
        """
        try:
            with closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=30)) as source:
                found = _read_journal(source)
        except sqlite3.Error as e:  # being created by its rank, locked, or damaged: kept for a later run
            _kept(journal, e)
            return None
        return self._lay_over(*found)

    def absorb_journals(self, out: Path) -> int:
        """Absorb every rank journal in OUT for good and remove it (the writer of checkpoint.sqlite only).

        A journal is removed only once every row in it is decided here. Kept for a later run: one
        whose rank is alive (it holds the journal's lock), one that cannot be read, and one that a
        writer without the lock is committing to.
        """
        brought = 0
        for journal in sorted(Path(out).glob(JOURNAL_GLOB)):
            lock = JournalLock(journal)
            if not lock.acquire():
                log.warning("%s is still being written by its rank: kept for a later run", journal)
                continue
            try:
                brought += self._absorb_and_remove(journal) or 0
            finally:
                lock.release()
        return brought

    def _absorb_and_remove(self, journal: Path) -> int | None:
        """`absorb`, then remove the journal, holding its SQLite write lock from reading to removing."""
        try:
            # Read-write: a rank killed mid-commit leaves a hot rollback journal that only a writable
            # connection rolls back (readers skip such a file until then).
            source = sqlite3.connect(f"file:{journal}?mode=rw", uri=True, timeout=JOURNAL_BUSY_S, isolation_level=None)
        except sqlite3.Error as e:
            _kept(journal, e)
            return None
        with closing(source):
            try:
                # Nothing can be committed to the journal between reading it and removing it; a commit
                # under way (a writer without the lock) keeps the file for a later run.
                source.execute("BEGIN IMMEDIATE")
                found = _read_journal(source)
            except sqlite3.Error as e:
                _kept(journal, e)
                return None
            brought = self._lay_over(*found)
            journal.unlink()
        for extra in ("-journal", "-wal", "-shm"):
            Path(f"{journal}{extra}").unlink(missing_ok=True)
        return brought

    def _lay_over(self, rows: list[dict], groups: list, ranks: list, clip: tuple[list, list] = ([], [])) -> int:
        with self.db:
            brought = self.db.executemany(_ABSORB, rows).rowcount
            base = self.db.execute("SELECT COALESCE(MAX(idx), -1) + 1 FROM groups").fetchone()[0]
            known = {(r, s) for r, s in self.db.execute("SELECT run, stats FROM groups")}
            fresh = [g for g in groups if (g[0], g[2]) not in known]
            self.db.executemany("INSERT INTO groups (run, idx, stats) VALUES (?, ?, ?)",
                                [(run, base + n, stats) for n, (run, _, stats) in enumerate(fresh)])
            self.db.executemany("INSERT OR REPLACE INTO ranks (run, rank, stats) VALUES (?, ?, ?)", ranks)
            # A score depends on the image's key and the CLIP model alone: any copy of it is the same score.
            self.db.executemany("INSERT OR REPLACE INTO clip_scores (key, model, score) VALUES (?, ?, ?)", clip[0])
            self.db.executemany("""INSERT INTO clip_models (model, name, used_at) VALUES (?, ?, ?)
                ON CONFLICT (model) DO UPDATE SET used_at = MAX(used_at, excluded.used_at)""", clip[1])
        return brought

    def close(self) -> None:
        self.db.close()
        if self.lock is not None:
            self.lock.release()

    # --- start of a run -------------------------------------------------------------

    def start_run(self, settings: dict) -> int:
        cursor = self.db.execute(
            "INSERT INTO runs (started_at, settings) VALUES (?, ?)",
            (settings.get("started_at"), json.dumps(settings)),
        )
        self.db.commit()
        self.run = cursor.lastrowid
        return self.run

    def sync(self, tasks: list[ImageTask], existing_files: set[str], retry_failed: bool, fresh: bool,
             max_attempts: int = 3, fmt: str = "png", complete: bool = False) -> SyncResult:
        """Register this run's images; return those still to make.

        Done images with the same key whose file (same name, same format) is still there are
        skipped; a changed key (the row's parameters changed) makes the image pending again.
        `complete`: `tasks` is the whole manifest, so rows of ids it no longer has are forgotten
        (their files stay on disk but leave metadata.jsonl, the counts and failed.jsonl).
        """
        if fresh:
            self.db.execute("DELETE FROM images")
        known = {(i, k): (key, status, file, attempts) for i, k, key, status, file, attempts in
                 self.db.execute("SELECT id, k, key, status, file, attempts FROM images")}
        todo, skipped, failed_kept, pending = [], 0, 0, []
        for task in tasks:
            old = known.get((task.job.id, task.k))
            if old and old[0] == task.key:
                if old[1] == "done" and old[2] == f"{task.stem}.{fmt}" and old[2] in existing_files:
                    skipped += 1
                    continue
                if old[1] == "failed" and (not retry_failed or old[3] >= max_attempts):
                    failed_kept += 1
                    continue
            todo.append(task)
            pending.append((task.job.id, task.k, task.job.line, task.key, task.job.row, self.run, time.time()))
        self.db.executemany(
            """INSERT INTO images (id, k, ord, key, status, row, run, updated_at)
               VALUES (?, ?, ?, ?, 'pending', ?, ?, ?)
               ON CONFLICT (id, k) DO UPDATE SET
                 attempts = CASE WHEN images.key = excluded.key THEN images.attempts ELSE 0 END,
                 key = excluded.key, status = 'pending', error = NULL, ord = excluded.ord,
                 row = excluded.row, run = excluded.run, updated_at = excluded.updated_at""",
            [(i, k, line * 100_000 + k, key, row, run, now) for i, k, line, key, row, run, now in pending],
        )
        # Rows left pending by an earlier run that this run does not plan are forgotten.
        self.db.execute("DELETE FROM images WHERE status = 'pending' AND run IS NOT ?", (self.run,))
        if complete:
            self.db.execute("CREATE TEMP TABLE IF NOT EXISTS wanted (id TEXT, k INTEGER, PRIMARY KEY (id, k))")
            self.db.execute("DELETE FROM wanted")
            self.db.executemany("INSERT OR IGNORE INTO wanted VALUES (?, ?)", ((t.job.id, t.k) for t in tasks))
            self.db.execute("DELETE FROM images WHERE NOT EXISTS "
                            "(SELECT 1 FROM wanted w WHERE w.id = images.id AND w.k = images.k)")
        self.db.commit()
        return SyncResult(todo=todo, skipped=skipped, failed_kept=failed_kept)

    def record_invalid(self, rows: list[tuple[int, str, str]]) -> None:
        """Rows rejected under --skip-invalid: (line, row JSON, error) recorded as failed.

        They are keyed by line, not id: a duplicate id must not overwrite the valid row's image.
        """
        self.db.executemany(
            """INSERT INTO images (id, k, ord, key, status, attempts, error, row, run, updated_at)
               VALUES (?, 0, ?, 'invalid', 'failed', 1, ?, ?, ?, ?)
               ON CONFLICT (id, k) DO UPDATE SET status = 'failed', key = 'invalid', error = excluded.error,
                 row = excluded.row, run = excluded.run, updated_at = excluded.updated_at""",
            [(f"invalid-line-{line}", line * 100_000, error, row, self.run, time.time()) for line, row, error in rows],
        )
        self.db.commit()

    # --- during a run ---------------------------------------------------------------

    def commit(self, outcomes: list[Outcome]) -> None:
        """Record finished images in one transaction (a rank's journal gets rows it never registered)."""
        if not outcomes:
            return
        now = time.time()
        rows = [(o.task.job.id, o.task.k, o.task.job.line * 100_000 + o.task.k, o.task.key,
                 "done" if o.ok else "failed", None if o.ok else o.error, o.file if o.ok else None,
                 json.dumps(o.meta, ensure_ascii=False) if o.ok else None, o.task.job.row, self.run, o.group, o.batch,
                 o.seconds if o.ok else None, now) for o in outcomes]
        with self.db:
            self.db.executemany(
                """INSERT INTO images (id, k, ord, key, status, attempts, error, file, meta, row, run, group_name,
                                       batch, seconds, updated_at)
                   VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (id, k) DO UPDATE SET status = excluded.status, attempts = images.attempts + 1,
                     error = excluded.error, file = COALESCE(excluded.file, CASE WHEN excluded.status = 'failed'
                     THEN images.file END), meta = COALESCE(excluded.meta, CASE WHEN excluded.status = 'failed'
                     THEN images.meta END), group_name = excluded.group_name, batch = excluded.batch,
                     seconds = CASE WHEN excluded.status = 'done' THEN excluded.seconds ELSE images.seconds END,
                     run = excluded.run, updated_at = excluded.updated_at""", rows)

    def save_rank(self, stats: dict) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO ranks (run, rank, stats) VALUES (?, ?, ?)",
                            (self.run, stats["rank"], json.dumps(stats)))

    def rank_stats(self, run: int) -> list[dict]:
        try:
            rows = self.db.execute("SELECT stats FROM ranks WHERE run = ? ORDER BY rank", (run,)).fetchall()
        except sqlite3.OperationalError:  # a checkpoint written before runs could have ranks, opened read-only
            return []
        return [json.loads(s) for (s,) in rows]

    def save_group(self, index: int, stats: dict) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO groups (run, idx, stats) VALUES (?, ?, ?)",
                            (self.run, index, json.dumps(stats)))

    def set_fingerprint(self, fingerprint: str | None) -> None:
        """Mark this run as one whose finished rows a rerun of the same command may skip.

        Set only after `sync` has registered the manifest: a run killed before that point
        must not vouch for rows it never compared.
        """
        settings = json.loads(self.db.execute("SELECT settings FROM runs WHERE run = ?", (self.run,)).fetchone()[0])
        settings["resume_fingerprint"] = fingerprint
        with self.db:
            self.db.execute("UPDATE runs SET settings = ? WHERE run = ?", (json.dumps(settings), self.run))

    def finish_run(self, totals: dict) -> None:
        with self.db:
            self.db.execute("UPDATE runs SET totals = ? WHERE run = ?", (json.dumps(totals), self.run))

    # --- reading --------------------------------------------------------------------

    def finished_lines(self, existing_files: set[str]) -> tuple[frozenset, int]:
        """Manifest lines whose every image is done with its file present, and how many images that is.

        A resume of an unchanged manifest skips these rows without reading them again.
        """
        lines: dict[int, list] = {}  # line -> [every image done with its file, image count]
        for ord_, status, file, row in self.db.execute("SELECT ord, status, file, row FROM images"):
            entry = lines.setdefault(ord_ // 100_000, [True, 0])
            # Rows naming image or LoRA files are checked again: the files may have changed.
            entry[0] = (entry[0] and status == "done" and file in existing_files
                        and not any(name in (row or "") for name in _FILE_COLUMNS))
            entry[1] += 1
        finished = frozenset(line for line, (ok, _) in lines.items() if ok)
        return finished, sum(count for ok, count in lines.values() if ok)

    def counts(self) -> Counts:
        total, done, failed = self.db.execute(
            """SELECT COUNT(*), COALESCE(SUM(status = 'done'), 0), COALESCE(SUM(status = 'failed'), 0)
               FROM images""").fetchone()
        return Counts(total=total, done=done, failed=failed)

    def done_metadata(self):
        """metadata.jsonl lines of every done image, in manifest order; with `clip_score` and `clip_model`
        where the CLIP model used last here (batch/score.py) has scored the image."""
        clip = self.clip_model()
        if clip is None:
            for (meta,) in self.db.execute("SELECT meta FROM images WHERE status = 'done' ORDER BY ord, id, k"):
                yield meta
            return
        model, name = clip
        for meta, score in self.db.execute(
                """SELECT i.meta, c.score FROM images i LEFT JOIN clip_scores c ON c.key = i.key AND c.model = ?
                   WHERE i.status = 'done' ORDER BY i.ord, i.id, i.k""", (model,)):
            yield meta if score is None or not meta else _with_clip_score(meta, score, name)

    # --- CLIP scores (batch/score.py) -----------------------------------------------

    def use_clip_model(self, model: str, name: str) -> None:
        """Make `model` the CLIP model whose scores metadata.jsonl and the report show."""
        with self.db:
            self.db.execute("""INSERT INTO clip_models (model, name, used_at) VALUES (?, ?, ?)
                               ON CONFLICT (model) DO UPDATE SET name = excluded.name, used_at = excluded.used_at""",
                            (model, name, time.time()))

    def clip_model(self) -> tuple[str, str] | None:
        """(model, name) of the CLIP model used last here, or None."""
        try:
            return self.db.execute("SELECT model, name FROM clip_models ORDER BY used_at DESC LIMIT 1").fetchone()
        except sqlite3.OperationalError:  # a checkpoint from before CLIP scores, opened read-only
            return None

    def save_clip_scores(self, model: str, scores: list[tuple[str, float]]) -> None:
        """(image key, score) pairs by `model`, in one transaction (fsynced, as every commit here)."""
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO clip_scores (key, model, score) VALUES (?, ?, ?)",
                                [(key, model, score) for key, score in scores])

    def unscored_images(self, model: str) -> list[tuple[str, str, str]]:
        """(key, file, metadata JSON) of done images `model` has not scored, in manifest order."""
        return self.db.execute(
            """SELECT i.key, i.file, i.meta FROM images i WHERE i.status = 'done' AND NOT EXISTS
               (SELECT 1 FROM clip_scores c WHERE c.key = i.key AND c.model = ?) ORDER BY i.ord, i.id, i.k""",
            (model,)).fetchall()

    def clip_scores(self, model: str) -> list[tuple[str | None, float]]:
        """(group name, score) of every done image `model` has scored, in manifest order."""
        return self.db.execute(
            """SELECT i.group_name, c.score FROM images i JOIN clip_scores c ON c.key = i.key AND c.model = ?
               WHERE i.status = 'done' ORDER BY i.ord, i.id, i.k""", (model,)).fetchall()

    def failed_jobs(self) -> list[tuple[str, str, str, int]]:
        """(id, manifest row JSON, error, attempts) of failed images, in manifest order."""
        return self.db.execute(
            "SELECT id, row, error, attempts FROM images WHERE status = 'failed' ORDER BY ord, id, k").fetchall()

    def last_run(self) -> tuple[int, dict, dict | None] | None:
        row = self.db.execute("SELECT run, settings, totals FROM runs ORDER BY run DESC LIMIT 1").fetchone()
        if row is None:
            return None
        return row[0], json.loads(row[1]), json.loads(row[2]) if row[2] else None

    def runs(self) -> list[tuple[int, dict, dict | None]]:
        """Every run of this folder, oldest first: (run, settings, totals; None while running or if killed)."""
        return [(run, json.loads(settings), json.loads(totals) if totals else None)
                for run, settings, totals in self.db.execute("SELECT run, settings, totals FROM runs ORDER BY run")]

    def group_stats(self, run: int) -> list[dict]:
        """The run's groups; a group several ranks served is one entry (their figures combined)."""
        merged: dict[tuple, dict] = {}
        for (text,) in self.db.execute("SELECT stats FROM groups WHERE run = ? ORDER BY idx", (run,)):
            stats = json.loads(text)
            name = (stats["model"], stats["mode"], stats["width"], stats["height"], stats.get("lora"))
            merged[name] = _combine(merged[name], stats) if name in merged else stats
        return list(merged.values())

    def image_rows(self, run: int | None = None) -> list[tuple]:
        """(id, k, group, batch, seconds, status) per image, for report.csv and percentiles."""
        query = "SELECT id, k, group_name, batch, seconds, status FROM images"
        if run is not None:
            return self.db.execute(query + " WHERE run = ? ORDER BY ord, id, k", (run,)).fetchall()
        return self.db.execute(query + " ORDER BY ord, id, k").fetchall()


def _with_clip_score(meta: str, score: float, name: str) -> str:
    """A metadata line with `clip_score` and `clip_model` last; spliced, not re-encoded (a million lines)."""
    if '"clip_score"' in meta or '"clip_model"' in meta:  # a manifest column of that name: ours replaces it
        fields = json.loads(meta)
        fields.pop("clip_score", None)
        fields.pop("clip_model", None)
        meta = json.dumps(fields, ensure_ascii=False)
    tail = f'"clip_score": {round(score, 4)}, "clip_model": {json.dumps(name, ensure_ascii=False)}}}'
    return meta[:-1] + (", " if meta.strip() != "{}" else "") + tail


def _combine(a: dict, b: dict) -> dict:
    """One group's figures from two ranks that served it side by side: counts add, times overlap."""
    out = dict(a)
    for name in ("images", "failed", "batches"):
        out[name] = a.get(name, 0) + b.get(name, 0)
    for name in ("load_s", "warmup_s", "wall_s", "batch_size", "working_batch_size"):
        out[name] = max(a.get(name) or 0, b.get(name) or 0)
    for name in ("s_per_image_p50", "s_per_image_p95"):  # weighted by images: the exact figure needs every image
        values = [(g[name], g["images"]) for g in (a, b) if g.get(name) is not None and g.get("images")]
        out[name] = round(sum(v * n for v, n in values) / sum(n for _, n in values), 4) if values else None
    for name in ("peak_vram_bytes", "vram_estimate_bytes"):
        values = [g.get(name) for g in (a, b) if g.get(name) is not None]
        out[name] = max(values) if values else None
    out["images_per_s"] = round(out["images"] / out["wall_s"], 4) if out["wall_s"] else 0.0
    out["stages"] = {k: round(a.get("stages", {}).get(k, 0.0) + b.get("stages", {}).get(k, 0.0), 4)
                     for k in set(a.get("stages", {})) | set(b.get("stages", {}))}
    return out
