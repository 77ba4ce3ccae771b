"""An image is made again exactly when something that changes it (or its file) changed."""
from __future__ import annotations

import json
import shutil

import numpy as np
from conftest import FAST, REPO, cli, make_tiny_lora, pixels, write_jsonl

TINY_ADAPTER = REPO / "models" / "tiny-ip-adapter" / "ip-adapter_tiny.safetensors"


def _made(out) -> int:
    """Images the latest run made (the report's figures stay on the latest run that made any)."""
    return json.loads((out / "report.json").read_text())["runs"][-1]["generated"]


def test_another_format_on_an_unchanged_manifest_makes_the_files(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": "x", "seed": 1}, {"id": "b", "prompt": "y"}])
    out = tmp_path / "out"
    assert cli(manifest, *FAST, "--out", out, "--quiet") == 0
    assert cli(manifest, *FAST, "--out", out, "--quiet", "--format", "jpg") == 0
    assert _made(out) == 2 and sorted(p.name for p in (out / "images").glob("*.jpg")) == ["a.jpg", "b.jpg"]
    assert cli(manifest, *FAST, "--out", out, "--quiet", "--format", "jpg") == 0
    assert _made(out) == 0


def test_vae_tiling_is_in_the_key_and_memory_switches_are_not(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": "x", "seed": 1}])
    out = tmp_path / "out"
    assert cli(manifest, *FAST, "--out", out, "--quiet") == 0
    assert cli(manifest, *FAST, "--out", out, "--quiet", "--vae-slicing", "--attention-slicing") == 0
    assert _made(out) == 0  # same pixels: nothing to remake
    assert cli(manifest, *FAST, "--out", out, "--quiet", "--vae-tiling") == 0
    assert _made(out) == 1
    assert cli(manifest, *FAST, "--out", out, "--quiet", "--safety-checker", "--vae-tiling") == 0
    assert _made(out) == 1


def test_a_new_lora_file_at_the_same_path_is_a_new_image(tmp_path):
    lora = make_tiny_lora(tmp_path, seed=0)
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": "x", "seed": 1, "lora": str(lora)},
                                                  {"id": "b", "prompt": "y", "seed": 2}])
    out = tmp_path / "out"
    assert cli(manifest, *FAST, "--out", out, "--quiet") == 0
    before = pixels(out / "images/a.png")
    make_tiny_lora(tmp_path, seed=1)  # same path, other weights
    assert cli(manifest, *FAST, "--out", out, "--quiet") == 0
    assert _made(out) == 1  # a only
    assert np.abs(pixels(out / "images/a.png") - before).max() > 10


def test_ip_adapter_weights_are_in_the_key_by_content(tmp_path, images_dir):
    from safetensors.torch import load_file, save_file

    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "ip", "prompt_image": str(images_dir / "prompt.png"), "seed": 1},
                                                  {"id": "t", "prompt": "y", "seed": 2}])
    out = tmp_path / "out"
    assert cli(manifest, *FAST, "--out", out, "--quiet") == 0
    copy = shutil.copy(TINY_ADAPTER, tmp_path / "same-weights.safetensors")
    assert cli(manifest, *FAST, "--out", out, "--quiet", "--ip-adapter", copy) == 0
    assert _made(out) == 0  # another path, the same weights: the same images
    stronger = {k: v * 3 if k.startswith("ip_adapter.") else v for k, v in load_file(str(TINY_ADAPTER)).items()}
    save_file(stronger, str(tmp_path / "stronger.safetensors"))
    assert cli(manifest, *FAST, "--out", out, "--quiet", "--ip-adapter", tmp_path / "stronger.safetensors") == 0
    assert _made(out) == 1  # ip only
