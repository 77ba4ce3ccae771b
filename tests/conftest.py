"""Shared fixtures: offline, CPU, the embedded tiny model, small images and few steps."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread count for the whole suite (it can move a pixel by 1/255): sdbatch's default would follow the
# machine's load, and tests compare pixels across runs. tests/test_threads.py tests the default itself.
os.environ.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from batch.cli import run_cli  # noqa: E402

# Small and fast: every end-to-end test uses these unless it says otherwise.
FAST = ["--model", "tiny", "--device", "cpu", "--steps", "3", "--width", "64", "--height", "64"]


# --- quality figures: each quality test names its figure; SDBATCH_QUALITY_REPORT=path writes them all ----

FIGURES: dict[str, str] = {}


def record_figure(name: str, text: str) -> str:
    FIGURES[name] = text
    print(f"{name}: {text}")
    return text


@pytest.fixture(scope="session", autouse=True)
def _quality_report():
    yield
    path = os.environ.get("SDBATCH_QUALITY_REPORT")
    if path and FIGURES:
        lines = ["| check | figure |", "|---|---|"] + [f"| {name} | {text} |" for name, text in FIGURES.items()]
        Path(path).write_text("\n".join(lines) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def make_image(path: Path, color=(200, 30, 30), size=(64, 64)) -> Path:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, color)
    ImageDraw.Draw(image).rectangle((8, 8, size[0] // 2, size[1] // 2), fill=(20, 200, 60))
    image.save(path)
    return path


def make_tiny_lora(folder: Path, seed: int = 0, name: str = "pytorch_lora_weights.safetensors") -> Path:
    """A random LoRA for the tiny UNet, made with peft and saved the way diffusers' training scripts do."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(REPO / "models" / "tiny")
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name=name, safe_serialization=True)
    return folder / name


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


# --- runs in a child process (to kill, interrupt or race them) --------------------------------

# Slow enough per image (more steps) that a kill lands mid-run; small enough to stay fast.
SLOW = ["--model", "tiny", "--device", "cpu", "--steps", "12", "--width", "64", "--height", "64"]


def numbered_manifest(folder: Path, count: int = 16) -> Path:
    """`count` rows, one of them with 2 images: count + 1 images."""
    rows = [{"id": f"img{i:02d}", "prompt": f"a picture of thing {i % 5}", "seed": 100 + i} for i in range(count)]
    rows[3]["num_images"] = 2
    return write_jsonl(folder / "m.jsonl", rows)


def start_run(manifest: Path, out: Path, *options: str):
    """`run_batch.py MANIFEST *options --out OUT --quiet` as a child process (text pipes)."""
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, str(REPO / "run_batch.py"), str(manifest), *options, "--out", str(out),
                             "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def done_count(out: Path) -> int:
    """Done images in a (possibly running) output folder's checkpoint."""
    import sqlite3

    try:
        db = sqlite3.connect(f"file:{out / 'checkpoint.sqlite'}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute("SELECT COUNT(*) FROM images WHERE status = 'done'").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return 0


def wait_for_done(proc, out: Path, at_least: int, timeout: float = 120) -> int:
    """Poll until `at_least` images are done or the process ends; returns the count."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        done = done_count(out)
        if done >= at_least:
            return done
        time.sleep(0.02)
    return done_count(out)
