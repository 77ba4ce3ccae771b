"""Train the embedded `tiny` model on the drawn world, from scratch, on a CPU.

    python -m batch.toy.train                 # writes models/tiny and models/tiny-ip-adapter
    python -m batch.toy.train --out /tmp/tiny --scale 0.1   # a quick trial at a tenth of the steps

Every component is a real diffusers / transformers class, saved as an ordinary diffusers
folder that `StableDiffusionPipeline.from_pretrained` loads. Stages, each with fixed seeds:

1. data: drawings of coloured shapes with their captions (`batch.toy.world`);
2. VAE (`AutoencoderKL`, x8 like SD) on crops: reconstruction, a little KL;
3. latents of every drawing, once;
4. text encoder + UNet + a CLIP vision encoder together: the noise-prediction loss, with the
   UNet conditioned on the caption (words dropped at times, so "red" alone and "" mean
   something: classifier-free guidance and negative prompts) and at times on the drawing's
   own image embedding repeated over the tokens (what `clip_embed` rows feed it), plus a
   CLIP contrastive loss between image and caption embeddings (a mini-CLIP);
5. an IP-Adapter (image projection + to_k_ip/to_v_ip), everything else frozen;
6. save the pipeline folder and the adapter; sizes and times are logged.

OUT is replaced only by a whole new model: it must be empty, absent or an earlier output of
this recipe (a folder holding nothing else, with its `training.json`), anything else is refused
before training starts. Both are written to a temp folder beside OUT and renamed into place
once every stage has succeeded, so a failure leaves the earlier model and adapter as they were.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import BatchError
from ..writer import write_atomic
from .clip import contrastive_loss

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
IP_ADAPTER_NAME = "ip-adapter_tiny.safetensors"
MARKER = "training.json"  # written last into every model this recipe saves: its summary
# what a saved model folder holds (save_pretrained's components, the index, the marker)
MODEL_ENTRIES = {"model_index.json", MARKER, "feature_extractor", "image_encoder", "scheduler", "text_encoder",
                 "tokenizer", "unet", "vae"}


@dataclass(frozen=True)
class TrainConfig:
    """Sizes, steps and rates; the defaults make the shipped model (about 40 minutes on 2 cores)."""

    seed: int = 0
    images: int = 3600  # drawings to learn from: 300 per (colour, shape)
    size: int = 128  # pixels; latents are size / 8
    width: int = 64  # text hidden size = UNet cross-attention width = image-embedding width
    # VAE
    vae_channels: tuple = (16, 32, 64, 64)  # 4 blocks = 3 downsamplings: x8 as SD
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_crop: int = 64  # fully convolutional: crops teach edges and flat areas at a quarter of the cost
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6  # keep latents near a Gaussian, as SD's VAE, without blurring edges
    # UNet + text encoder + vision encoder
    unet_channels: tuple = (32, 64)  # ~1M parameters: self-attention only at 8x8, where it is cheap
    steps: int = 6000
    batch: int = 32
    lr: float = 5e-4
    snr_gamma: float = 5.0  # min-SNR weighting: converges in fewer steps
    ema: float = 0.999  # sample with an exponential moving average of the weights: far steadier under guidance
    drop_caption: float = 0.15  # "" instead of the caption: the unconditional half of guidance
    partial_caption: float = 0.2  # "red" or "circle" alone: negative prompts can name one attribute
    image_condition: float = 0.25  # condition on the repeated image embedding instead (clip_embed rows)
    clip_weight: float = 0.5  # contrastive loss between image and caption embeddings
    # a wrong caption at low noise, where the pixels already say what is drawn: img2img at low strength
    # keeps its init image under any prompt, instead of repainting it (a case training never showed)
    mismatch: float = 0.25
    mismatch_below: int = 450  # timesteps
    # at every noise level, a full caption names another drawing this often, as web captions do: the
    # conditional model alone then follows its prompt only as often as its captions were right, and
    # classifier-free guidance (which divides out what any caption would draw) has something to recover
    label_noise: float = 0.3
    # what a wrong caption gets wrong. ("shape",) alone was tried: img2img at 0.8 then followed a prompt's colour
    # 40/48 (this recipe: 24/48), but shapes came out weaker at CFG 7.5 and the LoRA lesson failed (diamond 2/12)
    label_noise_attributes: tuple = ("colour", "shape")
    # IP-Adapter
    ip_steps: int = 1500
    ip_tokens: int = 4
    ip_lr: float = 1e-3
    ip_text: float = 0.3  # the caption beside the image prompt; otherwise "" (the image alone must do)
    ip_drop: float = 0.1  # zero image embedding: the unconditional image prompt under guidance

    def scaled(self, factor: float) -> "TrainConfig":
        """The same recipe with `factor` times the steps (a quick trial)."""
        from dataclasses import replace

        steps = {name: max(1, int(getattr(self, name) * factor)) for name in ("vae_steps", "steps", "ip_steps")}
        return replace(self, **steps)


# --- 1. data -------------------------------------------------------------------------------------

def make_data(config: TrainConfig):
    """(pixels in [-1, 1] as a float tensor N x 3 x S x S, scenes, PIL images)."""
    import numpy as np
    import torch

    from .world import dataset

    drawn = list(dataset(config.images, seed=config.seed, size=config.size))
    pixels = torch.from_numpy(np.stack([np.asarray(image, dtype=np.uint8) for image, _, _ in drawn]))
    pixels = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels, [scene for _, _, scene in drawn], [image for image, _, _ in drawn]


# --- 2. VAE --------------------------------------------------------------------------------------

def build_vae(config: TrainConfig):
    from diffusers import AutoencoderKL

    channels = config.vae_channels
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels, norm_num_groups=8, sample_size=config.size,
    )


def train_vae(vae, pixels, config: TrainConfig) -> None:
    import torch

    generator = torch.Generator().manual_seed(config.seed + 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.vae_steps)
    vae.train()
    crop, started = config.vae_crop, time.perf_counter()
    for step in range(config.vae_steps):
        index = torch.randint(len(pixels), (config.vae_batch,), generator=generator)
        y, x = (int(v) for v in torch.randint(config.size - crop + 1, (2,), generator=generator))
        batch = pixels[index, :, y : y + crop, x : x + crop]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        loss = (recon - batch).abs().mean() + ((recon - batch) ** 2).mean() + config.vae_kl * posterior.kl().mean()
        _optimise(loss, optimizer, schedule)
        _progress("vae", step, config.vae_steps, loss.item(), started)
    vae.eval()


def make_posterior_deterministic(vae) -> None:
    """Pin the VAE posterior's log-variance to its floor, so an encoded image is its mean.

    The diffusion model learns from posterior means; diffusers' img2img encodes its init
    image with `latent_dist.sample()`, which would otherwise add the posterior's noise
    (std ~0.07 of the latent spread here) on top of the schedule's.
    """
    import torch

    with torch.no_grad():
        logvar = slice(vae.config.latent_channels, None)  # quant_conv's outputs: [mean, logvar]
        vae.quant_conv.weight[logvar] = 0.0
        vae.quant_conv.bias[logvar] = -30.0  # DiagonalGaussianDistribution clamps log-variance at -30


def encode_latents(vae, pixels, batch: int = 64):
    """Latent means of every drawing, and the scaling factor that gives them unit variance (SD: 0.18215)."""
    import torch

    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i : i + batch]).latent_dist.mode() for i in range(0, len(pixels), batch)])
    scaling = float(1.0 / latents.std())
    return latents * scaling, scaling


# --- 4. text encoder, UNet, vision encoder --------------------------------------------------------

def build_text_encoder(tokenizer, config: TrainConfig):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        hidden_size=config.width, intermediate_size=config.width * 2, num_attention_heads=4, num_hidden_layers=3,
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length, projection_dim=config.width,
        hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


def build_unet(config: TrainConfig):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=config.size // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=config.unet_channels,
        # attention at the coarsest level only: at 16x16 it would cost more than the rest of the UNet
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(config.unet_channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(config.unet_channels) - 1) + ("UpBlock2D",),
        cross_attention_dim=config.width, attention_head_dim=4, norm_num_groups=32)


def build_vision(config: TrainConfig):
    """A small CLIP vision tower; its projection is the image embedding, as wide as the text."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    side = config.size // 2
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=config.width, intermediate_size=config.width * 2, num_hidden_layers=3, num_attention_heads=4,
        image_size=side, patch_size=8, projection_dim=config.width, hidden_act="quick_gelu"))
    processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": side}, resample=3, do_center_crop=True,
        crop_size={"height": side, "width": side}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True)
    return encoder, processor


def caption_choices(scene) -> list[str]:
    """The caption and its one-attribute forms, for dropout."""
    return [f"a {scene.colour} {scene.shape}", scene.colour, scene.shape, ""]


def pick_caption(scene, rng: random.Random, config: TrainConfig) -> str:
    full, colour, shape, empty = caption_choices(scene)
    draw = rng.random()
    if draw < config.drop_caption:
        return empty
    if draw < config.drop_caption + config.partial_caption:
        return colour if rng.random() < 0.5 else shape
    return full


def noisy_caption(scene, rng: random.Random, config: TrainConfig) -> str:
    """`pick_caption`, except that a full caption names another (colour, shape) `label_noise` of the time."""
    from .world import COLOURS, SHAPES

    caption = pick_caption(scene, rng, config)
    if caption != caption_choices(scene)[0] or rng.random() >= config.label_noise:
        return caption
    colours = sorted(COLOURS) if "colour" in config.label_noise_attributes else [scene.colour]
    shapes = sorted(SHAPES) if "shape" in config.label_noise_attributes else [scene.shape]
    others = [(c, s) for c in colours for s in shapes if (c, s) != (scene.colour, scene.shape)]
    return "a {} {}".format(*rng.choice(others))


def mismatched_caption(scene, rng: random.Random) -> str:
    """A full caption that names another colour and another shape than the drawing's."""
    from .world import COLOURS, SHAPES

    colour = rng.choice([c for c in sorted(COLOURS) if c != scene.colour])
    shape = rng.choice([s for s in sorted(SHAPES) if s != scene.shape])
    return f"a {colour} {shape}"


def train_main(text_encoder, unet, vision, tokenizer, latents, clip_pixels, scenes, config: TrainConfig) -> None:
    """Noise prediction on captions or image embeddings, plus the mini-CLIP loss."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    noise_schedule = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    snr = _snr(noise_schedule)
    rng = random.Random(config.seed + 2)
    generator = torch.Generator().manual_seed(config.seed + 2)
    text_projection = torch.nn.Linear(config.width, config.width, bias=False)  # CLIP's; training only
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    parameters = [*text_encoder.parameters(), *unet.parameters(), *vision.parameters(),
                  *text_projection.parameters(), logit_scale]
    ema = Ema([*text_encoder.parameters(), *unet.parameters(), *vision.parameters()], config.ema)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=1e-2)
    warmup = max(1, config.steps // 50)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / config.steps)))
    for module in (text_encoder, unet, vision):
        module.train()
    started = time.perf_counter()
    for step in range(config.steps):
        index = torch.randint(len(latents), (config.batch,), generator=generator)
        t = torch.randint(noise_schedule.config.num_train_timesteps, (config.batch,), generator=generator)
        captions = [mismatched_caption(scenes[i], rng) if t_i < config.mismatch_below and rng.random() < config.mismatch
                    else noisy_caption(scenes[i], rng, config) for i, t_i in zip(index.tolist(), t.tolist())]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        text = text_encoder(ids)
        hidden = text.last_hidden_state
        image_embeds = vision(pixel_values=clip_pixels[index]).image_embeds
        # clip_embed rows: the image embedding repeated over the tokens stands for the prompt
        use_image = torch.rand(config.batch, generator=generator) < config.image_condition
        repeated = image_embeds[:, None, :].expand(-1, hidden.shape[1], -1)
        condition = torch.where(use_image[:, None, None], repeated, hidden)

        diffusion = denoising_loss(unet, noise_schedule, snr, latents[index], generator, config, t=t,
                                   encoder_hidden_states=condition)

        # mini-CLIP on true full captions only (a single word or "" describes several drawings)
        full = torch.tensor([c == caption_choices(scenes[i])[0] for i, c in zip(index.tolist(), captions)])
        clip = torch.zeros(())
        if full.sum() > 1:
            image = F.normalize(image_embeds[full], dim=-1)
            words = F.normalize(text_projection(text.pooler_output[full]), dim=-1)
            logits = logit_scale.exp().clamp(max=100) * image @ words.T
            clip = contrastive_loss(logits, [captions[i] for i in full.nonzero().flatten().tolist()])
        loss = diffusion + config.clip_weight * clip
        _optimise(loss, optimizer, schedule, ema, clip_parameters=parameters)
        _progress("unet", step, config.steps, loss.item(), started)
    ema.copy_to()
    for module in (text_encoder, unet, vision):
        module.eval()


def _snr(noise_schedule):
    alphas = noise_schedule.alphas_cumprod
    return alphas / (1 - alphas)


def denoising_loss(unet, noise_schedule, snr, x0, generator, config: TrainConfig, t=None, **conditioning):
    """v-prediction loss with min-SNR-γ weights, over random timesteps.

    v (SD 2's parameterisation) keeps the high-noise steps, where colour and layout are
    decided, well conditioned for a small model; ε-prediction amplifies their errors.
    """
    import torch

    noise = torch.randn(x0.shape, generator=generator)
    if t is None:
        t = torch.randint(noise_schedule.config.num_train_timesteps, (len(x0),), generator=generator)
    noisy = noise_schedule.add_noise(x0, noise, t)
    predicted = unet(noisy, t, **conditioning).sample
    target = noise_schedule.get_velocity(x0, noise, t)
    weight = torch.clamp(snr[t], max=config.snr_gamma) / (snr[t] + 1)
    return (weight * ((predicted - target) ** 2).mean(dim=(1, 2, 3))).mean()


class Ema:
    """An exponential moving average of parameters; `copy_to` puts it in the modules at the end."""

    def __init__(self, parameters, decay: float):
        self.parameters = list(parameters)
        self.shadow = [p.detach().clone() for p in self.parameters]
        self.decay, self.steps = decay, 0

    def update(self) -> None:
        import torch

        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))  # short memory while weights move fast
        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, [p.detach() for p in self.parameters], 1 - decay)

    def copy_to(self) -> None:
        import torch

        with torch.no_grad():
            for p, s in zip(self.parameters, self.shadow):
                p.copy_(s)


# --- 5. IP-Adapter -------------------------------------------------------------------------------

def attach_ip_adapter(pipe, config: TrainConfig) -> dict:
    """Attach a fresh IP-Adapter through diffusers' own loader; returns its trainable modules by name."""
    import torch

    unet = pipe.unet
    width = config.width
    generator = torch.Generator().manual_seed(config.seed + 3)
    flat = {
        "image_proj.proj.weight": torch.randn(config.ip_tokens * width, width, generator=generator) * width ** -0.5,
        "image_proj.proj.bias": torch.zeros(config.ip_tokens * width),
        "image_proj.norm.weight": torch.ones(width),
        "image_proj.norm.bias": torch.zeros(width),
    }
    for key_id, name, hidden in _ip_layers(unet):
        for part in ("to_k_ip", "to_v_ip"):
            flat[f"ip_adapter.{key_id}.{part}.weight"] = torch.randn(hidden, width, generator=generator) * 0.02
    from ..adapters import nest_ip_adapter

    pipe.load_ip_adapter(nest_ip_adapter(flat), subfolder="", weight_name="", image_encoder_folder=None)
    pipe.set_ip_adapter_scale(1.0)
    return {"image_proj": unet.encoder_hid_proj, **{name: unet.attn_processors[name] for _, name, _ in _ip_layers(unet)}}


def _ip_layers(unet):
    """(key id, processor name, hidden size) of each cross-attention, numbered as the IP-Adapter files do."""
    blocks = list(unet.config.block_out_channels)
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = blocks[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(blocks))[int(name.split(".")[1])]
        else:
            hidden = blocks[int(name.split(".")[1])]
        yield key_id, name, hidden
        key_id += 2


def train_ip_adapter(pipe, modules: dict, latents, clip_pixels, scenes, config: TrainConfig) -> None:
    """Teach the image path alone to carry the drawing: the UNet, text encoder and vision encoder stay frozen."""
    import torch
    from diffusers import DDPMScheduler

    unet, text_encoder, vision, tokenizer = pipe.unet, pipe.text_encoder, pipe.image_encoder, pipe.tokenizer
    for module in (unet, text_encoder, vision):
        module.requires_grad_(False)
    parameters = [p for module in modules.values() for p in module.parameters()]
    for p in parameters:
        p.requires_grad_(True)
    noise_schedule = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    snr = _snr(noise_schedule)
    optimizer = torch.optim.AdamW(parameters, lr=config.ip_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.ip_steps)
    ema = Ema(parameters, config.ema)
    rng = random.Random(config.seed + 4)
    generator = torch.Generator().manual_seed(config.seed + 4)
    with torch.no_grad():
        all_embeds = torch.cat([vision(pixel_values=clip_pixels[i : i + 128]).image_embeds
                                for i in range(0, len(clip_pixels), 128)])
    started = time.perf_counter()
    for step in range(config.ip_steps):
        index = torch.randint(len(latents), (config.batch,), generator=generator)
        captions = [caption_choices(scenes[i])[0] if rng.random() < config.ip_text else "" for i in index.tolist()]
        with torch.no_grad():
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            hidden = text_encoder(ids).last_hidden_state
        embeds = all_embeds[index]
        keep = (torch.rand(config.batch, generator=generator) >= config.ip_drop).float()[:, None]
        image_embeds = (embeds * keep)[:, None, :]  # zeros: what the pipeline feeds as the negative
        loss = denoising_loss(unet, noise_schedule, snr, latents[index], generator, config,
                              encoder_hidden_states=hidden, added_cond_kwargs={"image_embeds": [image_embeds]})
        _optimise(loss, optimizer, schedule, ema)
        _progress("ip-adapter", step, config.ip_steps, loss.item(), started)
    ema.copy_to()


def ip_adapter_state_dict(pipe) -> dict:
    """The trained adapter in h94/IP-Adapter's original layout (what `load_ip_adapter` reads back)."""
    unet = pipe.unet
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    tensors = {
        "image_proj.proj.weight": projection.image_embeds.weight,
        "image_proj.proj.bias": projection.image_embeds.bias,
        "image_proj.norm.weight": projection.norm.weight,
        "image_proj.norm.bias": projection.norm.bias,
    }
    for key_id, name, _ in _ip_layers(unet):
        processor = unet.attn_processors[name]
        tensors[f"ip_adapter.{key_id}.to_k_ip.weight"] = processor.to_k_ip[0].weight
        tensors[f"ip_adapter.{key_id}.to_v_ip.weight"] = processor.to_v_ip[0].weight
    return {k: v.detach().clone().contiguous() for k, v in sorted(tensors.items())}


# --- 6. the whole recipe ---------------------------------------------------------------------------

SCHEDULER_CONFIG = {  # SD 1.5's noise schedule (scheduler_config.json), with v-prediction as SD 2
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "trained_betas": None, "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1,
    "clip_sample": False, "prediction_type": "v_prediction",
}


def train(config: TrainConfig, out: Path, ip_out: Path) -> dict:
    """Run every stage and save; returns what was measured (seconds per stage, sizes).

    BatchError, before any stage runs, if OUT holds anything but an earlier output of this recipe.
    """
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from safetensors.torch import save_file

    from .tokenizer import build_tokenizer

    out, ip_out = Path(out).resolve(), Path(ip_out).resolve()
    check_outputs(out, ip_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ip_out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)
    times, started = {}, time.perf_counter()
    pixels, scenes, images = make_data(config)
    times["data_s"] = time.perf_counter() - started

    mark = time.perf_counter()
    torch.manual_seed(config.seed)
    vae = build_vae(config)
    train_vae(vae, pixels, config)
    latents, scaling = encode_latents(vae, pixels)
    vae.register_to_config(scaling_factor=scaling)
    make_posterior_deterministic(vae)
    times["vae_s"] = time.perf_counter() - mark

    # beside OUT (one file system, so the last step is a rename); gone, with whatever it holds, on any failure
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-partial-", dir=out.parent) as staging:
        model = Path(staging) / "model"
        mark = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="tiny_tokenizer_") as tmp:
            tokenizer = build_tokenizer(Path(tmp))
            torch.manual_seed(config.seed)
            text_encoder, unet = build_text_encoder(tokenizer, config), build_unet(config)
            vision, processor = build_vision(config)
            clip_pixels = processor(images=images, return_tensors="pt").pixel_values
            train_main(text_encoder, unet, vision, tokenizer, latents, clip_pixels, scenes, config)
            times["unet_s"] = time.perf_counter() - mark

            pipe = StableDiffusionPipeline(
                vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                scheduler=PNDMScheduler.from_config(SCHEDULER_CONFIG), safety_checker=None,
                feature_extractor=processor, image_encoder=vision, requires_safety_checker=False)
            pipe.save_pretrained(model, safe_serialization=True)  # before the IP-Adapter is attached to the UNet
            for name in ("vocab.json", "merges.txt"):  # the slow CLIPTokenizer of transformers 4 needs them
                if not (model / "tokenizer" / name).exists():
                    shutil.copyfile(Path(tmp) / name, model / "tokenizer" / name)
        _normalise_model_index(model)
        _prefix_text_encoder_keys(model)

        mark = time.perf_counter()
        modules = attach_ip_adapter(pipe, config)
        train_ip_adapter(pipe, modules, latents, clip_pixels, scenes, config)
        adapter = Path(staging) / IP_ADAPTER_NAME
        save_file(ip_adapter_state_dict(pipe), str(adapter), metadata={"format": "pt"})
        times["ip_adapter_s"] = time.perf_counter() - mark
        times["total_s"] = time.perf_counter() - started

        sizes = {"model_bytes": sum(p.stat().st_size for p in model.rglob("*") if p.is_file()),
                 "ip_adapter_bytes": adapter.stat().st_size}
        params = {name: sum(p.numel() for p in module.parameters()) for name, module in
                  (("unet", unet), ("vae", vae), ("text_encoder", text_encoder), ("image_encoder", vision))}
        summary = {"config": asdict(config), "seconds": {k: round(v, 1) for k, v in times.items()}, **sizes,
                   "parameters": params, "threads": torch.get_num_threads()}
        (model / MARKER).write_text(json.dumps(summary, indent=2) + "\n")

        # every stage succeeded: only now do the earlier model and adapter go
        write_atomic(ip_out / IP_ADAPTER_NAME, lambda f: f.write(adapter.read_bytes()))
        _replace_folder(model, out, Path(staging))
    log.info("trained in %.1f min; model %.1f MB, IP-Adapter %.2f MB; parameters %s", times["total_s"] / 60,
             sizes["model_bytes"] / 1e6, sizes["ip_adapter_bytes"] / 1e6, params)
    return summary


def check_outputs(out: Path, ip_out: Path) -> None:
    """BatchError unless OUT is absent, empty or an earlier output of this recipe, and IP_OUT a folder outside it."""
    if out.exists() and not out.is_dir():
        raise BatchError(f"--out {out} is a file, not a model folder")
    if out.is_dir() and any(out.iterdir()):
        entries = {p.name for p in out.iterdir()}
        if MARKER not in entries or not _is_summary(out / MARKER):
            raise BatchError(f"--out {out} holds files this recipe did not write (no {MARKER} of its own): "
                             "it would be replaced; choose an empty or new folder")
        if entries - MODEL_ENTRIES:
            raise BatchError(f"--out {out}: an earlier model, but also {', '.join(sorted(entries - MODEL_ENTRIES))}, "
                             "which replacing it would delete; move them out first")
    if ip_out.exists() and not ip_out.is_dir():
        raise BatchError(f"--ip-out {ip_out} is a file, not a folder")
    if ip_out == out or out in ip_out.parents:
        raise BatchError(f"--ip-out {ip_out} is inside --out {out}, which is replaced as a whole")


def _is_summary(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and {"config", "seconds", "model_bytes"} <= data.keys()


def _replace_folder(new: Path, out: Path, staging: Path) -> None:
    """Rename NEW to OUT; an earlier OUT is first renamed into STAGING, which is deleted with it."""
    earlier = staging / "earlier"
    if out.exists():
        os.replace(out, earlier)
    try:
        os.replace(new, out)
    except OSError:
        if earlier.exists():
            os.replace(earlier, out)
        raise


def _normalise_model_index(out_dir: Path) -> None:
    """Record `CLIPImageProcessor` even where transformers built its PIL fallback class.

    Without torchvision, transformers 5 substitutes `CLIPImageProcessorPil`; the plain
    name loads with either backend and with transformers 4.
    """
    index_path = out_dir / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    library, cls = index["feature_extractor"]
    if cls != "CLIPImageProcessor":
        index["feature_extractor"] = [library, "CLIPImageProcessor"]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _prefix_text_encoder_keys(out_dir: Path) -> None:
    """Store text-encoder weights under `text_model.*`, the layout of SD 1.5 checkpoints.

    transformers 5 flattened `CLIPTextModel` (no `.text_model` submodule) and saves a
    freshly built one without the prefix; it strips the prefix again on load, while
    transformers 4 needs it (without it, it would silently leave the weights random).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = out_dir / "text_encoder" / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {
            (k if k.startswith("text_model.") else f"text_model.{k}"): f.get_tensor(k) for k in f.keys()
        }
    save_file(tensors, str(path), metadata=metadata or {"format": "pt"})


def _optimise(loss, optimizer, schedule, ema: "Ema | None" = None, clip_parameters=None) -> None:
    """One optimiser step: gradients, optional norm clipping (to 1), the LR schedule, the EMA."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_parameters is not None:
        torch.nn.utils.clip_grad_norm_(clip_parameters, 1.0)
    optimizer.step()
    schedule.step()
    if ema is not None:
        ema.update()


def _progress(stage: str, step: int, steps: int, loss: float, started: float) -> None:
    if step % max(1, steps // 20) == 0 or step == steps - 1:
        elapsed = time.perf_counter() - started
        eta = elapsed / (step + 1) * (steps - step - 1)
        log.info("%s step %d/%d loss %.4f (%.0fs, eta %.0fs)", stage, step + 1, steps, loss, elapsed, eta)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "models" / "tiny", help="[models/tiny]")
    parser.add_argument("--ip-out", type=Path, default=None, help="[OUT's sibling tiny-ip-adapter]")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (a quick trial) [1]")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads [2, as the documented timing]")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import torch

    torch.set_num_threads(args.threads)
    config = TrainConfig().scaled(args.scale) if args.scale != 1.0 else TrainConfig()
    try:
        train(config, args.out, args.ip_out or args.out.parent / "tiny-ip-adapter")
    except BatchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
