"""What differs between model families, in one place: the validator, planner, loader, generator,
writer and estimator all read a `Family` and never test a family's name themselves.

A model's family is read from its `model_index.json` (`_class_name`, as diffusers' AutoPipeline
does), from a single file's keys, or from a preset's description. `describe(model)` adds what is
read from the model's configs: the size it draws at, the multiple its sides must be, whether
Flux embeds guidance. Nothing here imports torch or diffusers: `validate` of a million rows
describes each model once, from JSON on disk.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError

T2I, I2I, IMAGE_PROMPT = "txt2img", "img2img", "image_prompt"
DDPM_SCHEDULERS = ("dpmpp_2m_karras", "dpmpp_2m", "euler", "euler_a", "ddim", "pndm", "lms", "unipc")
FLOW_SCHEDULERS = ("flow_euler", "flow_euler_karras")
OWN_SCHEDULER = "default"  # the scheduler the model ships, as its config says


@dataclass(frozen=True)
class Family:
    """One model family: its pipelines, what a row may ask of it, and its defaults."""

    name: str
    label: str
    pipelines: tuple[str, ...]  # model_index.json `_class_name`s of this family
    modes: tuple[str, ...]
    steps: int
    cfg: float
    scheduler: str
    schedulers: tuple[str, ...]  # names a row may ask for
    columns: tuple[str, ...] = ()  # optional columns beyond the common ones: prompt_2, true_cfg, ...
    image_prompt_methods: tuple[str, ...] = ()
    denoiser: str = "unet"  # the pipeline component that denoises: unet | transformer
    packed_latents: bool = False  # Flux: latents packed 2x2 into tokens, unpacked before the VAE
    encodes_prompts_here: bool = False  # SD: prompts encoded by sdbatch (cached, clip_embed); others: by the pipeline
    zero_empty_negative: bool = False  # SDXL's force_zeros_for_empty_prompt: no negative is not an empty negative
    vae_force_upcast: bool = False  # SDXL: an fp16 VAE whose config says force_upcast decodes in fp32
    negative_needs_true_cfg: bool = False  # Flux: negative prompts act only under true CFG
    max_sequence_length: int | None = None  # T5 families: the longest text a row may ask for
    cuda_dtype: str = "fp16"  # --dtype auto on CUDA
    guidance_label: str = "CFG scale"  # the A1111/Forge infotext name of `cfg`
    lora: bool = True
    single_file_config: str | None = None  # shipped config folder (under models/) for single files
    ip_adapter: str | None = None  # the IP-Adapter image_prompt rows use unless --ip-adapter says otherwise
    ip_image_encoder: str | None = None  # where the adapter's folder has no image_encoder/: this CLIP's (XLabs)
    ip_embeds_per_image: bool = False  # Flux: one embedding per image prompt (B, 1, dim), no negatives beside it
    safety_checker: bool = False  # the pipeline has SD's safety_checker / feature_extractor slots
    # Latents decoded by sdbatch (the fp16 overflow guard, decode timed apart); the `auto` family's pipelines
    # decode their own (packed, normalised or DC-AE latents differ from family to family).
    decodes_here: bool = True

    def takes(self, column: str) -> bool:
        return column in self.columns


SD = Family(
    "sd", "Stable Diffusion 1.x/2.x", ("StableDiffusionPipeline",), (T2I, I2I, IMAGE_PROMPT),
    steps=25, cfg=7.5, scheduler="dpmpp_2m_karras", schedulers=DDPM_SCHEDULERS + (OWN_SCHEDULER,),
    image_prompt_methods=("ip_adapter", "clip_embed"), encodes_prompts_here=True, single_file_config="sd15",
    safety_checker=True,
    ip_adapter="h94/IP-Adapter/models/ip-adapter_sd15.safetensors")
SDXL = Family(
    "sdxl", "Stable Diffusion XL", ("StableDiffusionXLPipeline",), (T2I, I2I, IMAGE_PROMPT),
    steps=30, cfg=5.0, scheduler="euler", schedulers=DDPM_SCHEDULERS + (OWN_SCHEDULER,),
    columns=("prompt_2", "negative_prompt_2"), zero_empty_negative=True, vae_force_upcast=True,
    single_file_config="sdxl", image_prompt_methods=("ip_adapter",),
    ip_adapter="h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors")
SD3 = Family(
    "sd3", "Stable Diffusion 3/3.5", ("StableDiffusion3Pipeline",), (T2I, I2I),
    steps=28, cfg=7.0, scheduler="flow_euler", schedulers=FLOW_SCHEDULERS + (OWN_SCHEDULER,),
    columns=("prompt_2", "negative_prompt_2", "max_sequence_length"), denoiser="transformer",
    max_sequence_length=512, cuda_dtype="bf16")
FLUX_DEV = Family(
    "flux-dev", "Flux.1 dev (guidance-distilled)", ("FluxPipeline",), (T2I, I2I, IMAGE_PROMPT),
    steps=28, cfg=3.5, scheduler="flow_euler", schedulers=FLOW_SCHEDULERS + (OWN_SCHEDULER,),
    columns=("prompt_2", "negative_prompt_2", "true_cfg", "max_sequence_length"), denoiser="transformer",
    packed_latents=True, negative_needs_true_cfg=True, max_sequence_length=512, cuda_dtype="bf16",
    guidance_label="Distilled CFG Scale", image_prompt_methods=("ip_adapter",),
    ip_adapter="XLabs-AI/flux-ip-adapter/ip_adapter.safetensors", ip_image_encoder="openai/clip-vit-large-patch14",
    ip_embeds_per_image=True)
FLUX_SCHNELL = Family(
    "flux-schnell", "Flux.1 schnell (timestep-distilled)", ("FluxPipeline",), (T2I, I2I, IMAGE_PROMPT),
    steps=4, cfg=0.0, scheduler="flow_euler", schedulers=FLOW_SCHEDULERS + (OWN_SCHEDULER,),
    columns=("prompt_2", "negative_prompt_2", "true_cfg", "max_sequence_length"), denoiser="transformer",
    packed_latents=True, negative_needs_true_cfg=True, max_sequence_length=256, cuda_dtype="bf16",
    image_prompt_methods=("ip_adapter",), ip_adapter="XLabs-AI/flux-ip-adapter/ip_adapter.safetensors",
    ip_image_encoder="openai/clip-vit-large-patch14", ip_embeds_per_image=True)
AUTO = Family(  # any other family AutoPipelineForText2Image maps (PixArt, Sana, AuraFlow, ...): txt2img as shipped
    "auto", "other AutoPipeline text-to-image family", (), (T2I,),
    steps=20, cfg=4.5, scheduler=OWN_SCHEDULER, schedulers=(OWN_SCHEDULER,), denoiser="transformer",
    cuda_dtype="bf16", lora=False, decodes_here=False)
FAMILIES = (SD, SDXL, SD3, FLUX_DEV, FLUX_SCHNELL, AUTO)
BY_NAME = {f.name: f for f in FAMILIES}
# Extra columns any family may take; validation refuses them on the others by name.
FAMILY_COLUMNS = ("prompt_2", "negative_prompt_2", "true_cfg", "max_sequence_length")


@dataclass(frozen=True)
class ModelInfo:
    """A model's family and the facts its configs give: the size it draws at, the multiple its sides must be."""

    family: Family
    pipeline: str  # model_index.json `_class_name` (or the family's own for single files and presets)
    size: int  # pixels per side of rows that give no width or height, as diffusers' pipelines default
    multiple: int  # each side must be a multiple of this (the VAE's scale, times the patch for transformers)
    cross_attention_dim: int | None = None  # UNet families: what a LoRA's text projections must match
    max_side: int | None = None  # SD3: its position embeddings cover this many pixels a side


def family_of_pipeline(class_name: str, transformer: dict | None = None) -> Family:
    """The family of a `model_index.json` `_class_name` (plus Flux's transformer config: dev or schnell)."""
    base = class_name.removesuffix("Img2ImgPipeline").removesuffix("Pipeline") + "Pipeline"
    for family in (SD, SDXL, SD3):
        if base in family.pipelines:
            return family
    if base == "FluxPipeline":
        return FLUX_DEV if (transformer or {}).get("guidance_embeds", True) else FLUX_SCHNELL
    if _auto_text2image(class_name):
        return AUTO
    raise ModelError(f"pipeline {class_name} is not a text-to-image family diffusers' AutoPipelineForText2Image "
                     "maps; sdbatch runs SD 1.x/2.x, SDXL, SD3, Flux.1 and the other AutoPipeline families")


def _auto_text2image(class_name: str) -> bool:
    from diffusers.pipelines.auto_pipeline import AUTO_TEXT2IMAGE_PIPELINES_MAPPING

    return any(cls.__name__ == class_name for cls in AUTO_TEXT2IMAGE_PIPELINES_MAPPING.values())


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def describe_folder(folder: Path, family: Family | None = None) -> ModelInfo:
    """A diffusers folder (or a folder of configs only) described from its JSON files."""
    index = _read(folder / "model_index.json")
    if index is None:
        raise ModelError(f"{folder}: no readable model_index.json")
    transformer = _read(folder / "transformer" / "config.json") or {}
    family = family or family_of_pipeline(index.get("_class_name", ""), transformer)
    unet = _read(folder / "unet" / "config.json") or {}
    vae = _read(folder / "vae" / "config.json") or {}
    scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    if family.denoiser == "unet":
        size, patch = unet.get("sample_size", 64) * scale, 1
    elif family.packed_latents:
        size, patch = 128 * scale, 2  # FluxPipeline's default_sample_size; 2x2 packing
    else:
        size, patch = transformer.get("sample_size", 128) * scale, transformer.get("patch_size", 1)
    size = size if isinstance(size, int) else 64 * scale  # a sample_size given as [h, w]
    dim = unet.get("cross_attention_dim")
    positions = transformer.get("pos_embed_max_size")
    return ModelInfo(family, index.get("_class_name", family.pipelines[0] if family.pipelines else ""),
                     size, math.lcm(8, scale * patch), dim if isinstance(dim, int) else None,
                     positions * patch * scale if isinstance(positions, int) else None)


SINGLE_FILE_KEYS = (  # a key only that family's original-layout checkpoints hold, as diffusers' infer_diffusers_model_type reads them
    ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", SDXL),
    ("model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight", SD3),
    ("double_blocks.0.img_attn.norm.key_norm.scale", FLUX_DEV),
    ("model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale", FLUX_DEV),
    ("model.diffusion_model.input_blocks.0.0.weight", SD),
    ("conv_in.weight", SD),  # a UNet saved alone, diffusers-named (the tiny model's single file)
)


def single_file_family(path: Path) -> Family:
    """A single file's family, from its keys (.ckpt would need unpickling: SD 1.x is assumed)."""
    if path.suffix.lower() != ".safetensors":
        return SD
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    for key, family in SINGLE_FILE_KEYS:
        if key in keys:
            if family is FLUX_DEV and not any(k.endswith("guidance_in.in_layer.weight") for k in keys):
                return FLUX_SCHNELL
            return family
    raise ModelError(f"{path}: not a checkpoint of a family sdbatch knows (SD 1.x/2.x, SDXL, SD3, Flux.1): "
                     "no UNet or transformer keys found")


@functools.lru_cache(maxsize=None)  # asked for every row; configs do not change during a run
def describe(model: str) -> ModelInfo:
    """The model's family and size facts, from its configs on disk; SD 1.5's for what cannot be read yet
    (a hub id not downloaded: its run downloads the configs and says what it loaded). Never raises for a
    model that cannot be found: resolving the model says so."""
    from .models import MODELS_DIR, PRESET_FOLDERS, single_file_config

    if model in PRESET_FOLDERS:
        return describe_folder(MODELS_DIR / PRESET_FOLDERS[model])
    path = Path(model).expanduser()
    try:
        if path.is_dir():
            return describe_folder(path)
        if path.is_file():
            family = single_file_family(path)
            return describe_folder(single_file_config(path, family), family)
        folder = _hub_snapshot(model)
        if folder is not None:
            return describe_folder(folder)
    except ModelError:
        pass  # the run's model check reports it
    return ModelInfo(SD, "StableDiffusionPipeline", 512, 8, 768)


def _hub_snapshot(model: str) -> Path | None:
    """The snapshot folder of a hub model's configs: from the cache, or (online) fetched, JSON files only."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    from .models import HUB_ID, _offline, check_hub_model

    if not HUB_ID.fullmatch(model):
        return None
    if not _offline():
        check_hub_model(model)  # a model the Hub does not have, or no Hub: the run's model check says so
    folder = None
    for name in ("model_index.json", "unet/config.json", "transformer/config.json", "vae/config.json"):
        found = try_to_load_from_cache(model, name)
        if not isinstance(found, str) and not _offline():
            try:
                found = hf_hub_download(model, name)
            except Exception:  # no such file in this model (a UNet family has no transformer), or no network
                found = None
        if name == "model_index.json":
            if not isinstance(found, str):
                return None
            folder = Path(found).parent
    return folder
