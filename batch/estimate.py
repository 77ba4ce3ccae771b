"""A per-group VRAM estimate (weights + activations) from configs alone: no weights are loaded.

The activation terms are per-pixel coefficients for SD 1.5 at fp16 with PyTorch SDPA:
about 0.25 GB per UNet sample at 512x512 (CFG doubles the samples) and about 0.9 GB
per image for the VAE decoder, whose full-resolution up blocks are the peak of a
batched decode. They are deliberately a little pessimistic; the report puts the
measured peak beside the estimate so they can be recalibrated on each GPU.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .models import SD15_CONFIGS, LoadOptions, ModelSource, resolve_model

DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
SD15_PARAMS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
UNET_BYTES_PER_LATENT_PIXEL = 61_000  # per UNet sample at fp16, SD 1.5 widths (320 base channels)
VAE_BYTES_PER_PIXEL = 3_400  # per decoded image pixel at fp16, SD 1.5 widths (128 base channels)
OVERHEAD_BYTES = 300 * 2**20  # CUDA context is not counted by the allocator; this is scheduler, embeds, workspace


@dataclass(frozen=True)
class VramEstimate:
    weights_bytes: int
    unet_bytes: int
    vae_bytes: int
    total_bytes: int


def parameter_counts(source: ModelSource) -> tuple[dict[str, int], Path]:
    """Parameters per component and the folder of configs they describe (no tensors read)."""
    folder = Path(source.location)
    if source.kind in ("folder",) and (folder / "unet").is_dir():
        counts = {name: _safetensors_params(folder / name) for name in ("unet", "vae", "text_encoder", "image_encoder")}
        counts = {k: v for k, v in counts.items() if v}
        if counts.get("unet"):
            return counts, folder
    return dict(SD15_PARAMS), SD15_CONFIGS  # sd15-random, single files, hub ids: SD 1.5 sizes


def _safetensors_params(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors") if folder.is_dir() else []:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                count = 1
                for size in shape:
                    count *= size
                total += count
    return total


def _width(folder: Path, component: str, default: int) -> int:
    config = folder / component / "config.json"
    if not config.exists():
        return default
    return json.loads(config.read_text())["block_out_channels"][0]


def estimate(model: str, width: int, height: int, batch: int, cfg: float, options: LoadOptions) -> VramEstimate:
    """Peak GPU memory for one batch of a group: resident weights plus the larger activation peak."""
    counts, folder = parameter_counts(resolve_model(model))
    size = DTYPE_BYTES[options.dtype]
    weights = sum(counts.values()) * size
    if options.offload == "model":
        weights = max(counts.values()) * size  # one component on the GPU at a time
    elif options.offload == "sequential":
        weights = 200 * 2**20  # a few layers at a time
    scale = size / 2
    unet_scale = _width(folder, "unet", 320) / 320
    samples = batch * (2 if cfg > 1 else 1)
    unet = int(UNET_BYTES_PER_LATENT_PIXEL * unet_scale * samples * (width // 8) * (height // 8) * scale)
    if options.attention_slicing:
        unet = unet // 2
    decoded = 1 if options.vae_slicing else batch
    pixels = min(width * height, 512 * 512) if options.vae_tiling else width * height
    vae = int(VAE_BYTES_PER_PIXEL * _width(folder, "vae", 128) / 128 * decoded * pixels * scale)
    return VramEstimate(weights, unet, vae, weights + max(unet, vae) + OVERHEAD_BYTES)


def group_estimate(group, options: LoadOptions) -> VramEstimate:
    """The estimate for a plan group's largest batch."""
    batch = max(len(b.tasks) for b in group.batches)
    cfg = max(t.job.cfg for b in group.batches for t in b.tasks)
    return estimate(group.model, group.width, group.height, batch, cfg, options)
