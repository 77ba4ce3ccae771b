"""Generate one batch of images with a ready pipeline family.

Each image has its own seeded CPU generator, so its pixels do not depend on which
batch it landed in, nor on the device that draws the noise.
"""
from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from dataclasses import dataclass

from .models import PipelineFamily
from .plan import Batch


@dataclass(frozen=True)
class BatchOutput:
    """Decoded images of one batch (in task order) and where the time went."""

    images: list
    encode_s: float
    denoise_s: float
    decode_s: float

    @property
    def seconds(self) -> float:
        return self.encode_s + self.denoise_s + self.decode_s


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


class Conditioner:
    """Prompt embeddings (text, or CLIP image embeddings for clip_embed), cached by content.

    Repeated prompts and negatives — the common case in a manifest — are encoded once.
    """

    def __init__(self, family: PipelineFamily, cache_size: int = 2048):
        self.family = family
        self.text_cache = _LRU(cache_size)
        self.image_cache = _LRU(cache_size)

    def text(self, texts: list[str]):
        import torch

        missing = list(dict.fromkeys(t for t in texts if t not in self.text_cache))
        if missing:
            pipe = self.family.txt2img
            embeds, _ = pipe.encode_prompt(missing, pipe.device, 1, False)
            for text, embed in zip(missing, embeds):
                self.text_cache.put(text, embed)
        return torch.stack([self.text_cache[t] for t in texts])

    def images(self, jobs) -> object:
        """clip_embed: the image encoder's projected embedding, repeated over the token sequence."""
        import torch
        from PIL import Image

        pipe = self.family.image_prompt
        missing = list(dict.fromkeys((j.prompt_image_sha, j.prompt_image) for j in jobs if j.prompt_image_sha not in self.image_cache))
        if missing:
            pictures = []
            for _, path in missing:
                with Image.open(path) as picture:
                    pictures.append(picture.convert("RGB"))
            encoder = pipe.image_encoder
            pixels = pipe.feature_extractor(images=pictures, return_tensors="pt").pixel_values
            embeds = encoder(pixels.to(encoder.device, encoder.dtype)).image_embeds
            for (sha, _), embed in zip(missing, embeds):
                self.image_cache.put(sha, embed)
        length = pipe.tokenizer.model_max_length
        stacked = torch.stack([self.image_cache[j.prompt_image_sha] for j in jobs])
        return stacked.unsqueeze(1).expand(-1, length, -1).to(pipe.unet.dtype)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()  # a CPU-GPU sync point: only at stage boundaries, for honest timings


def _init_images(batch: Batch) -> list:
    from PIL import Image

    images = []
    for task in batch.tasks:
        job = task.job
        with Image.open(job.init_image) as picture:
            picture = picture.convert("RGB")
            if picture.size != (job.width, job.height):
                picture = picture.resize((job.width, job.height), Image.Resampling.LANCZOS)
            images.append(picture)
    return images


def generate_batch(family: PipelineFamily, conditioner: Conditioner, batch: Batch, steps: int | None = None) -> BatchOutput:
    """Denoise and decode one batch; `steps` overrides the rows' steps (warm-up)."""
    import torch

    job = batch.job
    tasks = batch.tasks
    pipe = family.view(job.mode)
    family.use_scheduler(job.scheduler)

    # 1. Conditioning (cached per distinct prompt / image)
    started = time.perf_counter()
    with torch.inference_mode():
        negative = conditioner.text([t.job.negative_prompt for t in tasks])
        if job.mode == "image_prompt":
            positive = conditioner.images([t.job for t in tasks])
        else:
            positive = conditioner.text([t.job.prompt for t in tasks])
    _sync(family.device)
    encoded = time.perf_counter()

    # 2. Denoising loop, inside the pipeline; latents out
    generators = [torch.Generator("cpu").manual_seed(t.seed) for t in tasks]
    options = dict(
        prompt_embeds=positive, negative_prompt_embeds=negative,
        num_inference_steps=steps or job.steps, guidance_scale=job.cfg,
        generator=generators, output_type="latent",
    )
    if job.mode == "img2img":
        options.update(image=_init_images(batch), strength=job.strength)
    else:
        options.update(width=job.width, height=job.height)
    latents = pipe(**options).images
    _sync(family.device)
    denoised = time.perf_counter()

    # 3. Decode
    images = decode(pipe, latents)
    _sync(family.device)
    decoded = time.perf_counter()
    return BatchOutput(images, encoded - started, denoised - encoded, decoded - denoised)


def decode(pipe, latents) -> list:
    """Latents to PIL images through the VAE."""
    import torch

    vae = pipe.vae
    with torch.inference_mode():
        pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(pixels, output_type="pil", do_denormalize=[True] * len(pixels))


def warm_up(family: PipelineFamily, conditioner: Conditioner, batch: Batch) -> float:
    """One 1-step pass at the group's shape, so kernel selection stays out of the timings."""
    started = time.perf_counter()
    job = batch.job
    if job.mode == "img2img":  # img2img runs int(steps * strength) steps: keep at least one
        batch = dataclasses.replace(batch, tasks=tuple(
            dataclasses.replace(t, job=dataclasses.replace(t.job, strength=1.0)) for t in batch.tasks))
    generate_batch(family, conditioner, batch, steps=1)
    return time.perf_counter() - started
