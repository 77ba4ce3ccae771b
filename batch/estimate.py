"""A per-group VRAM estimate (weights + activations) from configs alone: no weights are loaded.

Weights: each component's parameter count, from the safetensors headers of a folder's weights, else
from its configs (built on the meta device: presets, configs-only folders), times the dtype's bytes.
Hub ids are read from the Hugging Face cache; single files and anything unread count as SD 1.5.

Activations: the larger of the denoiser's and the VAE decoder's peak (they never run together).
Every coefficient is for 2-byte elements (fp16/bf16, PyTorch SDPA) and scales with the element size.

- UNet families (SD 1.x/2.x, SDXL): 61 kB per latent pixel per UNet sample at SD 1.5's 320 base
  channels, scaled by the UNet's base width: about 0.25 GB per sample at 512x512, 1 GB for SDXL at
  1024x1024. CFG doubles the samples. Calibrated on SD 1.5; SDXL's is the same rule, not a measurement.
- Transformer families (Flux, SD3, PixArt, ...): 40 bytes per token per hidden channel per sample:
  about 20 hidden-size tensors alive at a block's peak (Flux's single block holds the 4x MLP branch
  and its GELU, q/k/v, the attention output and their 5x concatenation; attention itself is SDPA,
  no token x token matrix). Tokens are the image's (width/16)*(height/16) (latents at /8, packed or
  patchified 2x2) plus, for joint-attention families, the text tokens: Flux's T5 max_sequence_length
  (512), SD3's 77 CLIP + 256 T5. Flux.1-dev at 1024x1024: 4608 tokens x 3072 channels, 0.57 GB.
  CFG doubles the samples, except Flux's: its guidance is embedded, and true CFG runs the negative
  prompt as a second call of the same size. From counting the forward, not measured.
- VAE decoder: 2.1 kB per output pixel per image at 128 base channels (SD 1.x, SDXL, SD3 and Flux
  VAEs all have 128): 0.55 GB at 512x512, 2.2 GB at 1024x1024. Sources: the vae-tile-infer
  benchmark of the same decoder in fp16 (github.com/Kahsolt/stable-diffusion-webui-vae-tile-infer:
  2616 MB at 512x512, 10266 MB at 2048x2048 on an RTX 3060, 2.04 kB per added pixel) and Hugging
  Face's "Exploring simple optimizations for SDXL" (A100, 4 images at 1024x1024, fp32 28.1 GB and
  fp16 21.7 GB peak, both at the fp32 decode: 1.7-1.9 kB per pixel at 2 bytes). SDXL's pipeline
  decodes an fp16 VAE whose config says force_upcast in fp32: twice the bytes, plus its fp32 weights.

Totals against published peaks (batch 1, 1024x1024): SDXL fp16 11.0 GiB (published 10-12 GB),
Flux.1-dev bf16 with T5 resident 33.8 GiB (33-35 GB; its weights alone are 31.4 GiB). Every
coefficient is to be calibrated on a GPU: the report puts each group's measured peak beside the
estimate for that.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .families import describe
from .models import SD15_CONFIGS, LoadOptions, ModelSource, config_folder, family_dtype, resolve_model
from .presets import parameter_counts as config_parameter_counts

DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
UNET_BYTES_PER_LATENT_PIXEL = 61_000  # per UNet sample at 2 bytes, SD 1.5 widths (320 base channels)
TRANSFORMER_BYTES_PER_TOKEN_CHANNEL = 40  # per token, per hidden channel, per sample at 2 bytes
VAE_BYTES_PER_PIXEL = 2_100  # per decoded image pixel at 2 bytes, 128 base channels
# Text tokens in the denoiser's sequence (joint attention): CLIP's, and T5's default max_sequence_length
JOINT_TEXT_TOKENS = {"FluxPipeline": (0, 512), "StableDiffusion3Pipeline": (77, 256)}
OVERHEAD_BYTES = 300 * 2**20  # CUDA context is not counted by the allocator; this is scheduler, embeds, workspace


@dataclass(frozen=True)
class VramEstimate:
    weights_bytes: int
    unet_bytes: int  # the denoiser's activations: UNet or transformer
    vae_bytes: int
    total_bytes: int


def parameter_counts(source: ModelSource) -> tuple[dict[str, int], Path]:
    """Parameters per component of a model and the folder of configs that describe it (no tensors read)."""
    folder = _config_folder(source)
    counts = config_parameter_counts(folder)
    if not counts.keys() & {"unet", "transformer"}:  # a hub snapshot without its denoiser's config yet
        return config_parameter_counts(SD15_CONFIGS), SD15_CONFIGS
    if source.kind in ("folder", "hub"):  # weights on disk: their headers are the truth
        counts |= {name: n for name in counts if (n := _safetensors_params(folder / name))}
    return counts, folder


def _config_folder(source: ModelSource) -> Path:
    if source.kind == "single_file":
        return SD15_CONFIGS  # single files are estimated at SD 1.5's sizes (their own configs: to do)
    return config_folder(source.name) or SD15_CONFIGS  # hub ids not in the cache: SD 1.5 sizes


def _safetensors_params(folder: Path) -> int:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    plain = [f for f in files if "." not in f.stem]  # x.fp16.safetensors is a variant of x.safetensors: count one
    total = 0
    for file in plain or files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                count = 1
                for size in shape:
                    count *= size
                total += count
    return total


def _config(folder: Path, component: str) -> dict:
    return json.loads((folder / component / "config.json").read_text())


def _pipeline_class(folder: Path) -> str:
    """model_index.json's `_class_name`: the family, as diffusers' AutoPipeline reads it."""
    return json.loads((folder / "model_index.json").read_text()).get("_class_name", "")


def estimate(model: str, width: int, height: int, batch: int, cfg: float, options: LoadOptions, *,
             max_sequence_length: int | None = None) -> VramEstimate:
    """Peak GPU memory for one batch of a group: resident weights plus the larger activation peak.

    `max_sequence_length`: the rows' T5 text length (None: the pipeline's default).
    """
    counts, folder = parameter_counts(resolve_model(model))
    pipeline = _pipeline_class(folder)
    dtype = family_dtype(options, describe(model).family)  # --dtype auto: bf16 for SD3/Flux on CUDA
    size = DTYPE_BYTES[dtype]
    weights = sum(counts.values()) * size
    if options.offload == "model":
        weights = max(counts.values()) * size  # one component on the GPU at a time
    elif options.offload == "sequential":
        weights = 200 * 2**20  # a few layers at a time
    scale = size / 2
    samples = batch * (2 if cfg > 1 and not pipeline.startswith("Flux") else 1)
    if "unet" in counts:
        unet_scale = _config(folder, "unet")["block_out_channels"][0] / 320
        denoiser = int(UNET_BYTES_PER_LATENT_PIXEL * unet_scale * samples * (width // 8) * (height // 8) * scale)
        if options.attention_slicing:
            denoiser //= 2
    else:
        transformer = _config(folder, "transformer")
        hidden = transformer["num_attention_heads"] * transformer["attention_head_dim"]
        clip, t5 = JOINT_TEXT_TOKENS.get(pipeline, (0, 0))
        tokens = (width // 16) * (height // 16) + (clip + (max_sequence_length or t5) if t5 else 0)
        denoiser = int(TRANSFORMER_BYTES_PER_TOKEN_CHANNEL * hidden * tokens * samples * scale)
    vae_config = _config(folder, "vae")
    upcast = pipeline.startswith("StableDiffusionXL") and vae_config.get("force_upcast") and dtype == "fp16"
    decoded = 1 if options.vae_slicing else batch
    tile = int(vae_config.get("sample_size", 512))  # diffusers decodes tiles of the VAE's sample size
    pixels = min(width * height, tile * tile) if options.vae_tiling else width * height
    vae_width = vae_config["block_out_channels"][0] / 128
    vae = int(VAE_BYTES_PER_PIXEL * vae_width * decoded * pixels * (2 if upcast else scale))
    if upcast:
        vae += counts["vae"] * 2  # the VAE's weights in fp32 while it decodes
    return VramEstimate(weights, denoiser, vae, weights + max(denoiser, vae) + OVERHEAD_BYTES)


def group_estimate(group, options: LoadOptions) -> VramEstimate:
    """The estimate for a plan group's largest batch."""
    jobs = [t.job for b in group.batches for t in b.tasks]
    batch = max(len(b.tasks) for b in group.batches)
    tokens = max(j.max_sequence_length or 0 for j in jobs) or None
    return estimate(group.model, group.width, group.height, batch, max(j.cfg for j in jobs), options,
                    max_sequence_length=tokens)
