"""`bench` on the CPU with the tiny model: every key of bench.json, ratios, the FLOP bound."""
from __future__ import annotations

import json
import time

import pytest
from conftest import cli

KEYS = {"device", "gpu_name", "model", "settings", "variants", "ratio_vs_naive", "steady_state_ratio_vs_naive",
        "end_to_end_ratio_vs_naive", "overhead_fraction", "unet_tflops_per_s", "flop_bound_images_per_s"}
VARIANT_KEYS = {"name", "images", "images_per_s", "end_to_end_images_per_s", "s_per_image_p50", "s_per_image_p95",
                "peak_vram_bytes", "load_s", "warmup_s", "generate_s", "wall_s"}
EPS = 0.05  # seconds: the runner rounds its timings to 4 digits
SLOW_LOAD = 1.0  # seconds added to naive's lazy img2img load, so that it shows wherever it is counted


def test_bench_writes_every_key_and_ratio(tmp_path):
    out = tmp_path / "bench"
    assert cli("bench", "--model", "tiny", "--device", "cpu", "--images", "9", "--width", "64", "--height", "64",
               "--steps", "3", "--mix", "mixed", "--out", out) == 0
    result = json.loads((out / "bench.json").read_text())
    assert KEYS <= result.keys()
    assert result["settings"] == {"width": 64, "height": 64, "steps": 3, "cfg": 7.5, "images": 9, "mix": "mixed",
                                  "batch_size": "auto", "compile": False}
    assert [v["name"] for v in result["variants"]] == ["naive", "sdbatch"]
    for variant in result["variants"]:
        assert VARIANT_KEYS <= variant.keys()
        assert variant["images_per_s"] > 0 and variant["s_per_image_p95"] >= variant["s_per_image_p50"] > 0
    assert set(result["ratio_vs_naive"]) == {"naive", "sdbatch"} and result["ratio_vs_naive"]["naive"] == 1.0
    assert result["ratio_vs_naive"]["sdbatch"] > 0
    assert result["steady_state_ratio_vs_naive"] == result["ratio_vs_naive"]
    naive, sdbatch = result["variants"]
    assert result["end_to_end_ratio_vs_naive"] == {
        "naive": 1.0, "sdbatch": round(sdbatch["end_to_end_images_per_s"] / naive["end_to_end_images_per_s"], 3)}
    assert 0 <= result["overhead_fraction"] < 1
    assert result["flop_bound_images_per_s"] > 0 and result["unet_tflops_per_s"] > 0
    assert result["flops_per_image"] == 3 * 2 * result["unet_flops_per_eval"] + result["vae_decode_flops"]
    md = (out / "bench.md").read_text()
    assert "| naive |" in md and "| sdbatch |" in md and "FLOP bound" in md
    assert "vs naive (steady state)" in md and "vs naive (end to end)" in md
    assert f"| {sdbatch['end_to_end_images_per_s']:.3f} | {result['end_to_end_ratio_vs_naive']['sdbatch']:.2f}x |" in md
    assert len(list((out / "sdbatch" / "images").glob("*.png"))) == 9  # the runner really made them
    assert len(list((out / "naive").glob("*.png"))) == 9



def test_every_load_is_outside_steady_state_and_inside_end_to_end(tmp_path, monkeypatch):
    """Naive's img2img pipeline load counts as a load, as sdbatch's loads do: not in generate_s, in wall_s."""
    from diffusers import StableDiffusionImg2ImgPipeline

    original = StableDiffusionImg2ImgPipeline.from_pretrained

    def slow_from_pretrained(cls, *args, **kwargs):
        time.sleep(SLOW_LOAD)
        return original(*args, **kwargs)

    monkeypatch.setattr(StableDiffusionImg2ImgPipeline, "from_pretrained", classmethod(slow_from_pretrained))
    out = tmp_path / "bench"
    assert cli("bench", "--model", "tiny", "--device", "cpu", "--images", "4", "--width", "64", "--height", "64",
               "--steps", "2", "--mix", "mixed", "--out", out) == 0  # rows: 2 txt2img, 1 img2img, 1 image_prompt
    result = json.loads((out / "bench.json").read_text())
    naive, sdbatch = result["variants"]
    assert naive["load_s"] >= SLOW_LOAD, f"naive load_s {naive['load_s']:.3f} s misses the img2img load"
    for v in (naive, sdbatch):
        counted = v["load_s"] + v["warmup_s"] + v["generate_s"]
        assert counted <= v["wall_s"] + EPS, f"{v['name']}: load+warm-up+generate {counted:.3f} s > wall {v['wall_s']:.3f} s"
        assert v["load_s"] > 0 and v["generate_s"] > 0 and v["images"] == 4
        assert v["end_to_end_images_per_s"] == pytest.approx(4 / v["wall_s"], rel=1e-6)
    assert naive["images_per_s"] == pytest.approx(3 / naive["generate_s"], rel=1e-6)  # the first image is warm-up
    assert sdbatch["end_to_end_images_per_s"] <= sdbatch["images_per_s"]
    md = (out / "bench.md").read_text()
    assert f"| naive | {naive['images_per_s']:.3f} | 1.00x | {naive['end_to_end_images_per_s']:.3f} | 1.00x |" in md


def test_sd15_flop_count_matches_the_published_one():
    from batch.bench import model_flops

    unet, vae = model_flops("sd15-random", 512, 512)
    assert 0.75e12 < unet < 0.85e12  # ~0.80 TFLOP per UNet evaluation at 64x64 latents
    assert 2.3e12 < vae < 2.7e12  # ~2.5 TFLOP per 512x512 decode
