"""Generate one batch of images with a ready pipeline family.

Each image has its own seeded CPU generator, so its pixels do not depend on which
batch it landed in, nor on the device that draws the noise.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from collections import OrderedDict
from dataclasses import dataclass

from . import devices
from .models import PipelineFamily
from .plan import Batch


@dataclass(frozen=True)
class BatchOutput:
    """One batch's images in task order (None where that image failed) and where the time went."""

    images: list
    encode_s: float
    denoise_s: float
    decode_s: float
    errors: dict = dataclasses.field(default_factory=dict)  # task index -> error text
    notes: dict = dataclasses.field(default_factory=dict)  # task index -> metadata to record

    @property
    def seconds(self) -> float:
        return self.encode_s + self.denoise_s + self.decode_s


class _LRU(OrderedDict):
    """A bounded cache; `take` marks an entry as just used, so the least recently used goes first."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)

    def take(self, keys, compute) -> dict:
        """{key: value} for every key, computing the missing ones with `compute(list)` in one call.

        The answer is built before anything is evicted: putting one batch's new entries must
        never push out an entry the same batch still needs (a batch may even hold more
        distinct keys than the cache).
        """
        keys = list(dict.fromkeys(keys))
        found = {key: self[key] for key in keys if key in self}
        for key in found:
            self.move_to_end(key)
        missing = [key for key in keys if key not in found]
        if missing:
            found.update(zip(missing, compute(missing)))
            for key in missing:
                self.put(key, found[key])
        return found


class Conditioner:
    """Prompt embeddings (text, or CLIP image embeddings for clip_embed), cached by content.

    Repeated prompts and negatives — the common case in a manifest — are encoded once.
    """

    def __init__(self, family: PipelineFamily, cache_size: int = 2048):
        self.family = family
        self.text_cache = _LRU(cache_size)  # of one LoRA state (it may touch the text encoder)
        self.text_lora = None  # the family's `active_lora` the text cache was encoded under
        self.image_cache = _LRU(cache_size)
        self.ip_cache = _LRU(cache_size)

    def clear(self) -> None:
        """Drop every cached embedding (they live on the model's device)."""
        for cache in (self.text_cache, self.image_cache, self.ip_cache):
            cache.clear()

    def text(self, texts: list[str]):
        import torch

        def encode(missing: list[str]):
            pipe = self.family.txt2img
            embeds, _ = pipe.encode_prompt(missing, pipe._execution_device, 1, False)  # GPU even when offloaded
            return list(embeds)

        embeds = self.text_cache.take(texts, encode)
        return torch.stack([embeds[t] for t in texts])

    def _by_picture(self, jobs, cache: _LRU, encode) -> dict:
        """{prompt image sha: encode(its RGB image)} for the jobs' prompt images, each encoded once."""
        paths = {j.prompt_image_sha: j.prompt_image for j in jobs}
        return cache.take(list(paths), lambda shas: encode([read_rgb(paths[sha], "prompt_image") for sha in shas]))

    def clip_embeds(self, jobs):
        """clip_embed: the CLIP image embedding, repeated over the token sequence, as prompt embeddings."""
        import torch

        encoder, processor = self.family.clip_vision_encoder()

        def encode(pictures: list) -> list:
            pixels = processor(images=pictures, return_tensors="pt").pixel_values
            return list(encoder(pixels.to(encoder.device, encoder.dtype)).image_embeds)

        embeds = self._by_picture(jobs, self.image_cache, encode)
        pipe = self.family.image_prompt
        length = pipe.tokenizer.model_max_length
        stacked = torch.stack([embeds[j.prompt_image_sha] for j in jobs])
        return stacked.unsqueeze(1).expand(-1, length, -1).to(pipe.unet.dtype)

    def ip_embeds(self, jobs, guidance: bool) -> list:
        """ip_adapter: image embeddings per prompt image (computed once each), laid out as
        `ip_adapter_image_embeds` expects: [negatives; positives] under guidance.

        A plain IP-Adapter takes the pooled embedding; Plus and full-face take the image
        encoder's penultimate hidden states (one per image token), as diffusers'
        `prepare_ip_adapter_image_embeds` decides from the attached projection layer.
        """
        import torch
        from diffusers.models.embeddings import ImageProjection

        pipe = self.family.image_prompt
        if self.family.spec.ip_embeds_per_image:  # Flux: (B, 1, dim); a negative image prompt is the pipeline's
            embeds = self._by_picture(jobs, self.ip_cache, lambda pictures: [
                pipe.encode_image(picture, pipe._execution_device, 1) for picture in pictures])
            return [torch.stack([embeds[j.prompt_image_sha] for j in jobs])]
        hidden = not isinstance(pipe.unet.encoder_hid_proj.image_projection_layers[0], ImageProjection)

        def encode(pictures: list) -> list:
            return [pipe.encode_image(picture, pipe._execution_device, 1, output_hidden_states=hidden)
                    for picture in pictures]

        # Keyed by image alone: a family (and its Conditioner) has one adapter, so one kind.
        embeds = self._by_picture(jobs, self.ip_cache, encode)
        positive = torch.stack([embeds[j.prompt_image_sha][0] for j in jobs])
        if not guidance:
            return [positive]
        negative = torch.stack([embeds[j.prompt_image_sha][1] for j in jobs])
        return [torch.cat([negative, positive])]


def read_rgb(path: str, column: str):
    """An RGB image from disk; a file that stopped decoding since validation names itself."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as picture:
            # As diffusers' load_image: a phone JPEG's EXIF orientation is applied, not ignored.
            return ImageOps.exif_transpose(picture).convert("RGB")
    except Exception as e:  # PIL raises many types for damaged files
        raise ValueError(f"cannot read {column} {path}: {type(e).__name__}: {e}") from e


def _init_images(batch: Batch) -> list:
    from PIL import Image

    images = []
    for task in batch.tasks:
        job = task.job
        picture = read_rgb(job.init_image, "init_image")
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
    family.use_lora(job.lora, job.lora_scale)
    if conditioner.text_lora != family.active_lora:  # switched now, or deleted after the last group
        conditioner.text_cache.clear()
        conditioner.text_lora = family.active_lora
    if family.image_prompt is not None:
        family.use_ip_adapter(job.image_prompt_method == "ip_adapter", job.ip_scale)

    # 1. Conditioning: SD's cached here (per distinct prompt / prompt image); other families' in their pipeline
    started = time.perf_counter()
    if family.spec.encodes_prompts_here:
        options = _encoded_prompts(conditioner, batch)
    else:
        options = prompt_options(family.spec, [t.job for t in tasks], _parameters(pipe))
    if job.image_prompt_method == "ip_adapter":  # cfg <= 1: no unconditional pass (diffusers' rule)
        with torch.inference_mode():
            options["ip_adapter_image_embeds"] = conditioner.ip_embeds([t.job for t in tasks], job.cfg > 1.0)
    devices.synchronize(family.device)
    encoded = time.perf_counter()

    # 2. Denoising loop, inside the pipeline; latents out
    generators = [torch.Generator("cpu").manual_seed(t.seed) for t in tasks]
    options.update(num_inference_steps=steps or job.steps, guidance_scale=job.cfg, generator=generators,
                   output_type="latent" if family.spec.decodes_here else "pil")
    if job.mode == "img2img":
        options.update(image=_init_images(batch), strength=job.strength)  # resized to the row's size
    if job.mode != "img2img" or "height" in _parameters(pipe):  # Flux's img2img would draw at its default size
        options.update(width=job.width, height=job.height)
    if "use_resolution_binning" in _parameters(pipe):
        options["use_resolution_binning"] = False  # PixArt would otherwise draw at another size and resize
    latents = pipe(**options).images
    devices.synchronize(family.device)
    denoised = time.perf_counter()

    # 3. Decode, with the fp16 overflow guard
    if not family.spec.decodes_here:  # a family described only by AutoPipeline: its pipeline decodes, as it knows how
        images, errors, notes = list(latents), {}, {}
    else:
        if family.spec.packed_latents:
            latents = pipe._unpack_latents(latents, job.height, job.width, pipe.vae_scale_factor)
        images, errors, notes = decode(pipe, latents, safety_checker=family.options.safety_checker,
                                       upcast=family.spec.vae_force_upcast)
    devices.synchronize(family.device)
    decoded = time.perf_counter()
    return BatchOutput(images, encoded - started, denoised - encoded, decoded - denoised, errors, notes)


def _encoded_prompts(conditioner: Conditioner, batch: Batch) -> dict:
    """SD's prompt (or CLIP image) embeddings, from the cache."""
    import torch

    jobs = [t.job for t in batch.tasks]
    options = {}
    with torch.inference_mode():
        options["negative_prompt_embeds"] = conditioner.text([j.negative_prompt for j in jobs])
        if batch.job.image_prompt_method == "clip_embed":
            options["prompt_embeds"] = conditioner.clip_embeds(jobs)
        else:
            options["prompt_embeds"] = conditioner.text([j.prompt for j in jobs])
    return options


def prompt_options(spec, jobs: list, parameters: frozenset) -> dict:
    """The prompt arguments of a family whose pipeline encodes its prompts itself, with diffusers' own
    fallbacks filled in row by row (prompt_2 = prompt_2 or prompt), so a batch means what each row
    alone would; `parameters`: what the pipeline's call takes."""
    job = jobs[0]  # the batch key makes the rest agree on whether there is a negative pass
    options = {"prompt": [j.prompt for j in jobs]}
    if spec.takes("prompt_2"):
        options["prompt_2"] = [j.prompt_2 or j.prompt for j in jobs]
    negative = "negative_prompt" in parameters
    if spec.negative_needs_true_cfg:
        negative = bool(job.true_cfg and job.true_cfg > 1)
        if negative:
            options["true_cfg_scale"] = job.true_cfg
    elif spec.zero_empty_negative and not job.negative_prompt:
        negative = False  # zeros, as diffusers gives a call without a negative prompt
    if negative:
        options["negative_prompt"] = [j.negative_prompt for j in jobs]
        if spec.takes("negative_prompt_2"):
            options["negative_prompt_2"] = [j.negative_prompt_2 or j.negative_prompt for j in jobs]
    if job.max_sequence_length:
        options["max_sequence_length"] = job.max_sequence_length
    return options


@functools.lru_cache(maxsize=64)
def _call_parameters(cls) -> frozenset:
    return frozenset(inspect.signature(cls.__call__).parameters)


def _parameters(pipe) -> frozenset:
    return _call_parameters(type(pipe))


def _vae_decode(vae, latents):
    """Latents to pixels in [-1, 1], undoing the VAE's scaling as the family's pipeline does (SDXL's
    per-channel mean and std where the VAE has them; SD3's and Flux's shift). A seam the tests use to
    inject an fp16 overflow."""
    import torch

    config = vae.config
    latents = latents.to(vae.dtype)
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, len(mean), 1, 1)
        mean = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
    return vae.decode(latents, return_dict=False)[0]


def _finite(tensor):
    import torch

    return torch.isfinite(tensor.flatten(1)).all(dim=1)


def decode(pipe, latents, safety_checker: bool = False, upcast: bool = False) -> tuple[list, dict, dict]:
    """Latents to PIL images; non-finite results are decoded again in fp32.

    fp16 VAEs overflow on some latents (black or NaN images). Those images are decoded
    again in fp32 and the fact is recorded; an image that is still not finite fails.
    `upcast`: a family whose pipeline decodes in fp32 when the VAE asks (SDXL's force_upcast) does so here.
    Returns (images with None for failures, {index: error}, {index: metadata notes}).
    """
    import torch

    vae = pipe.vae
    errors, notes = {}, {}
    with torch.inference_mode():
        if upcast and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            pixels = _decode_fp32(vae, latents)
        else:
            pixels = _vae_decode(vae, latents)
        bad = ~(_finite(pixels) & _finite(latents))
        if bad.any():
            again = _decode_fp32(vae, latents[bad])
            pixels = pixels.float()
            pixels[bad] = again
            for index, ok in zip(bad.nonzero().flatten().tolist(), _finite(again).tolist()):
                if ok:
                    notes[index] = {"vae_fp32_redecode": True}
                else:
                    errors[index] = "non-finite output: the latents hold NaN/inf even in fp32 (try another seed, dtype or scheduler)"
        nsfw = [False] * len(pixels)
        if safety_checker and getattr(pipe, "safety_checker", None) is not None:
            pixels, flagged = pipe.run_safety_checker(pixels, pixels.device, pixels.dtype)
            nsfw = list(flagged) if flagged is not None else nsfw
            for index, flag in enumerate(nsfw):
                notes.setdefault(index, {})["nsfw"] = bool(flag)
        pixels = torch.nan_to_num(pixels.float())
    images = pipe.image_processor.postprocess(pixels, output_type="pil", do_denormalize=[not f for f in nsfw])
    return [None if i in errors else image for i, image in enumerate(images)], errors, notes


def _decode_fp32(vae, latents):
    """Decode in fp32, upcasting the VAE for the moment if it is half precision."""
    import torch

    dtype = vae.dtype
    if dtype == torch.float32:
        return _vae_decode(vae, latents.float()).float()
    vae.to(torch.float32)
    try:
        return _vae_decode(vae, latents.float()).float()
    finally:
        vae.to(dtype)


def warm_up(family: PipelineFamily, conditioner: Conditioner, batch: Batch) -> None:
    """One 1-step pass at the group's shape, so kernel selection stays out of the timings (the caller times it)."""
    job = batch.job
    if job.mode == "img2img":  # img2img runs int(steps * strength) steps: keep at least one
        batch = dataclasses.replace(batch, tasks=tuple(
            dataclasses.replace(t, job=dataclasses.replace(t.job, strength=1.0)) for t in batch.tasks))
    generate_batch(family, conditioner, batch, steps=1)
