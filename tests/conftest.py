"""Shared fixtures: offline, CPU, the embedded tiny model, small images and few steps."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from batch.cli import run_cli  # noqa: E402

# Small and fast: every end-to-end test uses these unless it says otherwise.
FAST = ["--model", "tiny", "--device", "cpu", "--steps", "3", "--width", "64", "--height", "64"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def make_image(path: Path, color=(200, 30, 30), size=(64, 64)) -> Path:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, color)
    ImageDraw.Draw(image).rectangle((8, 8, size[0] // 2, size[1] // 2), fill=(20, 200, 60))
    image.save(path)
    return path


def read_metadata(out: Path) -> list[dict]:
    text = (out / "images" / "metadata.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def pixels(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    """A manifest folder holding an init image and a prompt image."""
    make_image(tmp_path / "init.png", (200, 30, 30))
    make_image(tmp_path / "prompt.png", (30, 30, 200), size=(48, 48))
    return tmp_path


@pytest.fixture
def mixed_manifest(images_dir: Path) -> Path:
    """One row of each mode (some with euler_a, an ancestral sampler), 2 images on one row: 7 images."""
    return write_jsonl(images_dir / "mixed.jsonl", [
        {"id": "t1", "prompt": "a red fox", "num_images": 2, "seed": 7},
        {"id": "t2", "prompt": "a castle", "negative_prompt": "blurry", "scheduler": "euler_a"},
        {"id": "t3", "prompt": "a castle at night", "scheduler": "euler_a", "seed": 11},
        {"id": "i1", "prompt": "a painting", "init_image": "init.png", "strength": 0.7},
        {"id": "i2", "prompt": "a photo", "init_image": "init.png", "strength": 0.5, "seed": 3},
        {"id": "p1", "prompt_image": "prompt.png", "image_prompt_method": "clip_embed"},
    ])


def cli(*args) -> int:
    return run_cli([str(a) for a in args])
