"""`bench` on the CPU with the tiny model: every key of bench.json, ratios, the FLOP bound."""
from __future__ import annotations

import json

from conftest import cli

KEYS = {"device", "gpu_name", "model", "settings", "variants", "ratio_vs_naive", "overhead_fraction",
        "unet_tflops_per_s", "flop_bound_images_per_s"}
VARIANT_KEYS = {"name", "images_per_s", "s_per_image_p50", "s_per_image_p95", "peak_vram_bytes", "wall_s", "warmup_s"}


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
    assert 0 <= result["overhead_fraction"] < 1
    assert result["flop_bound_images_per_s"] > 0 and result["unet_tflops_per_s"] > 0
    assert result["flops_per_image"] == 3 * 2 * result["unet_flops_per_eval"] + result["vae_decode_flops"]
    md = (out / "bench.md").read_text()
    assert "| naive |" in md and "| sdbatch |" in md and "FLOP bound" in md
    assert len(list((out / "sdbatch" / "images").glob("*.png"))) == 9  # the runner really made them
    assert len(list((out / "naive").glob("*.png"))) == 9


def test_sd15_flop_count_matches_the_published_one():
    from batch.bench import model_flops

    unet, vae = model_flops("sd15-random", 512, 512)
    assert 0.75e12 < unet < 0.85e12  # ~0.80 TFLOP per UNet evaluation at 64x64 latents
    assert 2.3e12 < vae < 2.7e12  # ~2.5 TFLOP per 512x512 decode
