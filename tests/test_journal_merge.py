"""Laying rank journals over checkpoint.sqlite (issue 19): decided by run and status, never by a
clock; a journal is removed only once every row in it is decided, and never while its rank writes it."""
from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

import batch.checkpoint as checkpoint_module
from batch.checkpoint import FILE_NAME, Checkpoint, Outcome, journal_name
from batch.errors import OutputError
from batch.job import Job

HOURS = 3600.0


def _tasks(*ids):
    return [Job(id=i, line=n + 1, stem=i, mode="txt2img", prompt=f"a {i}", negative_prompt="", width=64, height=64,
                steps=2, cfg=7.0, seed=n, num_images=1, scheduler="ddim").images("")[0] for n, i in enumerate(ids)]


def _done(task) -> Outcome:
    return Outcome(task, ok=True, file=f"{task.stem}.png", meta={"id": task.job.id}, seconds=0.5)


def _failed(task) -> Outcome:
    return Outcome(task, ok=False, error="CUDA out of memory")


def _start_run(checkpoint: Checkpoint, tasks, retry_failed: bool = False) -> int:
    """Rank 0 starting a run: the run's images registered (pending) in checkpoint.sqlite."""
    run = checkpoint.start_run({"started_at": "2026-01-01T00:00:00"})
    checkpoint.sync(tasks, set(), retry_failed=retry_failed, fresh=False)
    return run


def _journal(out, rank: int, run: int, outcomes, clock_s: float = 0.0):
    """A rank's journal as it writes it; `clock_s`: how far that host's clock is off (negative: behind)."""
    journal = Checkpoint(out / journal_name(rank), wal=False)
    journal.run = run
    journal.commit(outcomes)
    with journal.db:
        journal.db.execute("UPDATE images SET updated_at = updated_at + ?", (clock_s,))
    journal.close()
    return journal.path


def _rows(checkpoint: Checkpoint) -> dict:
    return {i: (status, run, file) for i, status, run, file in
            checkpoint.db.execute("SELECT id, status, run, file FROM images ORDER BY id")}


def _set(checkpoint: Checkpoint, task, status: str, run: int, clock_s: float = 0.0) -> None:
    """Put one image's row in a given state (the rule table below needs states no single run leaves)."""
    with checkpoint.db:
        checkpoint.db.execute(
            "UPDATE images SET status = ?, run = ?, file = ?, updated_at = updated_at + ? WHERE id = ?",
            (status, run, f"{task.stem}.png" if status == "done" else None, clock_s, task.job.id))


def test_a_rank_whose_clock_is_hours_behind_keeps_its_finished_images(tmp_path):
    """Rank 1's host is 6 h behind rank 0's: its images are still done, in the read view and for good."""
    a, b, c = _tasks("a", "b", "c")
    checkpoint = Checkpoint(tmp_path / FILE_NAME, wal=False)
    run = _start_run(checkpoint, [a, b, c])  # registered by rank 0 (its clock): pending
    checkpoint.commit([_done(c)])  # rank 0's own share
    journal = _journal(tmp_path, 1, run, [_done(a), _failed(b)], clock_s=-6 * HOURS)

    view = Checkpoint.merged(tmp_path)
    try:
        assert _rows(view) == {"a": ("done", run, "a.png"), "b": ("failed", run, None), "c": ("done", run, "c.png")}
        assert view.counts().as_dict() == {"total": 3, "done": 2, "failed": 1, "pending": 0}
    finally:
        view.close()

    assert checkpoint.absorb_journals(tmp_path) == 2
    assert not journal.exists()
    assert _rows(checkpoint) == {"a": ("done", run, "a.png"), "b": ("failed", run, None), "c": ("done", run, "c.png")}
    checkpoint.close()


def test_precedence_is_run_then_status_and_no_clock(tmp_path):
    """Each image is one case of the rule; the journal's clock always says the opposite of the right answer."""
    same_run_failed, same_run_done, later_pending, later_failed, older_failed, done_kept = tasks = _tasks(
        "same_run_failed", "same_run_done", "later_pending", "later_failed", "older_failed", "done_kept")
    checkpoint = Checkpoint(tmp_path / FILE_NAME, wal=False)
    _start_run(checkpoint, tasks)
    run = _start_run(checkpoint, tasks)  # run 2: every image pending, registered under run 2
    assert run == 2
    _set(checkpoint, same_run_done, "done", 2)
    _set(checkpoint, later_failed, "failed", 2)
    _set(checkpoint, older_failed, "failed", 1)
    _set(checkpoint, done_kept, "done", 1)
    # Rank 1 of run 2, its clock 6 h behind: the checkpoint's rows look newer.
    _journal(tmp_path, 1, 2, [_failed(same_run_failed), _failed(same_run_done), _done(older_failed),
                              _failed(done_kept)], clock_s=-6 * HOURS)
    # Rank 2 of run 1, left behind (kept while its rank was alive), its clock 6 h ahead: it looks newer.
    _journal(tmp_path, 2, 1, [_failed(later_pending), _done(later_failed)], clock_s=6 * HOURS)

    expected = {
        "same_run_failed": ("failed", 2, None),  # one run: failed beats pending
        "same_run_done": ("done", 2, "same_run_done.png"),  # one run: done is not downgraded by failed
        "later_pending": ("pending", 2, None),  # run 2 planned it again: run 1's failure is stale
        "later_failed": ("done", 1, "later_failed.png"),  # a done image is never downgraded, whichever run
        "older_failed": ("done", 2, "older_failed.png"),  # the later run wins
        "done_kept": ("done", 1, "done_kept.png"),  # a failed record never downgrades a done image
    }
    view = Checkpoint.merged(tmp_path)
    try:
        assert _rows(view) == expected
    finally:
        view.close()
    checkpoint.absorb_journals(tmp_path)
    assert _rows(checkpoint) == expected
    assert not list(tmp_path.glob("journal-*")), "every row decided: both journals removed"
    checkpoint.absorb_journals(tmp_path)  # nothing left, nothing changes
    assert _rows(checkpoint) == expected
    checkpoint.close()


def test_a_journal_mid_commit_is_kept_until_its_rows_are_all_absorbed(tmp_path, monkeypatch):
    """A writer that holds no journal lock (another sdbatch version, a filesystem without flock) is
    inside a transaction: the rows it is committing cannot be absorbed yet, so the file stays."""
    monkeypatch.setattr(checkpoint_module, "JOURNAL_BUSY_S", 0.2, raising=False)
    a, b = _tasks("a", "b")
    checkpoint = Checkpoint(tmp_path / FILE_NAME, wal=False)
    run = _start_run(checkpoint, [a, b])
    path = _journal(tmp_path, 1, run, [_done(a)])
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO images (id, k, ord, key, status, attempts, file, meta, run) "
                   "VALUES ('b', 0, 200000, ?, 'done', 1, 'b.png', '{}', ?)", (b.key, run))

    checkpoint.absorb_journals(tmp_path)
    assert path.exists(), "the journal was removed while a commit to it was under way"
    writer.execute("COMMIT")
    writer.close()

    assert checkpoint.absorb_journals(tmp_path) == 2
    assert not path.exists()
    assert _rows(checkpoint) == {"a": ("done", run, "a.png"), "b": ("done", run, "b.png")}
    checkpoint.close()


def test_a_journal_whose_rank_is_alive_is_neither_absorbed_nor_removed(tmp_path, monkeypatch):
    """A rank of an earlier launch still running holds its journal's lock: the next run leaves the
    journal alone (readers still see it), a second writer for that rank is refused, and once the
    rank closes it, the journal is absorbed and removed with its lock file."""
    monkeypatch.setattr(checkpoint_module, "JOURNAL_BUSY_S", 0.2, raising=False)
    a, b = _tasks("a", "b")
    checkpoint = Checkpoint(tmp_path / FILE_NAME, wal=False)
    run = _start_run(checkpoint, [a, b])
    journal = Checkpoint(tmp_path / journal_name(1), wal=False)
    journal.run = run
    journal.commit([_done(a)])

    assert checkpoint.absorb_journals(tmp_path) == 0
    assert journal.path.exists()
    assert _rows(checkpoint)["a"] == ("pending", run, None)
    view = Checkpoint.merged(tmp_path)
    assert _rows(view)["a"] == ("done", run, "a.png")  # `status` sees a live rank's progress
    view.close()
    with pytest.raises(OutputError, match="journal-rank1.sqlite"):
        Checkpoint(tmp_path / journal_name(1), wal=False)

    journal.commit([_done(b)])  # the live rank goes on: nothing it writes is lost
    journal.close()
    assert checkpoint.absorb_journals(tmp_path) == 2
    assert _rows(checkpoint) == {"a": ("done", run, "a.png"), "b": ("done", run, "b.png")}
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILE_NAME], "journal and lock file removed"
    checkpoint.close()


def test_a_killed_rank_leaves_no_lock_behind(tmp_path):
    """Another process holds the journal's lock as a rank does, and is killed: while it lives its
    journal stays; once it is dead the lock is gone with it, and its stale lock file is no obstacle."""
    a, = _tasks("a")
    checkpoint = Checkpoint(tmp_path / FILE_NAME, wal=False)
    run = _start_run(checkpoint, [a])
    journal = _journal(tmp_path, 1, run, [_done(a)])
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)", f"{journal}.lock"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert checkpoint.absorb_journals(tmp_path) == 0
        assert journal.exists()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert (tmp_path / f"{journal.name}.lock").exists()  # killed: nobody removed its lock file
    assert checkpoint.absorb_journals(tmp_path) == 1
    assert _rows(checkpoint) == {"a": ("done", run, "a.png")}
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILE_NAME]
    checkpoint.close()
