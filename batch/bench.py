"""`bench`: sdbatch against the loop a diffusers user writes, side by side in one process.

Variants run one after another on the same device over the same synthetic manifest:
`naive` (AutoPipelineForText2Image.from_pretrained, a second pipeline loaded from disk for
img2img rows, one `pipe(...)` call per row with what the family takes, `save()`), `sdbatch`
(the runner with default settings) and, with --compile, `sdbatch-compile`. Every variant gets
a warm-up that is reported on its own. Steps, CFG and image size default to the model
family's own. The FLOP bound comes from FLOPs counted on the real architecture (meta
tensors, no compute) and a matmul rate measured on the device in the same run.

Every variant gets two rates, taken the same way for all: steady state (images ÷ generation
time, every model load and warm-up left out, naive's lazy img2img load among them) and end
to end (images ÷ the variant's whole wall time, loads and warm-up included).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import inspect
import json
import logging
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import devices
from .devices import synchronize as _sync
from .errors import BatchError
from .families import Family, ModelInfo, describe
from .tally import percentile

log = logging.getLogger(__name__)

PROMPTS = [
    "a lighthouse on a cliff at dusk, oil painting", "a red fox in fresh snow, golden hour",
    "a bowl of ramen, studio photo", "an astronaut riding a horse, watercolor",
    "a cozy cabin in a pine forest, night", "a futuristic city skyline, neon",
    "a portrait of an old fisherman, charcoal", "a field of sunflowers under storm clouds",
]
NEGATIVE = "blurry, low quality"
MIX_MODES = ("txt2img", "img2img", "image_prompt")  # --mix mixed cycles through those the family has
CLIP_TOKENS = 77  # CLIP's context: the UNet families' text length, and SD3's CLIP half
DENOISER_INPUTS = ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel")  # model_flops knows these


@dataclass(frozen=True)
class Settings:
    model: str
    device: str
    images: int
    width: int | None  # None: the model's native size
    height: int | None
    steps: int | None  # None: the family's default
    cfg: float | None
    mix: str  # txt2img | mixed (txt2img, img2img, image_prompt in equal shares, those the family has; shuffled)
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


def resolve_settings(s: Settings, device: str, info: ModelInfo) -> Settings:
    """What the user left out, from the model: its family's steps and CFG, its native size."""
    return dataclasses.replace(
        s, device=device, width=s.width or info.size, height=s.height or info.size,
        steps=s.steps or info.family.steps, cfg=info.family.cfg if s.cfg is None else s.cfg)


def mix_modes(mix: str, family: Family) -> tuple[str, ...]:
    """The modes the manifest cycles through: mixed takes those of txt2img, img2img, image_prompt the family has."""
    return ("txt2img",) if mix == "txt2img" else tuple(
        m for m in MIX_MODES if m in family.modes and (m != "image_prompt" or "clip_embed" in family.image_prompt_methods))


def synthetic_manifest(folder: Path, s: Settings, family: Family) -> Path:
    """A manifest of `images` rows with fixed seeds; mixed: an equal share of each mode, shuffled.

    A negative prompt only where the family takes one without true CFG (not Flux), as a user would write it."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    init = folder / "init.png"
    picture = Image.new("RGB", (s.width, s.height), (90, 140, 200))
    ImageDraw.Draw(picture).ellipse((s.width // 4, s.height // 4, s.width * 3 // 4, s.height * 3 // 4), fill=(230, 180, 60))
    picture.save(init)
    modes = mix_modes(s.mix, family)
    rows = []
    for i in range(s.images):
        mode = modes[i % len(modes)]
        row = {"id": f"b{i:05d}", "prompt": PROMPTS[i % len(PROMPTS)], "seed": i,
               "steps": s.steps, "cfg": s.cfg, "width": s.width, "height": s.height}
        if not family.negative_needs_true_cfg:
            row["negative_prompt"] = NEGATIVE
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


def run_naive(manifest: Path, s: Settings, dtype: str, out: Path, family: Family) -> Variant:
    """What a diffusers user writes from the docs: AutoPipelines from disk, one call per row."""
    import torch
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image
    from PIL import Image

    from .models import _torch_dtype, resolve_model

    torch_dtype = _torch_dtype(dtype)
    source = resolve_model(s.model)
    # SD ships a safety checker slot; the other families' pipelines take no such argument
    checker = {"safety_checker": None, "requires_safety_checker": False} if family.safety_checker else {}

    def load_txt2img():
        if source.kind == "random":  # no weights on disk: build, as from_pretrained would load
            from .presets import build

            return build(source.name, s.device, torch_dtype)
        return AutoPipelineForText2Image.from_pretrained(source.location, dtype=torch_dtype, **checker).to(s.device)

    def lazy_load(row: dict, pipe) -> None:
        """The loads a docs-style loop does on the first row that needs them."""
        nonlocal img2img, vision
        if "init_image" in row and img2img is None:
            if source.kind == "random":  # nothing on disk to load again: a view over the same modules
                img2img = AutoPipelineForImage2Image.from_pipe(pipe)
            else:  # from disk again, as people do
                img2img = AutoPipelineForImage2Image.from_pretrained(source.location, dtype=torch_dtype,
                                                                     **checker).to(s.device)
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
    pipe = load_txt2img()
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
        common = dict(num_inference_steps=row["steps"], guidance_scale=row["cfg"], generator=generator)
        if "negative_prompt" in row:
            common["negative_prompt"] = row["negative_prompt"]
        size = dict(width=row["width"], height=row["height"])
        if "init_image" in row:
            # SD3's and Flux's img2img draw at their native size unless told, SD's at the image's (they take no size)
            sized = size if "width" in inspect.signature(img2img.__call__).parameters else {}
            image = img2img(prompt=row["prompt"], image=Image.open(manifest.parent / row["init_image"]).convert("RGB"),
                            strength=row["strength"], **sized, **common).images[0]
        elif "prompt_image" in row:  # seed document 001's recipe: CLIP image embedding as prompt_embeds
            encoder, processor = vision
            pixels = processor(images=Image.open(manifest.parent / row["prompt_image"]).convert("RGB"),
                               return_tensors="pt").pixel_values.to(s.device, torch_dtype)
            embeds = encoder(pixels).image_embeds.unsqueeze(1).repeat(1, 77, 1)
            image = pipe(prompt_embeds=embeds, **size, **common).images[0]
        else:
            image = pipe(prompt=row["prompt"], **size, **common).images[0]
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


def model_flops(model: str, width: int, height: int) -> tuple[float, float] | None:
    """FLOPs of one denoiser evaluation (batch 1) and one VAE decode, counted on meta tensors (no memory,
    no compute); None where the denoiser's inputs are not known here (the other AutoPipeline families)."""
    import diffusers
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .models import config_folder

    info = describe(model)
    folder = config_folder(model)  # after describe: a hub model's configs are in the cache
    if folder is None or _class_name(folder / info.family.denoiser) not in DENOISER_INPUTS:
        return None
    with torch.device("meta"):
        denoiser = _from_config(diffusers, folder / info.family.denoiser)
        vae = _from_config(diffusers, folder / "vae")
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        inputs = _denoiser_inputs(denoiser, info, height // scale, width // scale)
        latents = torch.randn(1, vae.config.latent_channels, height // scale, width // scale)
    with FlopCounterMode(display=False) as counter:
        denoiser(**inputs)
    denoiser_flops = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        vae.decode(latents)
    return float(denoiser_flops), float(counter.get_total_flops())


def _class_name(folder: Path) -> str | None:
    """The model class a component folder's config names; None where there is no such config."""
    try:
        return json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError):
        return None


def _from_config(diffusers, folder: Path):
    """The model class its config names, built from that config (on the current default device)."""
    cls = getattr(diffusers, _class_name(folder))
    return cls.from_config(cls.load_config(folder))


def _denoiser_inputs(denoiser, info: ModelInfo, height: int, width: int) -> dict:
    """One evaluation's inputs as the family's pipeline passes them, for latents of height x width."""
    import torch

    c, name = denoiser.config, type(denoiser).__name__
    timestep = torch.ones(1)
    if name == "UNet2DConditionModel":
        inputs = dict(sample=torch.randn(1, c.in_channels, height, width), timestep=timestep,
                      encoder_hidden_states=torch.randn(1, CLIP_TOKENS, c.cross_attention_dim))
        if c.addition_embed_type == "text_time":  # SDXL: pooled text embeds and six size/crop ids
            inputs["added_cond_kwargs"] = {
                "text_embeds": torch.randn(1, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim),
                "time_ids": torch.randn(1, 6)}
        return inputs
    import diffusers

    # T5 pads to the pipeline's max_sequence_length: the text tokens of every call
    text = inspect.signature(getattr(diffusers, info.pipeline).__call__).parameters["max_sequence_length"].default
    common = dict(timestep=timestep, pooled_projections=torch.randn(1, c.pooled_projection_dim))
    if name == "SD3Transformer2DModel":  # CLIP's 77 tokens, then T5's
        return dict(hidden_states=torch.randn(1, c.in_channels, height, width),
                    encoder_hidden_states=torch.randn(1, CLIP_TOKENS + text, c.joint_attention_dim), **common)
    tokens = (height // 2) * (width // 2)  # Flux packs 2x2 latent patches into one token
    return dict(hidden_states=torch.randn(1, tokens, c.in_channels),
                encoder_hidden_states=torch.randn(1, text, c.joint_attention_dim),
                img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3),
                guidance=torch.ones(1) if c.guidance_embeds else None, **common)


def evaluations_per_image(family: Family, steps: int, cfg: float) -> int:
    """Denoiser evaluations per image: CFG > 1 adds an unconditional pass, except where guidance is an
    input of the one pass (Flux's distilled guidance: its negatives need true CFG)."""
    return steps * (2 if cfg > 1 and not family.negative_needs_true_cfg else 1)


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
    from .models import LoadOptions, family_dtype, quiet_libraries, resolve_device, resolve_dtype, resolve_model

    quiet_libraries()
    info = describe(s.model)
    family = info.family
    if resolve_model(s.model).kind == "single_file":
        raise BatchError(f"bench compares sdbatch with from_pretrained: give it a diffusers folder, hub id or "
                         f"preset, not the single file {s.model}")
    device = resolve_device(s.device)
    s = resolve_settings(s, device, info)
    if s.width % info.multiple or s.height % info.multiple:
        raise BatchError(f"{s.model} draws sides that are multiples of {info.multiple}, got {s.width}x{s.height}")
    dtype = family_dtype(LoadOptions(device, resolve_dtype("auto", device), dtype_auto=True), family)  # as the runner's
    out.mkdir(parents=True, exist_ok=True)
    manifest = synthetic_manifest(out / "manifest", s, family)

    variants = [run_naive(manifest, s, dtype, out / "naive", family)]
    sdbatch, report = run_sdbatch(manifest, s, out / "sdbatch", "sdbatch", compile=False)
    variants.append(sdbatch)
    if s.compile:
        variants.append(run_sdbatch(manifest, s, out / "sdbatch-compile", "sdbatch-compile", compile=True)[0])

    flops = model_flops(s.model, s.width, s.height)
    evaluations = evaluations_per_image(family, s.steps, s.cfg)
    denoiser_flops, vae_flops = flops or (None, None)
    image_flops = None if flops is None else evaluations * denoiser_flops + vae_flops
    peak_rate = matmul_rate(device, dtype)
    best = max(variants[1:], key=lambda v: v.images_per_s)
    steady = _ratios(variants, "images_per_s")
    result = {
        "device": device,
        "gpu_name": devices.name(device),
        "model": s.model,
        "family": family.name,
        "denoiser": family.denoiser,
        "dtype": dtype,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "sdbatch": __version__,
                     "python": platform.python_version()},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {"width": s.width, "height": s.height, "steps": s.steps, "cfg": s.cfg, "images": s.images,
                     "mix": s.mix, "batch_size": s.batch_size or "auto", "compile": s.compile},
        "mix_modes": list(mix_modes(s.mix, family)),
        "variants": [asdict(v) for v in variants],
        "ratio_vs_naive": steady,  # kept for existing readers: the steady-state ratio
        "steady_state_ratio_vs_naive": steady,
        "end_to_end_ratio_vs_naive": _ratios(variants, "end_to_end_images_per_s"),
        "overhead_fraction": round(overhead_fraction(report), 4),
        # None where model_flops knows no inputs for the denoiser; "unet" names kept for existing readers,
        # the figures are the family's denoiser's (see "denoiser")
        "flops_per_image": image_flops,
        "unet_flops_per_eval": denoiser_flops,
        "vae_decode_flops": vae_flops,
        "matmul_flops_per_s": peak_rate,
        # significant digits, not decimals: a CPU's rate is a few hundredths of a TFLOP/s
        "unet_tflops_per_s": None if flops is None else
        float(f"{best.images_per_s * evaluations * denoiser_flops / 1e12:.4g}"),
        "flop_bound_images_per_s": None if flops is None else float(f"{peak_rate / image_flops:.4g}"),
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
    s, denoiser = result["settings"], {"unet": "UNet"}.get(result["denoiser"], result["denoiser"])
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
    ]
    if s["mix"] == "mixed" and len(result["mix_modes"]) < len(MIX_MODES):
        missing = [m for m in MIX_MODES if m not in result["mix_modes"]]
        lines.append(f"- Mix mixed: {' and '.join(result['mix_modes'])} only; the {result['family']} family has no "
                     f"{' or '.join(missing)}.")
    if result["flops_per_image"] is None:
        lines.append(f"- FLOP bound left out: the inputs of this model's {denoiser} are not known to bench.")
    else:
        lines += [
            f"- FLOPs per image: {result['flops_per_image'] / 1e12:.2f} TFLOP ({denoiser} "
            f"{result['unet_flops_per_eval'] / 1e12:.3f} per evaluation, VAE decode "
            f"{result['vae_decode_flops'] / 1e12:.3f}); matmul rate measured now: "
            f"{result['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s.",
            f"- FLOP bound: {result['flop_bound_images_per_s']:.3f} images/s; {denoiser} throughput of the best "
            f"variant: {result['unet_tflops_per_s']:.3f} TFLOP/s.",
        ]
    lines += [f"- sdbatch overhead (wall time outside model calls): {result['overhead_fraction'] * 100:.1f}%.", ""]
    return "\n".join(lines)
