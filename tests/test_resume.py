"""Interruptions: SIGKILL mid-run, rerun finishes; batch size never changes pixels; status counts."""
from __future__ import annotations

import json
import signal

import numpy as np
from conftest import SLOW, cli, done_count, numbered_manifest, pixels, read_metadata, start_run, wait_for_done, write_jsonl

def _status(out, capsys) -> dict:
    capsys.readouterr()
    assert cli("status", out, "--json") == 0
    return json.loads(capsys.readouterr().out)


def test_sigkill_then_rerun_finishes_with_identical_images(tmp_path, capsys):
    manifest = numbered_manifest(tmp_path)
    reference = tmp_path / "reference"
    assert cli(manifest, *SLOW, "--out", reference, "--quiet", "--batch-size", "2") == 0

    out = tmp_path / "killed"
    proc = start_run(manifest, out, *SLOW, "--batch-size", "2")
    seen = wait_for_done(proc, out, at_least=3)
    assert proc.poll() is None, "the run finished before it could be killed"
    status = _status(out, capsys)  # read while the run writes
    assert status["total"] == 17 and status["done"] >= seen and status["done"] + status["pending"] + status["failed"] == 17
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = done_count(out)
    assert 3 <= done_at_kill < 17

    assert cli(manifest, *SLOW, "--out", out, "--quiet", "--batch-size", "2") == 0
    report = json.loads((out / "report.json").read_text())
    # Done images are skipped; images written but not yet recorded at the kill are adopted (same key in the PNG).
    skipped = report["totals"]["skipped_from_checkpoint"]
    assert done_at_kill <= skipped <= done_at_kill + 2  # the writer holds at most one batch (2)
    assert report["totals"]["generated"] == 17 - skipped
    assert _status(out, capsys) == {"total": 17, "done": 17, "failed": 0, "pending": 0}
    files = sorted(p.name for p in (out / "images").iterdir())
    assert not [f for f in files if f.startswith(".")], "temp files left behind"
    names = [m["file_name"] for m in read_metadata(out)]
    assert len(names) == len(set(names)) == 17
    assert sorted(names) == sorted(f for f in files if f.endswith(".png"))
    for name in names:
        assert np.abs(pixels(out / "images" / name) - pixels(reference / "images" / name)).max() <= 2, name


def test_batch_size_does_not_change_pixels(tmp_path, images_dir, mixed_manifest):
    one, four = tmp_path / "bs1", tmp_path / "bs4"
    fast = ["--model", "tiny", "--device", "cpu", "--steps", "4", "--width", "64", "--height", "64", "--quiet"]
    assert cli(mixed_manifest, *fast, "--out", one, "--batch-size", "1") == 0
    assert cli(mixed_manifest, *fast, "--out", four, "--batch-size", "4") == 0
    names = [m["file_name"] for m in read_metadata(one)]
    assert len(names) == 7 and names == [m["file_name"] for m in read_metadata(four)]
    batches = [json.loads((d / "report.json").read_text())["groups"][0]["batches"] for d in (one, four)]
    assert batches == [4, 2]  # the txt2img group: 4 images, really batched differently
    for name in names:
        a, b = pixels(one / "images" / name), pixels(four / "images" / name)
        assert a.std() > 1  # not a blank image
        assert np.abs(a - b).max() <= 2, name


def test_seed_changes_pixels_and_rows_are_reproducible(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": "x", "seed": 1}, {"id": "b", "prompt": "x", "seed": 2}])
    fast = ["--model", "tiny", "--device", "cpu", "--steps", "3", "--width", "64", "--height", "64", "--quiet"]
    assert cli(manifest, *fast, "--out", tmp_path / "o1") == 0
    assert cli(manifest, *fast, "--out", tmp_path / "o2", "--batch-size", "1") == 0
    a1, b1 = pixels(tmp_path / "o1/images/a.png"), pixels(tmp_path / "o1/images/b.png")
    assert np.abs(a1 - b1).max() > 20  # another seed, another image
    assert np.abs(a1 - pixels(tmp_path / "o2/images/a.png")).max() <= 2


def test_the_checkpoint_commits_survive_power_loss(tmp_path):
    """synchronous=FULL: every commit is fsynced (NORMAL in WAL mode survives a killed process only)."""
    from batch.checkpoint import Checkpoint

    checkpoint = Checkpoint(tmp_path / "checkpoint.sqlite")
    try:
        assert checkpoint.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # 2 = FULL
        assert checkpoint.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        checkpoint.close()
