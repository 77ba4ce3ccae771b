"""failed.jsonl runs as a manifest from anywhere, and its notes do not become labels."""
from __future__ import annotations

import json

from conftest import FAST, cli, read_metadata, write_jsonl


def test_failed_jsonl_runs_as_is_from_another_folder(tmp_path, images_dir, monkeypatch):
    import batch.execute as execute

    real = execute.generate_batch

    def flaky(family, conditioner, batch, steps=None):  # fault-injection seam: tests only
        if any(t.job.id == "i" for t in batch.tasks):
            raise RuntimeError("a passing fault")
        return real(family, conditioner, batch, steps)

    manifest = write_jsonl(images_dir / "m.jsonl", [
        {"id": "i", "prompt": "p", "init_image": "init.png", "strength": 0.5, "seed": 1, "label": "kept"},
        {"id": "t", "prompt": "q", "seed": 2}])
    out = tmp_path / "first"
    monkeypatch.setattr(execute, "generate_batch", flaky)
    assert cli(manifest, *FAST, "--out", out, "--quiet", "--batch-size", "1") == 1
    monkeypatch.setattr(execute, "generate_batch", real)
    (failed,) = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert failed["init_image"] == str(images_dir / "init.png") and "a passing fault" in failed["error"]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = tmp_path / "again"
    assert cli(out / "failed.jsonl", *FAST, "--out", again, "--quiet") == 0
    (meta,) = read_metadata(again)
    assert meta["id"] == "i" and meta["label"] == "kept" and meta["seed"] == 1
    assert "error" not in meta and "attempts" not in meta


def test_invalid_rows_keep_absolute_paths_in_failed_jsonl(tmp_path, images_dir):
    manifest = write_jsonl(images_dir / "m.jsonl", [
        {"id": "bad", "prompt": "p", "init_image": "init.png", "strength": 7},
        {"id": "ok", "prompt": "q"}])
    out = tmp_path / "out"
    assert cli(manifest, *FAST, "--out", out, "--quiet", "--skip-invalid") == 1
    (failed,) = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert failed["init_image"] == str(images_dir / "init.png") and "strength" in failed["error"]
