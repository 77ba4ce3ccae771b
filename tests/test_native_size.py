"""A row without width or height gets its model's own size (tiny: 128), as diffusers' pipelines default;
an explicit size, run-level or per row, always wins."""
from __future__ import annotations

import json

from conftest import cli, read_metadata, write_jsonl

from batch.models import native_size


def test_native_size_reads_the_model_configs():
    assert native_size("tiny") == 128  # what it was trained at (batch/toy/train.py's TrainConfig.size)
    assert native_size("sd15-random") == 512
    assert native_size("stable-diffusion-v1-5/stable-diffusion-v1-5") == 512  # hub ids: SD 1.5's, cached or not
    assert native_size("/no/such/folder") == 512  # never raises: the run names a bad model itself


def test_tiny_runs_at_its_own_size_unless_told_otherwise(tmp_path):
    fast = ["--model", "tiny", "--device", "cpu", "--steps", "2", "--quiet"]
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "own", "prompt": "a red circle", "seed": 1},
        {"id": "row", "prompt": "a red circle", "seed": 1, "width": 64, "height": 72},
    ])
    assert cli(manifest, *fast, "--out", tmp_path / "default") == 0
    sizes = {m["id"]: (m["width"], m["height"]) for m in read_metadata(tmp_path / "default")}
    assert sizes == {"own": (128, 128), "row": (64, 72)}, sizes

    assert cli(manifest, *fast, "--width", "96", "--height", "64", "--out", tmp_path / "run-level") == 0
    sizes = {m["id"]: (m["width"], m["height"]) for m in read_metadata(tmp_path / "run-level")}
    assert sizes == {"own": (96, 64), "row": (64, 72)}, sizes


def test_each_model_row_gets_its_own_models_size(tmp_path, capsys):
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "tiny", "prompt": "a red circle"},
        {"id": "sd15", "prompt": "a red circle", "model": "sd15-random"},
    ])
    assert cli("validate", manifest, "--model", "tiny", "--device", "cpu", "--json") == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    assert {(g["model"], g["width"], g["height"]) for g in groups} == {("tiny", 128, 128), ("sd15-random", 512, 512)}
