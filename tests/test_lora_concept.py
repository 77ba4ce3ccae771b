"""The whole loop on a CPU: synthesize -> prepare -> train a LoRA -> generate, judged.

The embedded model never saw a diamond. A LoRA trained for a few minutes on drawings of
diamonds (plus images sdbatch synthesized with the base model, captioned by their prompts,
so the old shapes are not forgotten) teaches it the word: the judge finds diamonds in most
images with the adapter and almost none without.
"""
from __future__ import annotations

import pytest
from conftest import REPO, cli, read_metadata, record_figure, write_jsonl
from judge import judge
from PIL import Image

from batch.toy.world import ALL_SHAPES, COLOURS, write_folder

pytestmark = pytest.mark.quality

SEEDS = (0, 1, 2)
# The recipe the README walks through (about two minutes of training on 2 CPU cores). The LoRA adapts the
# ResNet convolutions too: the tiny UNet attends only at 8x8, too coarse to draw a diamond's edges.
LESSON = ["--model", "tiny", "--device", "cpu", "--rank", "16", "--lr", "1e-3", "--max-steps", "2400", "--batch-size", "8",
          "--cache-latents", "--snr-gamma", "5", "--target-modules", "to_q,to_k,to_v,to_out.0,conv1,conv2",
          "--checkpoint-every", "2400", "--quiet"]


@pytest.fixture(scope="module")
def lesson(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lesson")
    # 1. synthesize: the base model draws what it knows (the regularisation half of the dataset)
    known = REPO / "manifests" / "known-shapes.jsonl"  # 4 images of each (colour, shape)
    assert cli(known, "--model", "tiny", "--device", "cpu", "--steps", "20", "--width", "128", "--height", "128",
               "--out", root / "synth", "--quiet") == 0
    # 2. the new concept: drawings of diamonds, captioned "a red diamond" (a folder of collected images)
    write_folder(root / "diamonds", 24, seed=7, shapes=("diamond",))
    # 3. prepare both into one training folder (the second call adds to the first)
    assert cli("prepare-dataset", root / "diamonds", root / "data", "--size", "128", "--quiet") == 0
    assert cli("prepare-dataset", root / "synth", root / "data", "--size", "128", "--quiet") == 0
    # 4. train
    assert cli("train-lora", root / "data", "--out", root / "lora", *LESSON) == 0
    adapter = root / "lora" / "final" / "pytorch_lora_weights.safetensors"
    # 5. generate with and without the adapter, at the defaults
    rows = []
    for colour in sorted(COLOURS):
        for seed in SEEDS:
            for with_lora in (False, True):
                for shape in ("diamond", "circle"):
                    row = {"id": f"{'lora' if with_lora else 'base'}-{colour}-{shape}-{seed}",
                           "prompt": f"a {colour} {shape}", "seed": 1000 + seed, "want_colour": colour,
                           "want_shape": shape}
                    if with_lora:
                        row["lora"] = str(adapter)
                    rows.append(row)
    manifest = write_jsonl(root / "judged.jsonl", rows)
    out = root / "judged"
    assert cli(manifest, "--model", "tiny", "--device", "cpu", "--steps", "20", "--width", "128", "--height", "128",
               "--out", out, "--quiet") == 0
    verdicts = {}
    for meta in read_metadata(out):
        with Image.open(out / "images" / meta["file_name"]) as image:
            verdicts[meta["id"]] = (judge(image.convert("RGB"), ALL_SHAPES), meta)
    return verdicts


def _count(verdicts, prefix: str, shape: str) -> tuple[int, int, int]:
    chosen = [(v, m) for key, (v, m) in verdicts.items() if key.startswith(prefix) and m["want_shape"] == shape]
    return (sum(v.shape == m["want_shape"] for v, m in chosen), sum(v.colour == m["want_colour"] for v, m in chosen),
            len(chosen))


def test_the_lora_teaches_the_new_shape(lesson):
    with_shape, with_colour, n = _count(lesson, "lora-", "diamond")
    without_shape, _, _ = _count(lesson, "base-", "diamond")
    text = (f"'a <colour> diamond': a diamond in {with_shape}/{n} images with the LoRA, {without_shape}/{n} without; "
            f"colour right with the LoRA {with_colour}/{n}")
    record_figure("LoRA teaches a new shape", text)
    assert with_shape > 0.5 * n and without_shape <= 0.1 * n and with_colour >= 0.75 * n, text


def test_the_lora_keeps_the_colours_of_old_prompts(lesson):
    shape, colour, n = _count(lesson, "lora-", "circle")
    base_shape, _, _ = _count(lesson, "base-", "circle")
    text = f"'a <colour> circle' with the LoRA: circle {shape}/{n}, colour {colour}/{n} (base model: circle {base_shape}/{n})"
    record_figure("LoRA keeps the old shapes", text)
    # A side figure, not a bar (the issue asks for the new concept): how much the adapter takes over the old
    # words. Colour must hold; the shape is recorded (reports/quality-*.md).
    assert colour >= 0.75 * n, text
