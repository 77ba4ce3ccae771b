"""Scale check: `validate` of a 1,000,000-row manifest, and a resume over 1,000,000 done images.

Prints seconds and peak RSS for each, and (with --report) writes them to reports/.
Targets (issue 4): validate <= 60 s and <= 3 GB RSS on 2 cores; a resumed run whose
checkpoint holds 1,000,000 done images starts generating the next image within 60 s.

    python benchmarks/scale.py [--rows 1000000] [--work /tmp/sdbatch-scale] [--report]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PENDING = 8  # rows left to make in the resume check


def write_manifest(path: Path, rows: int) -> None:
    words = ["cat", "dog", "fox", "owl", "lighthouse", "castle", "forest", "river"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps({"id": f"img{i:07d}", "prompt": f"a photo of a {words[i % 8]}, number {i}",
                                "seed": i, "steps": 2, "width": 64, "height": 64, "label": words[i % 8]}) + "\n")


def timed(command: list[str], until=None) -> tuple[float, int, int]:
    """Run a command; seconds (to `until()` if given, else to exit), its peak RSS, and its exit code."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marked = None
    while until is not None and proc.poll() is None and marked is None:
        if until():
            marked = time.perf_counter() - started
        time.sleep(0.1)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = marked if marked is not None else time.perf_counter() - started
    return seconds, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status)


def prepare_resume(manifest: Path, out: Path, same_command: bool) -> tuple[int, list[str]]:
    """An output folder whose checkpoint holds every row but the last PENDING as done.

    same_command: the checkpoint's last run is this very manifest and settings (a run that
    was killed), which lets the resume skip re-reading finished rows; otherwise the resume
    validates every row again (what happens after the manifest was edited).
    """
    from batch.checkpoint import FILE_NAME, Checkpoint
    from batch.config import Defaults, RunConfig
    from batch.manifest import load_manifest
    from batch.models import LoadOptions
    from batch.runner import _resume_fingerprint, pixel_salt

    defaults = Defaults(model="tiny")
    jobs = load_manifest(manifest, defaults).jobs
    salt = pixel_salt(LoadOptions(device="cpu", dtype="fp32"))  # the key salt of a CPU run
    tasks = [t for job in jobs for t in job.images(salt)]
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    checkpoint = Checkpoint(out / FILE_NAME)
    config = RunConfig(manifest=manifest, out=out, model="tiny", device="cpu")
    fingerprint = _resume_fingerprint(config, defaults, salt, manifest.read_bytes()) if same_command else None
    checkpoint.start_run({"started_at": "scale-check", "resume_fingerprint": fingerprint})
    checkpoint.sync(tasks, set(), retry_failed=False, fresh=True)
    done = tasks[:-PENDING]
    for task in done:
        os.close(os.open(images / f"{task.stem}.png", os.O_CREAT | os.O_WRONLY, 0o644))
    with checkpoint.db:
        checkpoint.db.executemany(
            "UPDATE images SET status = 'done', file = ?, meta = ? WHERE id = ? AND k = 0",
            ((f"{t.stem}.png", json.dumps({"file_name": f"{t.stem}.png", "id": t.job.id}), t.job.id) for t in done))
    checkpoint.close()
    return len(done), [t.job.id for t in tasks[-PENDING:]]


def made_any(out: Path, ids: list[str]) -> bool:
    """Whether one of the pending rows is done: primary-key lookups, so polling costs nothing."""
    try:
        db = sqlite3.connect(f"file:{out / 'checkpoint.sqlite'}?mode=ro", uri=True, timeout=1)
        try:
            marks = ",".join("?" * len(ids))
            return db.execute(f"SELECT COUNT(*) FROM images WHERE status = 'done' AND id IN ({marks})", ids).fetchone()[0] > 0
        finally:
            db.close()
    except sqlite3.Error:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sdbatch-scale"))
    parser.add_argument("--report", action="store_true", help="write reports/scale-<date>.md")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    manifest = args.work / f"manifest-{args.rows}.jsonl"
    if not manifest.exists():
        write_manifest(manifest, args.rows)
    run_batch = [sys.executable, str(REPO / "run_batch.py")]

    validate_s, validate_rss, code = timed(run_batch + ["validate", str(manifest), "--json", "--model", "tiny"])
    assert code == 0, "validate failed"
    print(f"validate {args.rows} rows: {validate_s:.1f} s, peak RSS {validate_rss / 2**30:.2f} GB")

    resumes = {}
    for same_command in (True, False):
        out = args.work / ("resume-same" if same_command else "resume-edited")
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        started = time.perf_counter()
        done, pending = prepare_resume(manifest, out, same_command)
        print(f"prepared a checkpoint with {done} done images in {time.perf_counter() - started:.0f} s")
        first_s, rss, code = timed(
            run_batch + [str(manifest), "--model", "tiny", "--device", "cpu", "--out", str(out), "--quiet"],
            until=lambda: made_any(out, pending))
        report = json.loads((out / "report.json").read_text())
        resumes[same_command] = (first_s, rss, code, report["totals"]["wall_s"])
        what = "same command (killed run)" if same_command else "edited manifest (full validation)"
        print(f"resume over {done} done images, {what}: first new image after {first_s:.1f} s, "
              f"peak RSS {rss / 2**30:.2f} GB, exit {code}, {report['totals']['done']} done, "
              f"skipped_from_checkpoint {report['totals']['skipped_from_checkpoint']}")
        subprocess.run(["rm", "-rf", str(out)], check=True)

    if args.report:
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        date = dt.date.today().isoformat()
        text = f"""# Scale check, {date}

`python benchmarks/scale.py --report` on {platform.node()} ({cores} cores, {platform.processor() or platform.machine()}),
Python {platform.python_version()}, torch {torch.__version__}.

| check | target | measured |
|---|---|---|
| `validate` of {args.rows:,} JSONL rows | <= 60 s, <= 3 GB RSS | {validate_s:.1f} s, {validate_rss / 2**30:.2f} GB |
| resume over {done:,} done images, same command (a killed run): first new image | <= 60 s | {resumes[True][0]:.1f} s (peak RSS {resumes[True][1] / 2**30:.2f} GB) |
| resume over {done:,} done images, edited manifest (every row validated again): first new image | (<= 60 s) | {resumes[False][0]:.1f} s (peak RSS {resumes[False][1] / 2**30:.2f} GB) |

Each resumed run then made the {PENDING} remaining images (report `wall_s` {resumes[True][3]:.1f} s and
{resumes[False][3]:.1f} s, which stops before metadata.jsonl and the reports are rebuilt from the
checkpoint; exit {resumes[True][2]} and {resumes[False][2]}). A rerun of the same command skips the rows its checkpoint holds finished
without parsing them (same manifest bytes and settings); after an edit every row is read and
validated again and each image's key compared.
"""
        path = REPO / "reports" / f"scale-{date}.md"
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
