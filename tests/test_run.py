"""End to end on the tiny model: the output folder, metadata, report, checkpoint semantics."""
from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from conftest import FAST, REPO, cli, pixels, read_metadata, write_jsonl

REPORT_KEYS = {
    "run": {"model", "device", "gpu_name", "dtype", "torch", "diffusers", "batch_size", "compile", "started_at"},
    "totals": {"jobs", "images", "done", "failed", "skipped_from_checkpoint", "wall_s", "generate_s",
               "images_per_s", "peak_vram_bytes", "peak_rss_bytes"},
    "group": {"model", "mode", "width", "height", "lora", "images", "batches", "load_s", "warmup_s", "wall_s",
              "images_per_s", "s_per_image_p50", "s_per_image_p95", "peak_vram_bytes"},
}


def test_demo_manifest_runs_every_mode(tmp_path):
    out = tmp_path / "demo"
    assert cli(REPO / "manifests" / "demo.jsonl", "--model", "tiny", "--device", "cpu", "--out", out, "--quiet") == 0
    meta = read_metadata(out)
    names = [m["file_name"] for m in meta]
    assert len(names) == len(set(names)) == 7
    assert {m["mode"] for m in meta} == {"txt2img", "img2img", "image_prompt"}
    assert sorted(p.name for p in (out / "images").glob("*.png")) == sorted(names)
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS["run"] <= report["run"].keys()
    assert REPORT_KEYS["totals"] <= report["totals"].keys()
    for group in report["groups"]:
        assert REPORT_KEYS["group"] <= group.keys()
        assert group["images_per_s"] > 0 and group["s_per_image_p50"] > 0
    totals = report["totals"]
    assert totals["done"] == totals["images"] == 7 and totals["failed"] == 0
    for key in ("wall_s", "generate_s", "images_per_s", "peak_rss_bytes"):
        assert isinstance(totals[key], (int, float)) and totals[key] > 0
    assert totals["peak_vram_bytes"] is None  # CPU: no CUDA allocator
    for name in ("run.json", "run.log", "report.csv", "report.md", "checkpoint.sqlite"):
        assert (out / name).exists(), name
    csv_lines = (out / "report.csv").read_text().splitlines()
    assert csv_lines[0] == "id,k,group,batch,seconds,status" and len(csv_lines) == 8


def test_png_carries_a1111_parameters_and_metadata_carries_labels(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "a", "prompt": "line one\nline two \x07 bell", "negative_prompt": "ugly", "seed": 42, "label": "cat",
         "score": 0.5}])
    out = tmp_path / "out"
    assert cli(manifest, *FAST, "--out", out, "--quiet") == 0
    from PIL import Image

    with Image.open(out / "images" / "a.png") as image:
        text = image.text["parameters"]
    lines = text.split("\n")
    assert lines[0:2] == ["line one", "line two   bell"]  # control characters cannot break readers
    assert lines[2] == "Negative prompt: ugly"
    assert lines[3] == "Steps: 3, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 64x64, Model: tiny"
    (meta,) = read_metadata(out)
    assert meta["prompt"] == "line one\nline two \x07 bell" and meta["label"] == "cat" and meta["score"] == 0.5
    assert meta["file_name"] == "a.png" and meta["seed"] == 42


def test_rerun_skips_done_and_regenerates_changed_rows(tmp_path):
    rows = [{"id": f"r{i}", "prompt": f"prompt {i}", "seed": i} for i in range(4)]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out"
    assert cli(manifest, *FAST, "--out", out, "--quiet") == 0
    before = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    rows[1]["prompt"] = "something else entirely"
    write_jsonl(manifest, rows)
    assert cli(manifest, *FAST, "--out", out, "--quiet") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["skipped_from_checkpoint"] == 3 and report["totals"]["generated"] == 1
    after = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    assert [n for n in after if after[n] != before[n]] == ["r1.png"]
    assert [m["prompt"] for m in read_metadata(out)] == ["prompt 0", "something else entirely", "prompt 2", "prompt 3"]
    assert cli(manifest, *FAST, "--out", out, "--quiet", "--fresh") == 0
    assert json.loads((out / "report.json").read_text())["totals"]["generated"] == 4


def test_missing_file_is_regenerated(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}])
    out = tmp_path / "out"
    assert cli(manifest, *FAST, "--out", out, "--quiet") == 0
    original = pixels(out / "images" / "b.png")
    (out / "images" / "b.png").unlink()
    assert cli(manifest, *FAST, "--out", out, "--quiet") == 0
    assert np.abs(pixels(out / "images" / "b.png") - original).max() <= 2
    assert len(read_metadata(out)) == 2
    # Same manifest, same settings: the finished row was not even read again, the other was remade.
    assert "1 finished rows not read again" in (out / "run.log").read_text()
    totals = json.loads((out / "report.json").read_text())["totals"]
    assert (totals["skipped_from_checkpoint"], totals["generated"], totals["jobs"]) == (1, 1, 2)


def test_failed_job_is_recorded_and_retried(tmp_path, monkeypatch):
    import batch.execute as execute

    real = execute.generate_batch

    def flaky(family, conditioner, batch, steps=None):
        if any(t.job.id == "bad" for t in batch.tasks):
            raise RuntimeError("injected failure")
        return real(family, conditioner, batch, steps)

    monkeypatch.setattr(execute, "generate_batch", flaky)
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "a", "prompt": "x"}, {"id": "bad", "prompt": "y", "label": "keep"}, {"id": "c", "prompt": "z"}])
    out = tmp_path / "out"
    assert cli(manifest, *FAST, "--out", out, "--quiet", "--batch-size", "4") == 1
    assert sorted(p.name for p in (out / "images").glob("*.png")) == ["a.png", "c.png"]  # the batch was split
    (failed,) = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert failed["id"] == "bad" and failed["label"] == "keep" and "injected failure" in failed["error"]
    assert json.loads((out / "report.json").read_text())["totals"]["failed"] == 1
    # Without --retry-failed the failure stands; with it, the job runs again.
    monkeypatch.setattr(execute, "generate_batch", real)
    assert cli(manifest, *FAST, "--out", out, "--quiet") == 1
    assert cli(manifest, *FAST, "--out", out, "--quiet", "--retry-failed") == 0
    assert (out / "images" / "bad.png").exists() and len(read_metadata(out)) == 3
    db = sqlite3.connect(out / "checkpoint.sqlite")
    assert db.execute("SELECT attempts, status FROM images WHERE id = 'bad'").fetchone() == (2, "done")


def test_failed_jsonl_runs_as_a_manifest(tmp_path, monkeypatch):
    import batch.execute as execute

    real = execute.generate_batch
    monkeypatch.setattr(execute, "generate_batch", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": "x"}])
    out = tmp_path / "out"
    assert cli(manifest, *FAST, "--out", out, "--quiet") == 1
    monkeypatch.setattr(execute, "generate_batch", real)
    assert cli(out / "failed.jsonl", *FAST, "--out", tmp_path / "again", "--quiet") == 0
    assert (tmp_path / "again" / "images" / "a.png").exists()


def test_skip_invalid_runs_the_valid_rows(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "ok", "prompt": "x"}, {"id": "bad", "prompt": "y", "steps": 0}])
    out = tmp_path / "out"
    assert cli(manifest, *FAST, "--out", out, "--quiet") == 2
    assert not (out / "images").exists()
    assert cli(manifest, *FAST, "--out", out, "--quiet", "--skip-invalid") == 1
    assert (out / "images" / "ok.png").exists()
    (failed,) = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert failed["id"] == "bad" and "steps" in failed["error"]


def test_limit_and_formats(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": f"r{i}", "prompt": "x"} for i in range(3)])
    out = tmp_path / "out"
    assert cli(manifest, *FAST, "--out", out, "--quiet", "--limit", "2", "--format", "webp") == 0
    assert sorted(p.name for p in (out / "images").iterdir() if p.suffix == ".webp") == ["r0.webp", "r1.webp"]
    from PIL import Image

    with Image.open(out / "images" / "r0.webp") as image:
        comment = image.getexif().get_ifd(0x8769)[0x9286]
    assert comment.startswith(b"UNICODE\0") and "Steps: 3" in comment[8:].decode("utf-16-be")


def test_user_errors_exit_2_without_traceback(tmp_path, capsys):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": "x"}])
    assert cli(manifest, "--model", tmp_path / "nowhere", "--out", tmp_path / "o") == 2
    assert cli(manifest, "--model", "tiny", "--device", "cuda:0", "--out", tmp_path / "o") in (0, 2)
    assert cli("status", tmp_path / "nothing-here") == 2
    assert cli("run", tmp_path / "missing.jsonl") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err
    assert not (tmp_path / "o" / "images").exists()


def test_excel_style_csv_runs_and_keeps_text_unchanged(tmp_path):
    prompt = "a cat, in a hat\nsecond line: Ünïcode 日本 — “quoted”"
    body = ('id,prompt,label,steps\r\n'
            'c1,"a cat, in a hat\nsecond line: Ünïcode 日本 — “quoted”","tabby, orange",3\r\n'
            'c2,plain prompt,ginger,3\r\n')
    manifest = tmp_path / "excel.csv"
    manifest.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    out = tmp_path / "out"
    assert cli(manifest, *FAST, "--out", out, "--quiet") == 0
    first, second = read_metadata(out)
    assert first["prompt"] == prompt and first["label"] == "tabby, orange" and first["id"] == "c1"
    assert second["prompt"] == "plain prompt" and second["label"] == "ginger"
    from PIL import Image

    with Image.open(out / "images" / "c1.png") as image:
        assert image.text["parameters"].startswith("a cat, in a hat\nsecond line: Ünïcode 日本")


def test_images_folder_loads_with_datasets_imagefolder(tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets is optional; install it to run this check")
    out = tmp_path / "demo"
    assert cli(REPO / "manifests" / "demo.jsonl", "--model", "tiny", "--device", "cpu", "--out", out, "--quiet",
               "--steps", "2") == 0
    ds = datasets.load_dataset("imagefolder", data_dir=str(out / "images"), split="train")
    assert ds.num_rows == 7 and {"image", "prompt", "seed", "label"} <= set(ds.column_names)
    assert sorted(ds["id"]) == sorted(m["id"] for m in read_metadata(out))
