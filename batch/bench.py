"""`bench`: sdbatch against the loop a diffusers user writes, side by side in one process.

Variants run one after another on the same device over the same synthetic manifest:
`naive` (from_pretrained pipelines, a second pipeline loaded for img2img rows, one
`pipe(...)` call per row, `save()`), `sdbatch` (the runner with default settings) and,
with --compile, `sdbatch-compile`. Every variant gets a warm-up that is reported on its
own. The FLOP bound comes from FLOPs counted on the real architecture (meta tensors, no
compute) and a matmul rate measured on the device in the same run.

Every variant gets two rates, taken the same way for all: steady state (images ÷ generation
time, every model load and warm-up left out, naive's lazy img2img load among them) and end
to end (images ÷ the variant's whole wall time, loads and warm-up included).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import devices
from .devices import synchronize as _sync
from .tally import percentile

log = logging.getLogger(__name__)

PROMPTS = [
    "a lighthouse on a cliff at dusk, oil painting", "a red fox in fresh snow, golden hour",
    "a bowl of ramen, studio photo", "an astronaut riding a horse, watercolor",
    "a cozy cabin in a pine forest, night", "a futuristic city skyline, neon",
    "a portrait of an old fisherman, charcoal", "a field of sunflowers under storm clouds",
]
NEGATIVE = "blurry, low quality"


@dataclass(frozen=True)
class Settings:
    model: str
    device: str
    images: int
    width: int
    height: int
    steps: int
    cfg: float
    mix: str  # txt2img | mixed (a third each of txt2img, img2img, image_prompt, shuffled)
    batch_size: int | None
    compile: bool


@dataclass
class Variant:
    name: str
    images: int
    images_per_s: float  # steady state: images generated after warm-up ÷ generate_s
    end_to_end_images_per_s: float  # every image ÷ wall_s
    s_per_image_p50: float  # naive: one call per image; sdbatch: batch time ÷ batch size
    s_per_image_p95: float
    peak_vram_bytes: int | None
    load_s: float  # every model load, naive's lazy img2img pipeline included
    warmup_s: float
    generate_s: float  # generation after warm-up, no load inside
    wall_s: float  # the whole variant, loads and warm-up included


def synthetic_manifest(folder: Path, s: Settings) -> Path:
    """A manifest of `images` rows with fixed seeds; mixed: a third of each mode, shuffled."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    init = folder / "init.png"
    picture = Image.new("RGB", (s.width, s.height), (90, 140, 200))
    ImageDraw.Draw(picture).ellipse((s.width // 4, s.height // 4, s.width * 3 // 4, s.height * 3 // 4), fill=(230, 180, 60))
    picture.save(init)
    rows = []
    for i in range(s.images):
        mode = "txt2img" if s.mix == "txt2img" else ("txt2img", "img2img", "image_prompt")[i % 3]
        row = {"id": f"b{i:05d}", "prompt": PROMPTS[i % len(PROMPTS)], "negative_prompt": NEGATIVE, "seed": i,
               "steps": s.steps, "cfg": s.cfg, "width": s.width, "height": s.height}
        if mode == "img2img":
            row.update(init_image="init.png", strength=1.0)  # all steps run: the same work as txt2img
        elif mode == "image_prompt":
            row.update(prompt_image="init.png", image_prompt_method="clip_embed")
        rows.append(row)
    random.Random(0).shuffle(rows)
    path = folder / f"bench-{s.mix}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _reset_peak(device: str) -> None:
    devices.free_cache(device)
    devices.reset_peak(device)


def _peak(device: str) -> int | None:
    return devices.peak_allocated(device)


def _percentiles(times: list[float]) -> tuple[float, float]:
    times = sorted(times)
    return percentile(times, 50), percentile(times, 95)


def run_naive(manifest: Path, s: Settings, dtype: str, out: Path) -> Variant:
    """What a diffusers user writes from the docs: pipelines from disk, one call per row."""
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
    from PIL import Image

    from .models import _torch_dtype, build_random_sd15, resolve_model

    torch_dtype = _torch_dtype(dtype)
    source = resolve_model(s.model)

    def load(cls):
        if source.kind == "random":  # no weights on disk: build, as from_pretrained would load
            pipe = build_random_sd15(s.device, torch_dtype)
            return pipe if cls is StableDiffusionPipeline else cls(**pipe.components)
        return cls.from_pretrained(source.location, dtype=torch_dtype, safety_checker=None, requires_safety_checker=False)

    def lazy_load(row: dict, pipe) -> None:
        """The loads a docs-style loop does on the first row that needs them."""
        nonlocal img2img, vision
        if "init_image" in row and img2img is None:  # from disk again, as people do
            img2img = load(StableDiffusionImg2ImgPipeline).to(s.device)
            img2img.set_progress_bar_config(disable=True)
        elif "prompt_image" in row and vision is None:
            from .models import LoadOptions, _random_clip_vision

            vision = (_random_clip_vision(LoadOptions(s.device, dtype)) if source.kind == "random"
                      else (pipe.image_encoder, pipe.feature_extractor))
        else:
            return
        _sync(s.device)

    _reset_peak(s.device)
    started = time.perf_counter()
    pipe = load(StableDiffusionPipeline).to(s.device)
    pipe.set_progress_bar_config(disable=True)
    _sync(s.device)
    load_s = time.perf_counter() - started
    img2img = vision = None
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    out.mkdir(parents=True, exist_ok=True)
    times, warmup = [], 0.0
    for index, row in enumerate(rows):
        # Timed as a load, like sdbatch's, so that the steady-state rate holds no loading.
        loading = time.perf_counter()
        lazy_load(row, pipe)
        load_s += time.perf_counter() - loading
        t0 = time.perf_counter()
        generator = torch.Generator(s.device).manual_seed(row["seed"])
        common = dict(negative_prompt=row["negative_prompt"], num_inference_steps=row["steps"],
                      guidance_scale=row["cfg"], generator=generator)
        if "init_image" in row:
            image = img2img(row["prompt"], image=Image.open(manifest.parent / row["init_image"]).convert("RGB"),
                            strength=row["strength"], **common).images[0]
        elif "prompt_image" in row:  # seed document 001's recipe: CLIP image embedding as prompt_embeds
            encoder, processor = vision
            pixels = processor(images=Image.open(manifest.parent / row["prompt_image"]).convert("RGB"),
                               return_tensors="pt").pixel_values.to(s.device, torch_dtype)
            embeds = encoder(pixels).image_embeds.unsqueeze(1).repeat(1, 77, 1)
            image = pipe(prompt_embeds=embeds, width=row["width"], height=row["height"], **common).images[0]
        else:
            image = pipe(row["prompt"], width=row["width"], height=row["height"], **common).images[0]
        image.save(out / f"{row['id']}.png")
        _sync(s.device)
        if index == 0:
            warmup = time.perf_counter() - t0  # first call: kernel selection, allocator growth
        else:
            times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - started
    peak = _peak(s.device)
    del pipe, img2img, vision
    times = times or [warmup]  # a one-image bench has no steady state
    p50, p95 = _percentiles(times)
    generate_s = sum(times)
    return Variant("naive", len(rows), len(times) / generate_s, len(rows) / wall, p50, p95, peak,
                   load_s, warmup, generate_s, wall)


def run_sdbatch(manifest: Path, s: Settings, out: Path, name: str, compile: bool) -> tuple[Variant, dict]:
    """The runner with default settings (plus --compile for the tuned variant)."""
    from .checkpoint import FILE_NAME, Checkpoint
    from .config import RunConfig
    from .context import RunContext
    from .runner import run

    _reset_peak(s.device)
    started = time.perf_counter()
    result = run(RunConfig(manifest=manifest, out=out, model=s.model, device=s.device, batch_size=s.batch_size,
                           compile=compile, quiet=True, fresh=True), RunContext.single(s.device))
    wall = time.perf_counter() - started
    report = json.loads((out / "report.json").read_text())
    checkpoint = Checkpoint(out / FILE_NAME, readonly=True)
    seconds = [row[4] for row in checkpoint.image_rows() if row[5] == "done" and row[4] is not None]
    checkpoint.close()
    totals, groups = report["totals"], report["groups"]
    p50, p95 = _percentiles(seconds)
    assert result.counts.done == s.images, f"{name}: {result.counts.done} of {s.images} images done"
    # wall is the whole run() call, as naive's wall is its whole loop: the same end-to-end clock for both
    variant = Variant(name, totals["generated"], totals["images_per_s"], totals["generated"] / wall, p50, p95,
                      _peak(s.device) or totals["peak_vram_bytes"], sum(g["load_s"] for g in groups),
                      sum(g["warmup_s"] for g in groups), totals["generate_s"], wall)
    return variant, report


def overhead_fraction(report: dict) -> float:
    """Share of the generation wall time spent outside model calls (encode, denoise, decode)."""
    wall = sum(g["wall_s"] for g in report["groups"])
    inside = sum(g["stages"][k] for g in report["groups"] for k in ("encode_s", "denoise_s", "decode_s"))
    return max(0.0, (wall - inside) / wall) if wall else 0.0


def model_flops(model: str, width: int, height: int) -> tuple[float, float]:
    """FLOPs of one UNet evaluation (batch 1) and one VAE decode, counted on meta tensors."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from .models import SD15_CONFIGS, resolve_model

    source = resolve_model(model)
    folder = Path(source.location) if source.kind == "folder" else SD15_CONFIGS
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        latents = torch.randn(1, unet.config.in_channels, height // 8, width // 8)
        text = torch.randn(1, 77, unet.config.cross_attention_dim)
    with FlopCounterMode(display=False) as counter:
        unet(latents, 10, encoder_hidden_states=text)
    unet_flops = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        vae.decode(latents)
    return float(unet_flops), float(counter.get_total_flops())


def matmul_rate(device: str, dtype: str) -> float:
    """FLOP/s of a large matmul on this device and dtype, measured now."""
    import torch

    from .models import _torch_dtype

    size = 8192 if device.startswith("cuda") else 1024
    a = torch.randn(size, size, device=device, dtype=_torch_dtype(dtype))
    b = torch.randn(size, size, device=device, dtype=_torch_dtype(dtype))
    for _ in range(3):
        a @ b
    _sync(device)
    repeats = 20 if device.startswith("cuda") else 5
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def bench(s: Settings, out: Path) -> dict:
    """Run every variant and write bench.json and bench.md into `out`."""
    import diffusers
    import torch

    from . import __version__
    from .models import quiet_libraries, resolve_device, resolve_dtype

    quiet_libraries()
    device = resolve_device(s.device)
    s = Settings(**{**asdict(s), "device": device})
    dtype = resolve_dtype("auto", device)
    out.mkdir(parents=True, exist_ok=True)
    manifest = synthetic_manifest(out / "manifest", s)

    variants = [run_naive(manifest, s, dtype, out / "naive")]
    sdbatch, report = run_sdbatch(manifest, s, out / "sdbatch", "sdbatch", compile=False)
    variants.append(sdbatch)
    if s.compile:
        variants.append(run_sdbatch(manifest, s, out / "sdbatch-compile", "sdbatch-compile", compile=True)[0])

    unet_flops, vae_flops = model_flops(s.model, s.width, s.height)
    evaluations = s.steps * (2 if s.cfg > 1 else 1)  # CFG: conditional and unconditional
    image_flops = evaluations * unet_flops + vae_flops
    peak_rate = matmul_rate(device, dtype)
    best = max(variants[1:], key=lambda v: v.images_per_s)
    steady = _ratios(variants, "images_per_s")
    result = {
        "device": device,
        "gpu_name": devices.name(device),
        "model": s.model,
        "dtype": dtype,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "sdbatch": __version__,
                     "python": platform.python_version()},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {"width": s.width, "height": s.height, "steps": s.steps, "cfg": s.cfg, "images": s.images,
                     "mix": s.mix, "batch_size": s.batch_size or "auto", "compile": s.compile},
        "variants": [asdict(v) for v in variants],
        "ratio_vs_naive": steady,  # kept for existing readers: the steady-state ratio
        "steady_state_ratio_vs_naive": steady,
        "end_to_end_ratio_vs_naive": _ratios(variants, "end_to_end_images_per_s"),
        "overhead_fraction": round(overhead_fraction(report), 4),
        "flops_per_image": image_flops,
        "unet_flops_per_eval": unet_flops,
        "vae_decode_flops": vae_flops,
        "matmul_flops_per_s": peak_rate,
        # significant digits, not decimals: a CPU's rate is a few hundredths of a TFLOP/s
        "unet_tflops_per_s": float(f"{best.images_per_s * evaluations * unet_flops / 1e12:.4g}"),
        "flop_bound_images_per_s": float(f"{peak_rate / image_flops:.4g}"),
        "stages": report["stages"],
    }
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(result))
    return result


def _ratios(variants: list[Variant], rate: str) -> dict[str, float]:
    """Each variant's `rate` over naive's (variants[0]), by variant name."""
    naive = getattr(variants[0], rate)
    return {v.name: round(getattr(v, rate) / naive, 3) for v in variants}


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"# sdbatch bench: {result['model']} on {result['gpu_name'] or result['device']} ({result['dtype']})",
        "",
        f"{s['images']} images, {s['width']}x{s['height']}, {s['steps']} steps, CFG {s['cfg']}, mix {s['mix']}, "
        f"batch size {s['batch_size']}; torch {result['versions']['torch']}, diffusers {result['versions']['diffusers']}; "
        f"{result['date']}.",
        "",
        "| variant | images/s (steady state) | vs naive (steady state) | images/s (end to end) | vs naive (end to end) "
        "| s/image p50 | s/image p95 | peak VRAM GB | load s | warm-up s | generate s | wall s (whole variant) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in result["variants"]:
        vram = "-" if v["peak_vram_bytes"] is None else f"{v['peak_vram_bytes'] / 2**30:.2f}"
        lines.append(f"| {v['name']} | {v['images_per_s']:.3f} | {result['steady_state_ratio_vs_naive'][v['name']]:.2f}x | "
                     f"{v['end_to_end_images_per_s']:.3f} | {result['end_to_end_ratio_vs_naive'][v['name']]:.2f}x | "
                     f"{v['s_per_image_p50']:.3f} | {v['s_per_image_p95']:.3f} | {vram} | {v['load_s']:.2f} | "
                     f"{v['warmup_s']:.2f} | {v['generate_s']:.2f} | {v['wall_s']:.2f} |")
    lines += [
        "",
        "- Steady state: images after warm-up ÷ generate s, every model load and warm-up left out (naive's "
        "img2img pipeline load too). End to end: all images ÷ wall s, the variant's whole run with its loads "
        "and warm-up.",
        "- s/image p50/p95: naive makes one image per call, so its figure is a call's time; sdbatch's is each "
        "image's share of its batch (batch s ÷ batch size), not the latency of one image.",
        f"- FLOPs per image: {result['flops_per_image'] / 1e12:.2f} TFLOP (UNet {result['unet_flops_per_eval'] / 1e12:.3f} "
        f"per evaluation, VAE decode {result['vae_decode_flops'] / 1e12:.3f}); matmul rate measured now: "
        f"{result['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s.",
        f"- FLOP bound: {result['flop_bound_images_per_s']:.3f} images/s; UNet throughput of the best variant: "
        f"{result['unet_tflops_per_s']:.3f} TFLOP/s.",
        f"- sdbatch overhead (wall time outside model calls): {result['overhead_fraction'] * 100:.1f}%.",
        "",
    ]
    return "\n".join(lines)
