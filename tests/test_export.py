"""`sdbatch export`: webdataset, parquet and imagefolder shards read back with their own libraries;
filters, near-duplicates, interruption and growth of the run."""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import FAST, REPO, cli, pixels, read_metadata, write_jsonl

ROWS = [
    {"id": "red", "prompt": "a red circle", "seed": 10},
    {"id": "blue", "prompt": "a blue square", "seed": 20, "label": "sky"},
    {"id": "tri.v2", "prompt": "a green triangle", "seed": 30, "num_images": 2},  # a dot in the stem
    {"id": "yellow", "prompt": "a yellow circle", "seed": 40},
    {"id": "red-sq", "prompt": "a red square", "seed": 50},
]
# Seeds far apart: image k of a row takes seed + k, and the imagefolder test finds images by seed.
MORE = [{"id": "late", "prompt": "a blue circle", "seed": 60, "num_images": 2}]


@pytest.fixture(scope="module")
def run_out(tmp_path_factory) -> Path:
    """One small run of the tiny model: 6 images, shared by every test (copy it before changing it)."""
    folder = tmp_path_factory.mktemp("run")
    manifest = write_jsonl(folder / "m.jsonl", ROWS)
    assert cli(manifest, *FAST, "--out", folder / "out", "--quiet") == 0
    assert len(read_metadata(folder / "out")) == 6
    return folder / "out"


@pytest.fixture
def out(run_out: Path, tmp_path: Path) -> Path:
    """A copy of the run this test may change."""
    return Path(shutil.copytree(run_out, tmp_path / "out"))


def rewrite_metadata(out: Path, lines: list[dict]) -> None:
    write_jsonl(out / "images" / "metadata.jsonl", lines)


def export_json(to: Path) -> dict:
    return json.loads((to / "export.json").read_text(encoding="utf-8"))


def read_tars(to: Path) -> list[dict]:
    import webdataset as wds

    shards = [str(to / s["name"]) for s in export_json(to)["shards"]]
    return list(wds.WebDataset(shards, shardshuffle=False))


def exported_names(to: Path) -> list[str]:
    return [name for names in export_json(to)["files"].values() for name in names]


# --- the three formats, read back by their own libraries --------------------------------------------------


def test_webdataset_shards_read_back(run_out: Path, tmp_path: Path):
    to = tmp_path / "wds"
    assert cli("export", run_out, "--to", to, "--format", "webdataset", "--shard-size", 4, "--quiet") == 0
    state = export_json(to)
    assert [(s["name"], s["count"]) for s in state["shards"]] == [("shard-000000.tar", 4), ("shard-000001.tar", 2)]
    for shard in state["shards"]:
        assert hashlib.sha256((to / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
    assert state["kept"] == 6 and state["source"] == str(run_out.resolve()) and state["format"] == "webdataset"
    assert state["options"] == {"shard_size": 4, "min_clip_score": None, "dedup": None}

    samples = read_tars(to)
    metadata = {m["file_name"]: m for m in read_metadata(run_out)}
    names = [json.loads(s["json"])["file_name"] for s in samples]
    assert sorted(names) == sorted(metadata), "every image exactly once"
    for sample in samples:
        meta = json.loads(sample["json"])
        assert meta == metadata[meta["file_name"]], "the .json is the image's metadata.jsonl line"
        assert "." not in sample["__key__"], sample["__key__"]
        assert sample["png"] == (run_out / "images" / meta["file_name"]).read_bytes()
        assert sample["txt"].decode("utf-8") == meta["prompt"]
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == 6 and "red" in keys and "blue" in keys


def test_parquet_loads_with_datasets(run_out: Path, tmp_path: Path):
    import datasets
    import numpy as np

    to = tmp_path / "pq"
    assert cli("export", run_out, "--to", to, "--format", "parquet", "--shard-size", 4, "--quiet") == 0
    assert [s["name"] for s in export_json(to)["shards"]] == ["train/shard-000000.parquet", "train/shard-000001.parquet"]
    data = datasets.load_dataset("parquet", data_dir=str(to), split="train")
    assert isinstance(data.features["image"], datasets.Image)
    metadata = {m["file_name"]: m for m in read_metadata(run_out)}
    assert sorted(data["file_name"]) == sorted(metadata), "every image exactly once"
    for column in ("id", "k", "prompt", "negative_prompt", "seed", "steps", "cfg", "width", "height", "scheduler",
                   "model", "family", "label"):
        assert column in data.column_names, column
    for row in data:
        meta = metadata[row["file_name"]]
        assert {k: row[k] for k in meta} == meta, "every parameter as a column"
        assert row["image"].size == (64, 64)
        assert np.array_equal(np.asarray(row["image"].convert("RGB"), dtype=np.int16),
                              pixels(run_out / "images" / row["file_name"]))


def test_imagefolder_loads_with_datasets(run_out: Path, tmp_path: Path):
    import datasets
    import numpy as np

    to = tmp_path / "imf"
    assert cli("export", run_out, "--to", to, "--format", "imagefolder", "--shard-size", 4, "--quiet") == 0
    assert sorted(os.listdir(to / "images")) == ["shard-000000", "shard-000001"]
    data = datasets.load_dataset("imagefolder", data_dir=str(to), split="train")
    assert len(data) == 6
    metadata = read_metadata(run_out)
    assert sorted(data["seed"]) == sorted(m["seed"] for m in metadata), "every image exactly once"
    by_seed = {m["seed"]: m for m in metadata}
    for row in data:
        meta = by_seed[row["seed"]]
        assert row["prompt"] == meta["prompt"] and row["label"] == meta.get("label")
        assert np.array_equal(np.asarray(row["image"].convert("RGB"), dtype=np.int16),
                              pixels(run_out / "images" / meta["file_name"]))


# --- filters -----------------------------------------------------------------------------------------------


def test_min_clip_score_drops_what_it_says(out: Path, tmp_path: Path, capsys):
    lines = read_metadata(out)
    for i, line in enumerate(lines):
        line["clip_score"] = 10.0 + 5 * i  # 10, 15, ... 35
    lines[-1].pop("clip_score")
    rewrite_metadata(out, lines)
    to = tmp_path / "scored"
    assert cli("export", out, "--to", to, "--format", "webdataset", "--min-clip-score", 22, "--quiet") == 2
    err = capsys.readouterr().err
    assert "clip_score" in err and f"sdbatch score {out}" in err, err
    assert not (to / "export.json").exists()

    lines[-1]["clip_score"] = 35.0
    rewrite_metadata(out, lines)
    assert cli("export", out, "--to", to, "--format", "webdataset", "--min-clip-score", 22, "--quiet") == 0
    kept = sorted(m["file_name"] for m in lines if m["clip_score"] >= 22)
    assert sorted(json.loads(s["json"])["file_name"] for s in read_tars(to)) == kept
    state = export_json(to)
    assert state["dropped"] == {"clip_score": 6 - len(kept)}
    assert sorted(state["dropped_files"]["clip_score"]) == sorted(m["file_name"] for m in lines if m["clip_score"] < 22)


def test_dedup_drops_a_planted_copy(out: Path, tmp_path: Path, monkeypatch):
    import imagehash
    from PIL import Image

    import batch.export as export

    lines = read_metadata(out)
    hashes = [imagehash.phash(Image.open(out / "images" / m["file_name"])) for m in lines]
    closest = min(a - b for a, b in itertools.combinations(hashes, 2))
    assert closest > 4, f"the run's own images are {closest} bits apart: the test needs them farther than --dedup 4"
    shutil.copyfile(out / "images" / lines[2]["file_name"], out / "images" / "copy.png")
    rewrite_metadata(out, lines + [{**lines[2], "file_name": "copy.png", "id": "copy"}])

    to = tmp_path / "dedup"
    assert cli("export", out, "--to", to, "--format", "parquet", "--dedup", 4, "--quiet") == 0
    state = export_json(to)
    assert state["kept"] == 6 and state["dropped"] == {"duplicate": 1}
    assert state["dropped_files"]["duplicate"] == [{"file_name": "copy.png", "of": lines[2]["file_name"]}]
    assert "copy.png" not in exported_names(to)

    calls = []
    original = export._phash
    monkeypatch.setattr(export, "_phash", lambda path: calls.append(path) or original(path))
    assert cli("export", out, "--to", to, "--format", "parquet", "--dedup", 4, "--fresh", "--quiet") == 0
    assert calls == [], "hashes come from the cache on a re-export"
    assert export_json(to)["kept"] == 6


def test_near_duplicate_index_matches_brute_force():
    from batch.export import NearDuplicateIndex

    rng = random.Random(0)
    base = [rng.getrandbits(64) for _ in range(40)]
    values = base + [b ^ (1 << rng.randrange(64)) ^ (1 << rng.randrange(64)) for b in base[:20]]  # 0-2 bits off
    for distance in (0, 2, 5, 12):
        index, brute = NearDuplicateIndex(distance), []
        for i, value in enumerate(values):
            expected = next((j for j in brute if (value ^ values[j]).bit_count() <= distance), None)
            found = index.find(value)
            assert found == (None if expected is None else str(expected)), (distance, i)
            if found is None:
                index.add(value, str(i))
                brute.append(i)


def test_sample_keys_have_no_dots_and_stay_unique():
    from batch.export import sample_key

    assert sample_key("red.png") == "red"
    keys = {sample_key(name) for name in ("a.b.png", "a_b.png", "a b.png", "tri.v2-0.png")}
    assert len(keys) == 4 and not any("." in key for key in keys)


# --- interruption, growth, changed options ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["webdataset", "parquet", "imagefolder"])
def test_interrupt_mid_shard_leaves_complete_shards(run_out: Path, tmp_path: Path, monkeypatch, fmt):
    import batch.export as export

    to = tmp_path / fmt
    calls, original = [], export.read_bytes

    def interrupted(image):
        calls.append(image.file_name)
        if len(calls) == 6:  # the second image of the second shard
            raise KeyboardInterrupt
        return original(image)

    monkeypatch.setattr(export, "read_bytes", interrupted)
    assert cli("export", run_out, "--to", to, "--format", fmt, "--shard-size", 4, "--quiet") == 130
    state = export_json(to)
    assert [s["count"] for s in state["shards"]] == [4]
    listing = sorted(str(p.relative_to(to)) for p in to.rglob("*") if not p.name.startswith(".sdbatch"))
    first = {"webdataset": ["shard-000000.tar"], "parquet": ["train", "train/shard-000000.parquet"],
             "imagefolder": ["images", "images/shard-000000", "metadata.jsonl"]}[fmt]
    assert [p for p in listing if "shard-000000/" not in p] == sorted(["export.json", *first]), listing
    if fmt == "imagefolder":
        assert len((to / "metadata.jsonl").read_text().splitlines()) == 4

    monkeypatch.setattr(export, "read_bytes", original)
    assert cli("export", run_out, "--to", to, "--format", fmt, "--shard-size", 4, "--quiet") == 0
    assert [s["count"] for s in export_json(to)["shards"]] == [4, 2]
    assert sorted(exported_names(to)) == sorted(m["file_name"] for m in read_metadata(run_out))
    if fmt == "imagefolder":
        import datasets

        assert len(datasets.load_dataset("imagefolder", data_dir=str(to), split="train")) == 6


def test_killed_export_is_completed_by_the_next(run_out: Path, tmp_path: Path):
    """SIGKILL mid-shard (no cleanup runs): a temp file is left; the next export removes it and finishes."""
    import datasets

    to = tmp_path / "pq"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        import batch.export as export
        from batch.cli import run_cli
        calls, original = [], export.read_bytes
        def killed(image):
            calls.append(1)
            if len(calls) == 6:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(image)
        export.read_bytes = killed
        run_cli(["export", {str(run_out)!r}, "--to", {str(to)!r}, "--format", "parquet", "--shard-size", "4",
                 "--quiet"])
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert [s["count"] for s in export_json(to)["shards"]] == [4]
    assert [p.name for p in (to / "train").iterdir() if ".tmp-" in p.name], "the half-written shard is a temp file"
    (to / "train" / "shard-000001.parquet").write_bytes(b"renamed, never recorded")  # a kill just after the rename

    assert cli("export", run_out, "--to", to, "--format", "parquet", "--shard-size", 4, "--quiet") == 0
    assert sorted(p.name for p in (to / "train").iterdir()) == ["shard-000000.parquet", "shard-000001.parquet"]
    data = datasets.load_dataset("parquet", data_dir=str(to), split="train")
    assert sorted(data["file_name"]) == sorted(m["file_name"] for m in read_metadata(run_out))


def test_reexport_after_the_run_grows_adds_only_new_shards(out: Path, tmp_path: Path):
    to = tmp_path / "wds"
    assert cli("export", out, "--to", to, "--format", "webdataset", "--shard-size", 4, "--quiet") == 0
    before = {s["name"]: s["sha256"] for s in export_json(to)["shards"]}
    assert cli("export", out, "--to", to, "--format", "webdataset", "--shard-size", 4, "--quiet") == 0
    assert len(export_json(to)["shards"]) == 2, "nothing new: no shard added"

    manifest = write_jsonl(tmp_path / "grown.jsonl", ROWS + MORE)
    assert cli(manifest, *FAST, "--out", out, "--quiet") == 0
    assert len(read_metadata(out)) == 8
    assert cli("export", out, "--to", to, "--format", "webdataset", "--shard-size", 4, "--quiet") == 0
    state = export_json(to)
    assert [(s["name"], s["count"]) for s in state["shards"]] == [
        ("shard-000000.tar", 4), ("shard-000001.tar", 2), ("shard-000002.tar", 2)]
    assert {s["name"]: s["sha256"] for s in state["shards"][:2]} == before, "earlier shards untouched"
    assert sorted(state["files"]["shard-000002.tar"]) == ["late-0.png", "late-1.png"]
    assert state["kept"] == 8 and [e["added"] for e in state["exports"]] == [6, 0, 2]
    names = [json.loads(s["json"])["file_name"] for s in read_tars(to)]
    assert sorted(names) == sorted(m["file_name"] for m in read_metadata(out)), "every image exactly once"


def test_changed_options_need_fresh(run_out: Path, tmp_path: Path, capsys):
    to = tmp_path / "wds"
    assert cli("export", run_out, "--to", to, "--format", "webdataset", "--shard-size", 4, "--quiet") == 0
    capsys.readouterr()
    assert cli("export", run_out, "--to", to, "--format", "parquet", "--shard-size", 4, "--quiet") == 2
    assert cli("export", run_out, "--to", to, "--format", "webdataset", "--shard-size", 3, "--quiet") == 2
    err = capsys.readouterr().err
    assert "--fresh" in err and "shard_size 4 -> 3" in err, err
    assert cli("export", run_out, "--to", to, "--format", "parquet", "--shard-size", 3, "--fresh", "--quiet") == 0
    assert sorted(p.name for p in to.iterdir() if p.name != ".sdbatch.lock") == ["export.json", "train"], \
        "the webdataset shards are gone"
    assert [s["count"] for s in export_json(to)["shards"]] == [3, 3]


def test_bad_input_exits_2(tmp_path: Path, run_out: Path, capsys):
    assert cli("export", tmp_path, "--to", tmp_path / "x", "--format", "parquet") == 2
    assert "sdbatch output folder" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert cli("export", run_out, "--to", tmp_path / "busy", "--format", "parquet") == 2
    assert "notes.txt" in capsys.readouterr().err
    assert cli("export", run_out, "--to", tmp_path / "y", "--format", "parquet", "--dedup", 65) == 2
    assert cli("export", run_out, "--to", run_out, "--format", "parquet") == 2

    from batch.lock import FolderLock

    (tmp_path / "taken").mkdir()
    with FolderLock(tmp_path / "taken"):  # another export writing there
        capsys.readouterr()
        assert cli("export", run_out, "--to", tmp_path / "taken", "--format", "parquet") == 2
        assert "in use by another sdbatch export" in capsys.readouterr().err


# --- the Hub -------------------------------------------------------------------------------------------------


def test_push_to_hub_offline_is_a_clear_error(run_out: Path, tmp_path: Path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    to = tmp_path / "hub"
    assert cli("export", run_out, "--to", to, "--format", "parquet", "--push-to-hub", "me/night1") == 2
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE" in err and "hf upload" in err, err
    assert not to.exists(), "nothing exported before the push is known to be impossible"


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") == "1" or not os.environ.get("SDBATCH_TEST_HUB_REPO"),
                    reason="needs the Hub: set SDBATCH_TEST_HUB_REPO (a dataset repo you may write) and a token")
def test_push_to_hub(run_out: Path, tmp_path: Path):
    from huggingface_hub import HfApi

    repo = os.environ["SDBATCH_TEST_HUB_REPO"]
    assert cli("export", run_out, "--to", tmp_path / "hub", "--format", "parquet", "--push-to-hub", repo) == 0
    files = HfApi().list_repo_files(repo, repo_type="dataset")
    assert "export.json" in files and "train/shard-000000.parquet" in files and "README.md" in files
    assert not any(name.startswith(".") for name in files)
