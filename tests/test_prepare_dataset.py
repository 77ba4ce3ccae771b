"""prepare-dataset: a messy folder (duplicates, a corrupt file, a rotated phone JPEG) and an sdbatch output in,
a deterministic training folder out; reruns add only what is new."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, cli, pixels, read_metadata, write_jsonl
from PIL import Image, ImageDraw

RED, BLUE = (220, 30, 30), (30, 70, 220)


def _two_tone(path: Path, size=(96, 64), top=RED, bottom=BLUE, **save) -> Path:
    """Top half one colour, bottom half the other: orientation and crops show in the pixels."""
    image = Image.new("RGB", size, bottom)
    ImageDraw.Draw(image).rectangle((0, 0, size[0], size[1] // 2 - 1), fill=top)
    image.save(path, **save)
    return path


def _rotated_jpeg(path: Path) -> Path:
    """A phone photo: stored sideways (red on the left), EXIF orientation 6 says 'turn 90° clockwise to view'.

    Turned clockwise, the left edge becomes the top: upright, it is red above blue.
    """
    stored = Image.new("RGB", (64, 96), BLUE)
    ImageDraw.Draw(stored).rectangle((0, 0, 31, 96), fill=RED)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, "JPEG", quality=95, exif=exif)
    return path


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    src = tmp_path / "raw"
    (src / "sub").mkdir(parents=True)
    _two_tone(src / "a.png")
    (src / "a.txt").write_text("a red band over a blue band\n", encoding="utf-8")
    _two_tone(src / "sub" / "a-copy.png")  # same pixels: a duplicate
    _two_tone(src / "a-again.jpg", quality=100)  # re-encoded as JPEG: other pixels, not an exact duplicate
    _rotated_jpeg(src / "phone.jpg")
    (src / "phone.txt").write_text("a phone picture", encoding="utf-8")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    _two_tone(src / "small.png", size=(40, 40), top=(30, 170, 50))
    rgba = Image.new("RGBA", (80, 80), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).ellipse((20, 20, 60, 60), fill=(240, 210, 20, 255))
    rgba.save(src / "cutout.png")
    (src / "notes.md").write_text("not an image", encoding="utf-8")
    return src


def test_a_messy_folder_becomes_pairs_with_a_summary_and_exit_1(messy, tmp_path, capsys):
    dst = tmp_path / "train"
    assert cli("prepare-dataset", messy, dst, "--size", "64", "--min-size", "48") == 1
    err = capsys.readouterr().err
    assert "broken.png" in err and "sub/a-copy.png" in err and "small.png" in err

    summary = json.loads((dst / "summary.json").read_text())
    assert summary["skipped"] == {"duplicate": 1, "too_small": 1, "unreadable": 1}
    assert summary["skipped_files"]["unreadable"] == ["broken.png"]
    assert summary["kept"] == 4 and summary["added"] == 4 and summary["captions_missing"] == 2
    entries = [json.loads(line) for line in (dst / "metadata.jsonl").read_text().splitlines()]
    # sorted by relative path: a-again.jpg, a.png, cutout.png, phone.jpg
    assert [e["source"] for e in entries] == ["a-again.jpg", "a.png", "cutout.png", "phone.jpg"]
    assert [e["file_name"] for e in entries] == ["0000.png", "0001.png", "0002.png", "0003.png"]
    assert (dst / "0001.txt").read_text() == "a red band over a blue band\n"
    assert entries[1]["text"] == "a red band over a blue band"
    assert entries[0]["text"] == "" and entries[0]["caption_missing"] is True
    for entry in entries:
        with Image.open(dst / entry["file_name"]) as image:
            assert image.size == (64, 64) and image.mode == "RGB"

    # the rotated phone picture is upright: red on top, blue below
    phone = pixels(dst / "0003.png")
    assert np.abs(phone[8, 32] - RED).max() < 30 and np.abs(phone[56, 32] - BLUE).max() < 30
    # transparency lands on white, not black
    cutout = pixels(dst / "0002.png")
    assert cutout[2, 2].min() > 245


def test_the_same_source_gives_the_same_folder_and_a_rerun_adds_only_new_images(messy, tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    options = ["--size", "48", "--crop", "random", "--seed", "3"]
    assert cli("prepare-dataset", messy, first, *options) == 1
    assert cli("prepare-dataset", messy, second, *options) == 1
    files = sorted(p.name for p in first.iterdir())
    assert files == sorted(p.name for p in second.iterdir())
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    before = {p.name: p.read_bytes() for p in first.iterdir() if p.suffix in (".png", ".txt")}
    _two_tone(messy / "new.png", top=(240, 210, 20))
    assert cli("prepare-dataset", messy, first, *options) == 1  # the duplicate and the broken file again
    summary = json.loads((first / "summary.json").read_text())
    assert summary["added"] == 1 and summary["already"] == len(before) // 2 == summary["kept"] - 1
    for name, data in before.items():
        assert (first / name).read_bytes() == data, f"{name} changed on rerun"
    newest = f"{len(before) // 2:04d}"
    entries = [json.loads(line) for line in (first / "metadata.jsonl").read_text().splitlines()]
    assert entries[-1] == {**entries[-1], "file_name": f"{newest}.png", "source": "new.png"}
    assert len(entries) == summary["kept"]


def test_random_crops_differ_from_centre_crops_and_none_keeps_the_whole_picture(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    ramp = np.repeat(np.linspace(0, 255, 192, dtype=np.uint8)[None, :, None], 64, axis=0).repeat(3, axis=2)
    Image.fromarray(ramp).save(src / "wide.png")  # a left-to-right ramp: every horizontal crop is different
    assert cli("prepare-dataset", src, tmp_path / "c", "--size", "64") == 0
    assert cli("prepare-dataset", src, tmp_path / "n", "--size", "64", "--crop", "none") == 0
    with Image.open(tmp_path / "n" / "0000.png") as whole:
        assert whole.size == (64, 24)  # 192x64 scaled to a longer side of 64, sides rounded to multiples of 8
    with Image.open(tmp_path / "c" / "0000.png") as square:
        assert square.size == (64, 64)
    crops = set()
    for seed in range(6):
        out = tmp_path / f"r{seed}"
        assert cli("prepare-dataset", src, out, "--size", "64", "--crop", "random", "--seed", seed) == 0
        crops.add((out / "0000.png").read_bytes())
    assert len(crops) > 2, "random crops should differ between seeds"


def test_buckets_keep_the_aspect_ratio_and_are_recorded(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    _two_tone(src / "wide.png", size=(300, 150))
    _two_tone(src / "tall.png", size=(150, 300))
    _two_tone(src / "square.png", size=(200, 200))
    dst = tmp_path / "train"
    assert cli("prepare-dataset", src, dst, "--size", "128", "--buckets") == 0
    entries = {e["source"]: e for e in map(json.loads, (dst / "metadata.jsonl").read_text().splitlines())}
    wide, tall, square = entries["wide.png"], entries["tall.png"], entries["square.png"]
    assert square["bucket"] == "128x128"
    assert wide["width"] > wide["height"] and tall["height"] > tall["width"]
    assert wide["bucket"] == f"{wide['width']}x{wide['height']}" == f"{tall['height']}x{tall['width']}"
    for entry in entries.values():
        assert entry["width"] % 8 == 0 and entry["height"] % 8 == 0
        assert 0.8 * 128 * 128 <= entry["width"] * entry["height"] <= 128 * 128
    summary = json.loads((dst / "summary.json").read_text())
    assert sum(summary["buckets"].values()) == 3 and summary["buckets"]["128x128"] == 1


def test_an_sdbatch_output_folder_gives_its_prompts_as_captions(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "one", "prompt": "a red circle", "seed": 1},
        {"id": "two", "prompt": "a blue square", "seed": 2, "num_images": 2},
    ])
    out = tmp_path / "out"
    assert cli(manifest, *FAST, "--out", out, "--quiet") == 0
    dst = tmp_path / "train"
    assert cli("prepare-dataset", out, dst, "--size", "64") == 0
    entries = [json.loads(line) for line in (dst / "metadata.jsonl").read_text().splitlines()]
    assert sorted(e["text"] for e in entries) == ["a blue square", "a blue square", "a red circle"]
    assert {e["source"] for e in entries} == {m["file_name"] for m in read_metadata(out)}
    for entry in entries:
        assert (dst / entry["file_name"]).with_suffix(".txt").read_text().strip() == entry["text"]


def test_an_imagefolder_metadata_gives_captions(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    _two_tone(src / "x.png")
    _two_tone(src / "y.png", top=(240, 210, 20))
    write_jsonl(src / "metadata.jsonl", [{"file_name": "x.png", "text": "first"}, {"file_name": "y.png", "caption": "second"}])
    dst = tmp_path / "train"
    assert cli("prepare-dataset", src, dst, "--size", "32") == 0
    assert [(dst / f"000{i}.txt").read_text().strip() for i in range(2)] == ["first", "second"]


@pytest.mark.parametrize("problem", ["missing", "empty", "size", "other-settings", "foreign-dst", "buckets-none"])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, problem):
    src = tmp_path / "raw"
    src.mkdir()
    _two_tone(src / "a.png")
    dst = tmp_path / "train"
    args = [src, dst, "--size", "64"]
    if problem == "missing":
        args[0] = tmp_path / "nowhere"
    elif problem == "empty":
        (src / "a.png").unlink()
    elif problem == "size":
        args[3] = "60"
    elif problem == "other-settings":
        assert cli("prepare-dataset", *args) == 0
        args[3] = "32"
    elif problem == "foreign-dst":
        dst.mkdir()
        (dst / "mine.txt").write_text("keep me")
    else:
        args += ["--buckets", "--crop", "none"]
    before = sorted(p.name for p in dst.iterdir()) if dst.exists() else None
    capsys.readouterr()
    assert cli("prepare-dataset", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    assert (sorted(p.name for p in dst.iterdir()) if dst.exists() else None) == before


def test_a_pair_deleted_by_hand_is_never_overwritten(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    for i, colour in enumerate([(220, 30, 30), (30, 70, 220), (30, 170, 50)]):
        _two_tone(src / f"{i}.png", top=colour)
    dst = tmp_path / "train"
    assert cli("prepare-dataset", src, dst, "--size", "32") == 0
    (dst / "0000.png").unlink()
    (dst / "0000.txt").unlink()
    last = (dst / "0002.png").read_bytes()
    _two_tone(src / "3.png", top=(240, 210, 20))
    assert cli("prepare-dataset", src, dst, "--size", "32") == 0
    assert (dst / "0002.png").read_bytes() == last
    names = [json.loads(line)["file_name"] for line in (dst / "metadata.jsonl").read_text().splitlines()]
    assert len(names) == len(set(names))
    assert (dst / "0003.png").is_file() and "0003.png" in names
