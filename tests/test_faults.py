"""Everything a night can bring: kills at random moments, Ctrl-C, a busy folder, OOM, bad files, full disks."""
from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import sqlite3
import time

import numpy as np
import pytest
from conftest import (FAST, SLOW, cli, done_count, numbered_manifest, pixels, read_metadata, start_run, wait_for_done,
                      write_jsonl)

SLOW2 = [*SLOW, "--batch-size", "2"]
KILLS = int(os.environ.get("SDBATCH_KILLS", "4"))  # more with SDBATCH_KILLS=50


def _start(manifest, out, *extra):
    return start_run(manifest, out, *SLOW2, *extra)


def _assert_complete_and_equal(out, reference, total=17):
    files = sorted(os.listdir(out / "images"))
    assert not [f for f in files if f.startswith(".")], f"temp files left: {files}"
    names = [m["file_name"] for m in read_metadata(out)]
    assert len(names) == len(set(names)) == total
    assert sorted(names) == sorted(f for f in files if f.endswith(".png"))
    for name in names:
        assert np.abs(pixels(out / "images" / name) - pixels(reference / "images" / name)).max() <= 2, name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    manifest = numbered_manifest(folder)
    assert cli(manifest, *SLOW2, "--out", folder / "out", "--quiet") == 0
    return folder / "out"


def test_killed_at_random_moments_then_finished(tmp_path, reference):
    manifest = numbered_manifest(tmp_path)
    out = tmp_path / "out"
    rng = random.Random(int(os.environ.get("SDBATCH_KILL_SEED", "0")))
    kills = 0
    for _ in range(KILLS):
        if done_count(out) >= 15:
            break
        proc = _start(manifest, out)
        # Kill at a random moment: during start-up, model load, generation or a write.
        wait_for_done(proc, out, done_count(out) + rng.randint(0, 3))
        time.sleep(rng.uniform(0, 0.4))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1
    assert cli(manifest, *SLOW2, "--out", out, "--quiet") == 0
    _assert_complete_and_equal(out, reference)
    # Work redone: images generated (logged per batch in run.log) beyond the 17 needed.
    generated = sum(int(n) for n in re.findall(r"batch \d+: (\d+) generated", (out / "run.log").read_text()))
    assert generated - 17 <= 2 * kills, (generated, kills)  # at most one batch (2 images) per kill


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_cleanly_and_rerun_finishes(tmp_path, reference, sig):
    manifest = numbered_manifest(tmp_path)
    out = tmp_path / "out"
    proc = _start(manifest, out)
    assert wait_for_done(proc, out, 2) >= 2
    assert proc.poll() is None, "finished before the signal"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err and "Traceback" not in err
    done = done_count(out)
    assert 2 <= done < 17
    assert len(read_metadata(out)) == done  # outputs were flushed and rebuilt before exiting
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["interrupted"] is True
    assert cli(manifest, *SLOW2, "--out", out, "--quiet") == 0
    _assert_complete_and_equal(out, reference)


def test_second_interrupt_stops_at_once_without_damage(tmp_path, reference):
    manifest = numbered_manifest(tmp_path)
    out = tmp_path / "out"
    proc = _start(manifest, out)
    assert wait_for_done(proc, out, 2) >= 2
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "stopping now" in err
    assert cli(manifest, *SLOW2, "--out", out, "--quiet") == 0
    _assert_complete_and_equal(out, reference)


def test_busy_folder_exits_2_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    manifest = numbered_manifest(tmp_path)
    out = tmp_path / "out"
    proc = _start(manifest, out)
    assert wait_for_done(proc, out, 1) >= 1 and proc.poll() is None
    assert cli(manifest, *SLOW2, "--out", out, "--quiet") == 2
    err = capsys.readouterr().err
    assert f"pid {proc.pid}" in err and "in use by another sdbatch run" in err and "Traceback" not in err
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / ".sdbatch.lock").exists()  # left behind by the killed run
    assert cli(manifest, *SLOW2, "--out", out, "--quiet") == 0
    assert f"took over a stale lock left by pid {proc.pid}" in (out / "run.log").read_text()


def test_out_of_memory_halves_the_batch_and_keeps_the_smaller_size(tmp_path, monkeypatch):
    import torch

    import batch.execute as execute

    real, sizes = execute.generate_batch, []

    def small_gpu(family, conditioner, batch, steps=None):  # fault-injection seam: tests only
        sizes.append(len(batch.tasks))
        if len(batch.tasks) > 2 or any(t.job.id == "huge" for t in batch.tasks):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(family, conditioner, batch, steps)

    monkeypatch.setattr(execute, "generate_batch", small_gpu)
    rows = [{"id": f"r{i}", "prompt": "x", "seed": i} for i in range(16)] + [{"id": "huge", "prompt": "y"}]
    out = tmp_path / "out"
    assert cli(write_jsonl(tmp_path / "m.jsonl", rows), *FAST, "--out", out, "--quiet", "--batch-size", "8") == 1
    assert sizes[:4] == [8, 4, 2, 2]  # 8 fails, 4 fails, then halves of 2
    assert 8 not in sizes[4:] and 4 not in sizes[4:]  # the rest of the group runs at the working size
    group = json.loads((out / "report.json").read_text())["groups"][0]
    assert group["batch_size"] == 8 and group["working_batch_size"] == 1  # "huge" failed alone at size 1
    assert group["images"] == 16 and group["failed"] == 1
    (failed,) = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert failed["id"] == "huge" and "out of memory" in failed["error"]


def test_an_image_that_stops_decoding_fails_only_its_job(tmp_path, images_dir, monkeypatch):
    import batch.runner as runner

    real = runner.make_plan

    def corrupt_then_plan(*args, **kwargs):  # the file is damaged after validation, before generation
        (images_dir / "init.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "make_plan", corrupt_then_plan)
    manifest = write_jsonl(images_dir / "m.jsonl", [
        {"id": "ok", "prompt": "x"}, {"id": "i2i", "prompt": "y", "init_image": "init.png"}, {"id": "ok2", "prompt": "z"}])
    out = images_dir / "out"
    assert cli(manifest, *FAST, "--out", out, "--quiet") == 1
    assert sorted(m["id"] for m in read_metadata(out)) == ["ok", "ok2"]
    (failed,) = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert failed["id"] == "i2i" and "cannot read init_image" in failed["error"] and "init.png" in failed["error"]
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["failed"] == 1 and report["totals"]["done"] == 2


def test_a_full_disk_fails_only_that_image(tmp_path, monkeypatch):
    import batch.writer as writer

    real = writer.save_image

    def full_disk(image, path, *args, **kwargs):
        if path.name == "b.png":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(image, path, *args, **kwargs)

    monkeypatch.setattr(writer, "save_image", full_disk)
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": i, "prompt": "x"} for i in "abc"])
    out = tmp_path / "out"
    assert cli(manifest, *FAST, "--out", out, "--quiet") == 1
    assert sorted(p.name for p in (out / "images").iterdir()) == ["a.png", "c.png", "metadata.jsonl"]
    (failed,) = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert failed["id"] == "b" and "No space left on device" in failed["error"]
    monkeypatch.setattr(writer, "save_image", real)
    assert cli(manifest, *FAST, "--out", out, "--quiet", "--retry-failed") == 0


def test_attempts_are_counted_and_capped(tmp_path, monkeypatch):
    import batch.execute as execute

    real = execute.generate_batch

    def always_fails(family, conditioner, batch, steps=None):
        if batch.tasks[0].job.id == "bad":
            raise RuntimeError("broken job")
        return real(family, conditioner, batch, steps)

    monkeypatch.setattr(execute, "generate_batch", always_fails)
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "bad", "prompt": "x"}, {"id": "good", "prompt": "y"}])
    out = tmp_path / "out"

    def attempts():
        db = sqlite3.connect(out / "checkpoint.sqlite")
        try:
            return db.execute("SELECT attempts FROM images WHERE id = 'bad'").fetchone()[0]
        finally:
            db.close()

    assert cli(manifest, *FAST, "--out", out, "--quiet", "--batch-size", "1") == 1
    for expected in (2, 3, 3):  # the third failure is the last one --retry-failed tries
        assert cli(manifest, *FAST, "--out", out, "--quiet", "--batch-size", "1", "--retry-failed") == 1
        assert attempts() == expected
    assert cli(manifest, *FAST, "--out", out, "--quiet", "--batch-size", "1", "--retry-failed", "--max-attempts", "5") == 1
    assert attempts() == 4
    (failed,) = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert failed["attempts"] == 4


def test_out_of_memory_retry_runs_after_the_failed_call_is_released(tmp_path, monkeypatch):
    """The halves run only once the failed call's frames (and so its tensors) are gone."""
    import gc
    import weakref

    import torch

    import batch.execute as execute

    real, held, alive_at_retry = execute.generate_batch, [], []

    class Activations:  # stands for the tensors a failed UNet call leaves in its frames
        pass

    def small_gpu(family, conditioner, batch, steps=None):  # fault-injection seam: tests only
        gc.disable()  # only references may free it, as with tensors on a GPU
        try:
            alive_at_retry.append(sum(ref() is not None for ref in held))
        finally:
            gc.enable()
        activations = Activations()  # noqa: F841  (kept alive by this frame while an exception holds it)
        held.append(weakref.ref(activations))
        if len(batch.tasks) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(family, conditioner, batch, steps)

    monkeypatch.setattr(execute, "generate_batch", small_gpu)
    rows = [{"id": f"r{i}", "prompt": "x", "seed": i} for i in range(4)]
    assert cli(write_jsonl(tmp_path / "m.jsonl", rows), *FAST, "--out", tmp_path / "out", "--quiet",
               "--batch-size", "4") == 0
    assert alive_at_retry[:3] == [0, 0, 0], f"failed calls still alive when the retry started: {alive_at_retry}"
