"""`bench` on the CPU with the tiny models: every key of bench.json, ratios, the FLOP bound, every family;
FLOPs of the real SDXL and Flux architectures on the meta device; on CUDA, the real-size presets."""
from __future__ import annotations

import json
import resource
import time

import pytest
import torch
from conftest import REPO, cli

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


def _bench(tmp_path, model: str, mix: str, *extra) -> dict:
    out = tmp_path / "bench"
    assert cli("bench", "--model", model, "--device", "cpu", "--images", "3", "--steps", "2", "--mix", mix,
               "--out", out, *extra) == 0
    return json.loads((out / "bench.json").read_text())


@pytest.mark.parametrize("model, mix", [("tiny-sdxl", "txt2img"), ("tiny-sdxl", "mixed"), ("tiny-flux", "txt2img"),
                                        ("tiny-flux", "mixed")])
def test_bench_runs_other_families(tmp_path, model, mix):
    """SDXL and Flux end to end: the family's CFG when none is given, its modes, its denoiser's FLOPs."""
    from PIL import Image

    from batch.families import describe

    family = describe(model).family
    result = _bench(tmp_path, model, mix, "--width", "64", "--height", "64")
    assert result["family"] == family.name and result["settings"]["cfg"] == family.cfg  # 5.0 SDXL, 3.5 Flux dev
    assert result["mix_modes"] == (["txt2img"] if mix == "txt2img" else ["txt2img", "img2img"])
    assert [v["name"] for v in result["variants"]] == ["naive", "sdbatch"]
    assert all(v["images"] == 3 and v["images_per_s"] > 0 for v in result["variants"])
    assert result["unet_flops_per_eval"] > 0 and result["vae_decode_flops"] > 0
    passes = 1 if family.negative_needs_true_cfg else 2  # Flux's guidance is an input, not a second pass
    assert result["flops_per_image"] == 2 * passes * result["unet_flops_per_eval"] + result["vae_decode_flops"]
    assert result["flop_bound_images_per_s"] > 0
    manifest = tmp_path / "bench" / "manifest" / f"bench-{mix}.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert all(("negative_prompt" in row) != family.negative_needs_true_cfg for row in rows)
    naive = sorted((tmp_path / "bench" / "naive").glob("*.png"))
    assert len(naive) == 3 and {Image.open(p).size for p in naive} == {(64, 64)}  # img2img rows too
    md = (tmp_path / "bench" / "bench.md").read_text()
    assert ("Mix mixed: txt2img and img2img only" in md) == (mix == "mixed")


def test_bench_defaults_to_the_models_size_and_family_settings(tmp_path):
    """Settings left None take the model's native size (tiny-flux: 128) and its family's CFG."""
    from batch.bench import Settings, bench

    result = bench(Settings("tiny-flux", "cpu", 2, None, None, 1, None, "mixed", None, False), tmp_path / "bench")
    assert result["settings"] == {"width": 128, "height": 128, "steps": 1, "cfg": 3.5, "images": 2, "mix": "mixed",
                                  "batch_size": "auto", "compile": False}
    assert [v["images"] for v in result["variants"]] == [2, 2]


def test_bench_leaves_the_flop_bound_out_where_the_denoiser_is_unknown(tmp_path):
    """PixArt (the "auto" family): the bench runs, txt2img only, and says the FLOP bound is left out."""
    result = _bench(tmp_path, "tiny-pixart", "mixed", "--width", "64", "--height", "64")
    assert result["mix_modes"] == ["txt2img"] and all(v["images"] == 3 for v in result["variants"])
    assert result["flops_per_image"] is None and result["flop_bound_images_per_s"] is None
    md = (tmp_path / "bench" / "bench.md").read_text()
    assert "FLOP bound left out" in md and "Mix mixed: txt2img only" in md


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


@pytest.mark.parametrize("model, low, high", [
    ("sdxl-random", 6.0e12, 7.0e12),  # published ~6.7 TFLOP per UNet evaluation at 128x128 latents
    # 57 blocks at 4096 image + 512 text tokens: 59.5 TFLOP in linear layers (2 x 6.45 B weights a token meets
    # x 4608 tokens), 14.9 TFLOP in attention (4 T^2 d per block)
    ("flux-random", 70e12, 80e12),
])
def test_real_architecture_flops_on_the_meta_device(model, low, high):
    """Counted on meta tensors: seconds, and no memory for the weights (SDXL's UNet alone is 10 GB in fp32)."""
    from batch.bench import model_flops

    before = _peak_rss_bytes()
    denoiser, vae = model_flops(model, 1024, 1024)
    assert low < denoiser < high
    assert 10e12 < vae < 11e12  # ~10.5 TFLOP per 1024x1024 decode, 4x SD's 512x512
    assert _peak_rss_bytes() - before < 2**30


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model", ["sdxl-random", "flux-random"])
def test_real_size_presets_on_cuda(tmp_path, model):
    """The real SDXL and Flux architectures at 1024x1024 with the family's steps and CFG, 4 images:
    images/s and peak VRAM of each variant kept in reports/bench-<model>.json."""
    out = tmp_path / "bench"
    assert cli("bench", "--model", model, "--device", "cuda", "--images", "4", "--width", "1024", "--height", "1024",
               "--out", out) == 0
    result = json.loads((out / "bench.json").read_text())
    for v in result["variants"]:
        assert v["images"] == 4 and v["images_per_s"] > 0 and v["peak_vram_bytes"] > 0
    assert result["flop_bound_images_per_s"] > 0
    kept = ("model", "family", "gpu_name", "dtype", "versions", "date", "settings", "flops_per_image",
            "flop_bound_images_per_s", "steady_state_ratio_vs_naive")
    summary = {key: result[key] for key in kept}
    summary["variants"] = {v["name"]: {key: v[key] for key in ("images_per_s", "end_to_end_images_per_s",
                                                             "peak_vram_bytes")} for v in result["variants"]}
    (REPO / "reports" / f"bench-{model}.json").write_text(json.dumps(summary, indent=2) + "\n")
