"""The SQLite journal: one row per image, so any interruption resumes where it stopped.

An image is `done` only after its file is fully written (temp file, fsync, rename) and
its row is committed here, and a commit is on disk (fsynced) before the run goes on, so it
survives power loss. WAL mode lets `status` read while a run writes.
"""
from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import OutputError
from .job import ImageTask

FILE_NAME = "checkpoint.sqlite"
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
"""


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
    def __init__(self, path: Path, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            if not self.path.exists():
                raise OutputError(f"no checkpoint at {self.path}: is this an sdbatch output folder?")
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        else:
            self.db = sqlite3.connect(self.path, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            # FULL: each commit fsyncs the WAL, so a committed image survives power loss, not only a
            # killed process (NORMAL's promise). One fsync per batch: nothing beside a UNet call.
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
        self.run: int | None = None

    def close(self) -> None:
        self.db.close()

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
        """Record finished images in one transaction."""
        if not outcomes:
            return
        now = time.time()
        done = [(o.file, json.dumps(o.meta, ensure_ascii=False), o.group, o.batch, o.seconds, self.run, now,
                 o.task.job.id, o.task.k) for o in outcomes if o.ok]
        failed = [(o.error, o.group, o.batch, self.run, now, o.task.job.id, o.task.k) for o in outcomes if not o.ok]
        with self.db:
            self.db.executemany(
                """UPDATE images SET status = 'done', attempts = attempts + 1, error = NULL, file = ?, meta = ?,
                   group_name = ?, batch = ?, seconds = ?, run = ?, updated_at = ? WHERE id = ? AND k = ?""", done)
            self.db.executemany(
                """UPDATE images SET status = 'failed', attempts = attempts + 1, error = ?, group_name = ?,
                   batch = ?, run = ?, updated_at = ? WHERE id = ? AND k = ?""", failed)

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
        """metadata.jsonl lines of every done image, in manifest order."""
        for (meta,) in self.db.execute("SELECT meta FROM images WHERE status = 'done' ORDER BY ord, id, k"):
            yield meta

    def failed_jobs(self) -> list[tuple[str, str, str, int]]:
        """(id, manifest row JSON, error, attempts) of failed images, in manifest order."""
        return self.db.execute(
            "SELECT id, row, error, attempts FROM images WHERE status = 'failed' ORDER BY ord, id, k").fetchall()

    def last_run(self) -> tuple[int, dict, dict | None] | None:
        row = self.db.execute("SELECT run, settings, totals FROM runs ORDER BY run DESC LIMIT 1").fetchone()
        if row is None:
            return None
        return row[0], json.loads(row[1]), json.loads(row[2]) if row[2] else None

    def group_stats(self, run: int) -> list[dict]:
        return [json.loads(s) for (s,) in self.db.execute("SELECT stats FROM groups WHERE run = ? ORDER BY idx", (run,))]

    def image_rows(self, run: int | None = None) -> list[tuple]:
        """(id, k, group, batch, seconds, status) per image, for report.csv and percentiles."""
        query = "SELECT id, k, group_name, batch, seconds, status FROM images"
        if run is not None:
            return self.db.execute(query + " WHERE run = ? ORDER BY ord, id, k", (run,)).fetchall()
        return self.db.execute(query + " ORDER BY ord, id, k").fetchall()
