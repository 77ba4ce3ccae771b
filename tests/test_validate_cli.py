"""`validate` and the CLI's handling of bad manifests: plan output, exit codes, no traceback, no images."""
from __future__ import annotations

import json
import os
import shutil
import re
from pathlib import Path

import pytest

from conftest import FAST, REPO, cli, write_jsonl


def table_rows(text: str) -> list[list[str]]:
    """The body rows of a rich table printed to a non-terminal (box drawn with │ or |)."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│|]", line)[1:-1]]
        if cells and cells[0].isdigit():
            rows.append(cells)
    return rows


@pytest.fixture
def good_manifest(images_dir: Path) -> Path:
    return write_jsonl(images_dir / "good.jsonl", [
        {"id": "t1", "prompt": "a red fox", "num_images": 3},
        {"id": "t2", "prompt": "a castle", "width": 128},
        {"id": "i1", "prompt": "a painting", "init_image": "init.png", "strength": 0.7},
        {"id": "t3", "prompt": "a boat", "label": "water"},
        {"id": "p1", "prompt_image": "prompt.png", "image_prompt_method": "clip_embed"},
    ])


@pytest.fixture
def bad_manifest(images_dir: Path) -> Path:
    (images_dir / "garbage.png").write_bytes(b"\x00not an image at all" * 20)
    return write_jsonl(images_dir / "bad.jsonl", [
        {"id": "ok", "prompt": "fine"},                                    # 1
        {"id": "s", "prompt": "x", "steps": "many"},                       # 2
        {"id": "w", "prompt": "x", "width": 100},                          # 3
        {"id": "i", "prompt": "x", "init_image": "missing.png"},           # 4
        {"id": "g", "prompt": "x", "init_image": "garbage.png"},           # 5
        {"id": "n"},                                                       # 6
        {"id": "ok", "prompt": "again"},                                   # 7
        {"id": "c", "prompt": "x", "scheduler": "eular"},                  # 8
        {"id": "m", "prompt": "x", "stpes": 3},                            # 9
        {"id": "q", "prompt": "x", "init_image": "init.png", "strength": 2},  # 10
    ])


BAD_LINES = [2, 3, 4, 5, 6, 7, 8, 9, 10]


def test_validate_good_manifest_prints_plan(good_manifest, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")  # rich would wrap cells on a narrow console
    assert cli("validate", good_manifest, *FAST, "--batch-size", "2") == 0

    out = capsys.readouterr().out
    rows = table_rows(out)
    # group, model, mode, size, lora, batches, images
    assert [(r[2], r[3], r[5], r[6]) for r in rows] == [
        ("txt2img", "64x64", "2", "4"),
        ("txt2img", "128x64", "1", "1"),
        ("img2img", "64x64", "1", "1"),
        ("image_prompt", "64x64", "1", "1"),
    ]
    assert [r[0] for r in rows] == ["1", "2", "3", "4"]
    assert all(r[1] == "tiny" for r in rows)
    assert "5 jobs, 7 images, 5 batches" in out
    assert "valid" in out


def test_validate_json(good_manifest, capsys):
    assert cli("validate", good_manifest, *FAST, "--batch-size", "2", "--json") == 0

    report = json.loads(capsys.readouterr().out)

    assert report["valid"] is True
    assert (report["jobs"], report["images"], report["batches"], report["invalid_rows"]) == (5, 7, 5, 0)
    assert [(g["mode"], g["width"], g["height"], g["batches"], g["images"]) for g in report["groups"]] == [
        ("txt2img", 64, 64, 2, 4), ("txt2img", 128, 64, 1, 1), ("img2img", 64, 64, 1, 1), ("image_prompt", 64, 64, 1, 1),
    ]
    assert sum(g["images"] for g in report["groups"]) == report["images"]


def test_validate_limit_and_default_batch_size(good_manifest, capsys):
    assert cli("validate", good_manifest, *FAST, "--limit", "2", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["jobs"], report["images"], report["batches"]) == (2, 4, 2)  # CPU default batch size: 4


def test_validate_finds_the_model_but_loads_none(good_manifest, tmp_path, capsys):
    # The tiny model's configs without its weights: found, and never loaded (a load would fail).
    shell = tmp_path / "model shell"
    for config in (REPO / "models" / "tiny").rglob("*.json"):
        target = shell / config.relative_to(REPO / "models" / "tiny")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(config, target)
    assert cli("validate", good_manifest, "--model", shell, "--json") == 0
    assert json.loads(capsys.readouterr().out)["groups"][0]["model"] == str(shell)
    # A model that exists nowhere is invalid before anything loads, as in `run`.
    assert cli("validate", good_manifest, "--model", "/nowhere/no-such-model", "--json") == 2
    assert "/nowhere/no-such-model" in capsys.readouterr().err


def _assert_all_errors_listed(err: str) -> None:
    assert "Traceback" not in err
    assert "9 errors" in err
    listed = [int(n) for n in re.findall(r"^\s*line (\d+)", err, flags=re.MULTILINE)]
    assert listed == BAD_LINES
    assert "did you mean 'steps'" in err and "did you mean 'euler'" in err
    assert "first used on line 1" in err


def test_validate_bad_manifest_exits_2_listing_every_error(bad_manifest, capsys):
    assert cli("validate", bad_manifest, *FAST) == 2

    captured = capsys.readouterr()
    _assert_all_errors_listed(captured.err)
    assert "Traceback" not in captured.out
    assert "valid" not in captured.out


def test_run_bad_manifest_exits_2_and_writes_nothing(bad_manifest, tmp_path, capsys):
    out = tmp_path / "out"

    assert cli("run", bad_manifest, *FAST, "--out", out) == 2

    captured = capsys.readouterr()
    _assert_all_errors_listed(captured.err)
    assert "Traceback" not in captured.out
    assert not list(out.rglob("*.png"))  # nothing generated (today the folder is not even made)


def test_bare_manifest_form_is_run(bad_manifest, tmp_path, capsys):
    assert cli("run", bad_manifest, *FAST, "--out", tmp_path / "a") == 2
    as_run = capsys.readouterr()
    assert cli(bad_manifest, *FAST, "--out", tmp_path / "b") == 2
    bare = capsys.readouterr()

    assert bare.err == as_run.err
    assert bare.out == as_run.out
    assert not list((tmp_path / "b").rglob("*.png"))


def test_bare_manifest_form_takes_run_options(good_manifest, capsys):
    assert cli(good_manifest, "--help") == 0
    help_text = capsys.readouterr().out
    assert "--out" in help_text and "--retry-failed" in help_text  # run's options, not validate's
    assert cli(good_manifest, "--json") == 2  # a validate-only option is a usage error for run
    assert "unrecognized arguments" in capsys.readouterr().err


def test_skip_invalid_validate_counts_invalid_rows(bad_manifest, capsys):
    # A misspelt column still stops validation, even with --skip-invalid.
    assert cli("validate", bad_manifest, *FAST, "--skip-invalid") == 2
    assert "stpes" in capsys.readouterr().err

    rows = [json.loads(line) for line in bad_manifest.read_text().splitlines()]
    fixed = write_jsonl(bad_manifest.with_name("skip.jsonl"), [r for r in rows if "stpes" not in r])
    assert cli("validate", fixed, *FAST, "--skip-invalid", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["jobs"], report["invalid_rows"]) == (1, 8)


def test_missing_manifest_exits_2(tmp_path, capsys):
    assert cli("validate", tmp_path / "nope.csv") == 2
    err = capsys.readouterr().err
    assert "not found" in err and "Traceback" not in err


def test_help_shows_examples(capsys):
    assert cli("--help") == 0
    out = capsys.readouterr().out
    assert "examples" in out and "validate" in out and "exit codes" in out
    assert cli("run", "--help") == 0
    assert "examples" in capsys.readouterr().out


def test_no_command_is_a_usage_error(capsys):
    assert cli() == 2
    assert "usage" in capsys.readouterr().out.lower()


def test_validate_piped_to_a_file_truncates_nothing(tmp_path):
    """`validate --estimate-vram > plan.txt`: no 80-column cut (`sd1…`, `txt…`)."""
    import subprocess
    import sys

    from conftest import REPO

    long_model = tmp_path / ("a-very-long-folder-name-for-a-model-" * 3)
    shutil.copytree(REPO / "models" / "tiny", long_model)
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "a", "prompt": "x", "model": str(long_model)},
        {"id": "b", "prompt": "y", "init_image": None, "model": "sd15-random"},
    ])
    with open(tmp_path / "plan.txt", "w") as plan:
        done = subprocess.run([sys.executable, str(REPO / "run_batch.py"), "validate", str(manifest), "--estimate-vram",
                               "--device", "cpu"], stdout=plan, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "COLUMNS": "80"})
    text = (tmp_path / "plan.txt").read_text()
    assert done.returncode == 0, done.stderr
    assert "…" not in text, text
    assert "sd15-random" in text and "txt2img" in text and str(long_model) in text and "VRAM est. GB" in text
