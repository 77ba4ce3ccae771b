"""Find and load a model once, and build its pipeline family over one set of weights.

txt2img, img2img and image-prompt pipelines are `from_pipe` views: they hold the very
same UNet, VAE and text encoder objects, so a mixed manifest costs one copy in memory.
"""
from __future__ import annotations

import gc
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BatchError, ModelError
from .schedulers import build_scheduler

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
CLIP_VISION = "openai/clip-vit-large-patch14"  # SD 1.5's text encoder family; 768-d projection
_HUB_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def resolve_model(name: str) -> str:
    """A model name to what `from_pretrained` takes: a local folder or a hub id."""
    if name == "tiny":
        path = MODELS_DIR / "tiny"
        if not (path / "model_index.json").exists():
            raise ModelError(f"the embedded tiny model is missing at {path}; rebuild it with `python -m batch.tiny_model`")
        return str(path)
    if name == "sd15-random":
        raise ModelError("--model sd15-random is not supported yet (arrives with the real-model features)")
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "model_index.json").exists():
            raise ModelError(f"{path} is not a diffusers model folder (no model_index.json)")
        return str(path.resolve())
    if _HUB_ID.match(name):
        return name
    raise ModelError(f"model '{name}' is neither a folder that exists nor a hub id like 'org/name'")


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BatchError(f"--device {name}: no CUDA device is available here (use --device cpu)")
    if name != "cpu" and not name.startswith("cuda"):
        raise BatchError(f"--device {name}: use auto, cpu, cuda or cuda:N")
    return name


def resolve_dtype(name: str, device: str) -> str:
    if name == "auto":
        return "fp16" if device.startswith("cuda") else "fp32"
    if name not in DTYPES:
        raise BatchError(f"--dtype {name}: use auto, fp16, bf16 or fp32")
    return name


@dataclass
class PipelineFamily:
    """One model's loaded modules and the pipeline views that share them."""

    model: str
    device: str
    dtype: str
    txt2img: object
    img2img: object
    image_prompt: object
    load_s: float
    schedulers: dict = field(default_factory=dict)

    def view(self, mode: str):
        return {"txt2img": self.txt2img, "img2img": self.img2img, "image_prompt": self.image_prompt}[mode]

    def views(self) -> list:
        return [self.txt2img, self.img2img, self.image_prompt]

    def use_scheduler(self, name: str) -> None:
        """Switch every view to the named scheduler; built once per name, no weights touched."""
        if name not in self.schedulers:
            self.schedulers[name] = build_scheduler(name, self.txt2img.scheduler.config)
        for pipe in self.views():
            pipe.scheduler = self.schedulers[name]

    def unload(self) -> None:
        """Drop the modules so the next model has the memory."""
        import torch

        self.txt2img = self.img2img = self.image_prompt = None
        self.schedulers.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def quiet_libraries() -> None:
    """Our progress bar and log replace diffusers' and transformers' bars and warnings."""
    import transformers.utils.logging as transformers_logging

    transformers_logging.set_verbosity_error()  # before diffusers imports its pipelines, which warn
    transformers_logging.disable_progress_bar()
    import diffusers.utils.logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def load_family(model: str, device: str, dtype: str, need_image_encoder: bool = False) -> PipelineFamily:
    """Load the model's modules once and build the txt2img, img2img and image-prompt views."""
    import torch

    quiet_libraries()
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    source = resolve_model(model)
    torch_dtype = getattr(torch, DTYPES[dtype])
    started = time.perf_counter()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source, dtype=torch_dtype, safety_checker=None, requires_safety_checker=False,
            local_files_only=_offline(),
        )
    except (OSError, ValueError) as e:
        hint = " (offline: HF_HUB_OFFLINE is set and it is not in the cache)" if _offline() else ""
        raise ModelError(f"cannot load model '{model}'{hint}: {str(e).splitlines()[0]}") from None
    if need_image_encoder and pipe.image_encoder is None:
        _attach_clip_vision(pipe, torch_dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    family = PipelineFamily(
        model=model, device=device, dtype=dtype, txt2img=pipe,
        img2img=StableDiffusionImg2ImgPipeline.from_pipe(pipe),
        image_prompt=StableDiffusionPipeline.from_pipe(pipe),
        load_s=0.0,
    )
    for view in family.views():
        view.set_progress_bar_config(disable=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    family.load_s = time.perf_counter() - started
    log.info("loaded %s on %s (%s) in %.1fs", model, device, dtype, family.load_s)
    return family


def _attach_clip_vision(pipe, torch_dtype) -> None:
    """Models without an image encoder (SD 1.5) get CLIP ViT-L/14's for clip_embed rows."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(CLIP_VISION, dtype=torch_dtype, local_files_only=_offline())
        processor = CLIPImageProcessor.from_pretrained(CLIP_VISION, local_files_only=_offline())
    except OSError as e:
        raise ModelError(f"clip_embed rows need an image encoder; cannot load {CLIP_VISION}: {str(e).splitlines()[0]}") from None
    width = pipe.unet.config.cross_attention_dim
    if encoder.config.projection_dim != width:
        raise ModelError(f"{CLIP_VISION} projects to {encoder.config.projection_dim}, but the UNet expects {width}")
    pipe.register_modules(image_encoder=encoder, feature_extractor=processor)
