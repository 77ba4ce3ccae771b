"""Bugs a review found, each kept as the minimal run that showed it."""
from __future__ import annotations

import json

import numpy as np
from conftest import FAST, cli, make_image, pixels, read_metadata, write_jsonl


def _status(out, capsys) -> dict:
    capsys.readouterr()
    assert cli("status", out, "--json") == 0
    return json.loads(capsys.readouterr().out)


def test_scheduler_options_do_not_leak_into_the_next_batch(tmp_path):
    before = write_jsonl(tmp_path / "ab.jsonl", [{"id": "a", "prompt": "x", "seed": 1},  # dpmpp_2m_karras
                                                 {"id": "b", "prompt": "y", "seed": 2, "scheduler": "euler"}])
    alone = write_jsonl(tmp_path / "b.jsonl", [{"id": "b", "prompt": "y", "seed": 2, "scheduler": "euler"}])
    assert cli(before, *FAST, "--out", tmp_path / "ab", "--quiet") == 0
    assert cli(alone, *FAST, "--out", tmp_path / "b", "--quiet") == 0
    assert np.abs(pixels(tmp_path / "ab/images/b.png") - pixels(tmp_path / "b/images/b.png")).max() <= 2


def test_skip_invalid_duplicate_never_overwrites_the_valid_row(tmp_path, capsys):
    manifest = write_jsonl(tmp_path / "dup.jsonl", [
        {"id": "a", "prompt": "x", "seed": 5}, {"id": "a", "prompt": "y", "seed": 6}, {"id": "c", "prompt": "z"}])
    out = tmp_path / "out"
    for _ in range(2):  # the second run is the same command
        assert cli(manifest, *FAST, "--out", out, "--quiet", "--skip-invalid") == 1
        assert [m["prompt"] for m in read_metadata(out)] == ["x", "z"]
        (failed,) = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
        assert failed["prompt"] == "y" and "duplicate id" in failed["error"]
        assert _status(out, capsys) == {"total": 3, "done": 2, "failed": 1, "pending": 0}


def test_rows_removed_from_the_manifest_leave_the_counts_and_metadata(tmp_path, capsys):
    out = tmp_path / "out"
    first = write_jsonl(tmp_path / "v1.jsonl", [{"id": "a", "prompt": "x", "seed": 6, "num_images": 2},
                                                 {"id": "gone", "prompt": "w"}])
    assert cli(first, *FAST, "--out", out, "--quiet") == 0
    second = write_jsonl(tmp_path / "v2.jsonl", [{"id": "a", "prompt": "x", "seed": 6},
                                                  {"id": "a-1", "prompt": "y", "seed": 9}])
    assert cli(second, *FAST, "--out", out, "--quiet") == 0
    meta = read_metadata(out)
    assert [(m["file_name"], m["prompt"]) for m in meta] == [("a.png", "x"), ("a-1.png", "y")]
    assert _status(out, capsys) == {"total": 2, "done": 2, "failed": 0, "pending": 0}
    assert json.loads((out / "report.json").read_text())["totals"]["images"] == 2


def test_an_edited_init_image_is_made_again_on_the_same_command(tmp_path):
    make_image(tmp_path / "init.png", (200, 30, 30))
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "i", "prompt": "p", "init_image": "init.png", "seed": 1}])
    out = tmp_path / "out"
    assert cli(manifest, *FAST, "--out", out, "--quiet") == 0
    before = pixels(out / "images/i.png")
    make_image(tmp_path / "init.png", (20, 30, 230))
    assert cli(manifest, *FAST, "--out", out, "--quiet") == 0
    assert json.loads((out / "report.json").read_text())["totals"]["generated"] == 1
    assert np.abs(pixels(out / "images/i.png") - before).max() > 10


def test_a_model_that_fails_to_load_fails_only_its_rows(tmp_path, monkeypatch):
    import batch.execute as execute
    from batch.errors import ModelError

    real = execute.load_family

    def broken_second_model(model, options):
        if model != "tiny":
            raise ModelError(f"cannot load model '{model}': weights are corrupt")
        return real(model, options)

    monkeypatch.setattr(execute, "load_family", broken_second_model)
    other = tmp_path / "other"
    (other).mkdir()
    (other / "model_index.json").write_text("{}")
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "t1", "prompt": "x"}, {"id": "t2", "prompt": "y", "model": "other"}])
    out = tmp_path / "out"
    assert cli(manifest, *FAST, "--out", out, "--quiet") == 1
    assert [m["id"] for m in read_metadata(out)] == ["t1"]
    (failed,) = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert failed["id"] == "t2" and "weights are corrupt" in failed["error"]
    assert (out / "report.html").exists()


def test_limit_leaves_invalid_rows_beyond_it_alone(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"},
                                                   {"id": "bad", "prompt": "z", "steps": 0}])
    out = tmp_path / "out"
    assert cli(manifest, *FAST, "--out", out, "--quiet", "--skip-invalid", "--limit", "2") == 0
    assert not (out / "failed.jsonl").exists() or not (out / "failed.jsonl").read_text().strip()
    assert cli(manifest, *FAST, "--out", out, "--quiet", "--skip-invalid") == 1  # without the limit it counts
