"""Tiny random-weight diffusers models, one per model family, saved as diffusers folders in `models/`.

They exist for tests that compare sdbatch with diffusers' own pipelines family by family, offline
and in well under a second per image on a CPU: each loads with
`AutoPipelineForText2Image.from_pretrained(folder)` (all but PixArt also give an img2img view
with `AutoPipelineForImage2Image.from_pipe`) and draws noise-like but non-constant images.

    tiny-sd2-v          StableDiffusionPipeline, SD 2.x style: linear-projection UNet, gelu CLIP,
                        DDIM with v-prediction (stable-diffusion-2-1's scheduler config)
    tiny-sdxl           StableDiffusionXLPipeline: two CLIP encoders, text_time UNet, Euler (SDXL base)
    tiny-sd3            StableDiffusion3Pipeline: SD3 transformer, two CLIP + T5, flow matching (SD3 medium)
    tiny-flux           FluxPipeline, FLUX.1-dev style: guidance embedding, dynamic shifting
    tiny-flux-schnell   FluxPipeline, FLUX.1-schnell style: no guidance embedding, shift 1
    tiny-pixart         PixArtSigmaPipeline: PixArt transformer, T5, DPM-Solver++ (text-to-image only)

The architectures are those of diffusers' fast-test `get_dummy_components()` (tests/pipelines/
stable_diffusion_2, stable_diffusion_xl, stable_diffusion_3, flux, pixart_sigma) with narrower
VAEs, so that every folder stays far under 2 MB; scheduler and VAE settings (scaling/shift
factors, prediction types, shifts) are those the real checkpoints ship. Default image sides:
64 px (SD 2, SDXL, SD3), 128 px (Flux: diffusers fixes `default_sample_size` at 128 and the
VAE has scale factor 1), 256 px (PixArt: sample_size 32, PixArt's 256 px bin, VAE factor 8).

Nothing is downloaded: the CLIP tokenizers reuse `models/tiny/tokenizer/`'s vocabulary (see
`batch.toy.tokenizer`), the T5 tokenizer is a Unigram over the toy word lists built here.
Every component is built right after its own `torch.manual_seed` (0; 1 for the second CLIP
encoder), so a rebuild gives the same bytes (tests/test_family_models.py checks one family).

Usage: python -m batch.toy.families [--out models] [--only tiny-flux ...]
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import string
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from batch.models import MODELS_DIR
from batch.toy.tokenizer import BOS_TOKEN, CORPUS, EOS_TOKEN, MAX_LENGTH
from batch.toy.world import ALL_SHAPES, COLOURS

log = logging.getLogger(__name__)

CLIP_TOKENIZER_DIR = MODELS_DIR / "tiny" / "tokenizer"
T5_MAX_LENGTH = 512  # as t5-v1_1-xxl's tokenizer
SDXL_SCALING = 0.13025  # SDXL's (and PixArt's) VAE scaling_factor


# --- tokenizers and text encoders -------------------------------------------------------------

def clip_tokenizer(pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """The embedded model's CLIP BPE (vocab.json + merges.txt of models/tiny/tokenizer)."""
    return CLIPTokenizer(
        str(CLIP_TOKENIZER_DIR / "vocab.json"),
        str(CLIP_TOKENIZER_DIR / "merges.txt"),
        model_max_length=MAX_LENGTH,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=pad_token,
    )


def t5_tokenizer() -> T5TokenizerFast:
    """A T5-layout Unigram tokenizer (<pad> 0, </s> 1, <unk> 2): whole toy words, else single characters."""
    words = sorted({w.lower() for w in CORPUS} | set(COLOURS) | set(ALL_SHAPES))
    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces = [f"▁{w}" for w in words]
    vocab += [(p, -4.0) for p in pieces]
    vocab += [(c, -8.0) for c in chars] + [(f"▁{c}", -8.0) for c in chars if f"▁{c}" not in pieces]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def clip_encoder(cls: type[CLIPTextModel | CLIPTextModelWithProjection], tokenizer: CLIPTokenizer,
                 projection: int = 32, seed: int = 0) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A 5-layer gelu CLIP text encoder (the fast tests' config, hidden size 32) sized to `tokenizer`."""
    torch.manual_seed(seed)
    return cls(CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        max_position_embeddings=MAX_LENGTH,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        projection_dim=projection,
    ))


def t5_encoder(tokenizer: T5TokenizerFast, d_model: int = 32) -> T5EncoderModel:
    """A 2-layer T5 v1.1-style (gated-gelu) encoder, sized like hf-internal-testing/tiny-random-t5."""
    torch.manual_seed(0)
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    ))


# --- VAEs ---------------------------------------------------------------------------------------

def vae(blocks: int = 2, latent_channels: int = 4, channels: int = 8, **config) -> AutoencoderKL:
    """A narrow AutoencoderKL with scale factor 2**(blocks-1); random, it decodes to grey noise (std ~40/255)."""
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        block_out_channels=[channels * min(2**i, 2) for i in range(blocks)],
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        **config,
    )


# --- the families -------------------------------------------------------------------------------

def build_sd2_v() -> DiffusionPipeline:
    tokenizer = clip_tokenizer(pad_token="!")  # OpenCLIP ViT-H's tokenizer, as SD 2.x ships it, pads with "!"
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(8, 16),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),  # SD 2.x: a list, with linear projections
        use_linear_projection=True,
        cross_attention_dim=32,
        norm_num_groups=4,
    )
    scheduler = DDIMScheduler(  # stable-diffusion-2-1's scheduler_config.json
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
    )
    return StableDiffusionPipeline(
        vae=vae(scaling_factor=0.18215, sample_size=64),
        text_encoder=clip_encoder(CLIPTextModel, tokenizer, projection=512),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sdxl() -> DiffusionPipeline:
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer(pad_token="!")  # bigG's tokenizer pads with "!"
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(2, 4),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + text_encoder_2's projection 32
        cross_attention_dim=64,  # 32 + 32: both encoders' hidden states, concatenated
        norm_num_groups=1,
    )
    scheduler = EulerDiscreteScheduler(  # stable-diffusion-xl-base-1.0's scheduler_config.json
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
    )
    return StableDiffusionXLPipeline(
        vae=vae(scaling_factor=SDXL_SCALING, force_upcast=True, sample_size=64),
        text_encoder=clip_encoder(CLIPTextModel, tokenizer),
        text_encoder_2=clip_encoder(CLIPTextModelWithProjection, tokenizer_2, seed=1),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def build_sd3() -> DiffusionPipeline:
    tokenizer, tokenizer_3 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,  # as SD3 (the fast test uses 1)
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,  # T5's d_model; the two CLIPs' 32 + 32 states are padded to it
        pooled_projection_dim=64,  # the two CLIPs' projections, 32 + 32
        pos_embed_max_size=32,  # 32x32 patches: sides up to 128 px (SD3's 96 would be most of the folder)
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # stable-diffusion-3-medium's
        vae=vae(shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False,
                sample_size=64),
        text_encoder=clip_encoder(CLIPTextModelWithProjection, tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=clip_encoder(CLIPTextModelWithProjection, tokenizer, seed=1),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(tokenizer_3, d_model=64),
        tokenizer_3=tokenizer_3,
    )


def build_flux(schnell: bool = False) -> DiffusionPipeline:
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,  # 1 latent channel, packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5's d_model
        pooled_projection_dim=32,  # CLIP's hidden size (Flux pools CLIPTextModel's output)
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=not schnell,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's / FLUX.1-schnell's scheduler_config.json
        shift=1.0 if schnell else 3.0, use_dynamic_shifting=not schnell,
        base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae(blocks=1, latent_channels=1, shift_factor=0.1159, scaling_factor=0.3611,
                use_quant_conv=False, use_post_quant_conv=False, sample_size=32),
        text_encoder=clip_encoder(CLIPTextModel, tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=t5_encoder(tokenizer_2),
        tokenizer_2=tokenizer_2,
    )


def build_pixart() -> DiffusionPipeline:
    tokenizer = t5_tokenizer()
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=32,  # one of PixArt's resolution-bin sizes (32 -> the 256 px bins)
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,  # T5's d_model
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,  # learnt sigma, as PixArt
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    scheduler = DPMSolverMultistepScheduler(  # PixArt-Sigma-XL-2-1024-MS's scheduler_config.json
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", algorithm_type="dpmsolver++",
        solver_order=2, solver_type="midpoint", lower_order_final=True, prediction_type="epsilon",
        timestep_spacing="linspace", steps_offset=0,
    )
    return PixArtSigmaPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae(blocks=4, scaling_factor=SDXL_SCALING, sample_size=256),
        text_encoder=t5_encoder(tokenizer),
        tokenizer=tokenizer,
    )


FAMILIES: dict[str, Callable[[], DiffusionPipeline]] = {
    "tiny-sd2-v": build_sd2_v,
    "tiny-sdxl": build_sdxl,
    "tiny-sd3": build_sd3,
    "tiny-flux": build_flux,
    "tiny-flux-schnell": lambda: build_flux(schnell=True),
    "tiny-pixart": build_pixart,
}


# --- saving -------------------------------------------------------------------------------------

def save(pipe: DiffusionPipeline, out: Path) -> Path:
    """Save `pipe` to OUT (replacing it), readable by transformers 4 as well as 5."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as staging:
        folder = Path(staging) / out.name
        pipe.save_pretrained(folder, safe_serialization=True)
        _portable(folder)
        shutil.rmtree(out, ignore_errors=True)
        folder.rename(out)
    return out


def _portable(folder: Path) -> None:
    """Name tokenizers and store CLIP weights the way transformers 4 can load them too.

    transformers 5's T5 tokenizer class is `T5Tokenizer` (`T5TokenizerFast` is an alias); in
    transformers 4 only `T5TokenizerFast` reads tokenizer.json. transformers 5 saves a built
    `CLIPTextModel` without the `text_model.` prefix that transformers 4 needs (see
    `batch.toy.train._prefix_text_encoder_keys`).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    for name, entry in index.items():
        if entry == ["transformers", "T5Tokenizer"]:
            index[name] = ["transformers", "T5TokenizerFast"]
        if entry == ["transformers", "CLIPTextModel"]:
            path = folder / name / "model.safetensors"
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata()
                tensors = {k if k.startswith("text_model.") else f"text_model.{k}": f.get_tensor(k) for k in f.keys()}
            save_file(tensors, str(path), metadata=metadata or {"format": "pt"})
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


IP_ADAPTER_TOKENS = 4  # image tokens of the tiny SDXL IP-Adapter, as h94's plain adapters


def save_sdxl_ip_adapter(model: Path, out: Path) -> Path:
    """A random plain IP-Adapter for the tiny SDXL model, in h94's layout: `ip-adapter_tiny-sdxl.safetensors`
    (flat `image_proj.*` and `ip_adapter.<n>.to_k_ip/to_v_ip` keys, n = 1, 3, 5... over the UNet's
    cross-attention processors, as diffusers numbers them) beside its own `image_encoder/` (a small CLIP
    vision model at CLIP's 224 px input, so diffusers' default CLIPImageProcessor fits it)."""
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    encoder = _adapter_image_encoder()
    width = unet.config.cross_attention_dim
    tensors = {"image_proj.proj.weight": torch.randn(IP_ADAPTER_TOKENS * width, 32) * 0.2,
               "image_proj.proj.bias": torch.zeros(IP_ADAPTER_TOKENS * width),
               "image_proj.norm.weight": torch.ones(width), "image_proj.norm.bias": torch.zeros(width)}
    key = 1
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            for projection in ("to_k", "to_v"):
                inner = getattr(module, projection).out_features
                tensors[f"ip_adapter.{key}.{projection}_ip.weight"] = torch.randn(inner, width) * 0.2
            key += 2
    return _save_adapter(out, "ip-adapter_tiny-sdxl.safetensors", tensors, encoder)


def save_flux_ip_adapter(model: Path, out: Path) -> Path:
    """A random IP-Adapter for the tiny Flux model in XLabs' layout (`ip_adapter_proj_model.*`, and
    `double_blocks.N.processor.ip_adapter_double_stream_k_proj/v_proj` with biases), beside its own
    `image_encoder/` (XLabs' real adapter uses CLIP ViT-L/14's)."""
    transformer = FluxTransformer2DModel.from_pretrained(model / "transformer")
    encoder = _adapter_image_encoder()
    joint, inner = transformer.config.joint_attention_dim, transformer.inner_dim
    tensors = {"ip_adapter_proj_model.proj.weight": torch.randn(IP_ADAPTER_TOKENS * joint, 32) * 0.2,
               "ip_adapter_proj_model.proj.bias": torch.zeros(IP_ADAPTER_TOKENS * joint),
               "ip_adapter_proj_model.norm.weight": torch.ones(joint),
               "ip_adapter_proj_model.norm.bias": torch.zeros(joint)}
    for block in range(transformer.config.num_layers):
        for projection in ("k", "v"):
            name = f"double_blocks.{block}.processor.ip_adapter_double_stream_{projection}_proj"
            tensors[f"{name}.weight"] = torch.randn(inner, joint) * 0.2
            tensors[f"{name}.bias"] = torch.zeros(inner)
    return _save_adapter(out, "ip_adapter.safetensors", tensors, encoder)


def _adapter_image_encoder():
    """The tiny adapters' CLIP image encoder, seeded (0) before anything else of the adapter is drawn."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, image_size=224, patch_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37))


def _save_adapter(out: Path, weight_name: str, tensors: dict, encoder) -> Path:
    """The adapter's weights as OUT/<weight_name> beside its image encoder in OUT/image_encoder/."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / weight_name))
    encoder.save_pretrained(out / "image_encoder", safe_serialization=True)
    return out


def build(names: list[str], out: Path) -> list[Path]:
    """Build and save the named families under OUT (the tiny SDXL and Flux models with their IP-Adapters)."""
    folders = []
    for name in names:
        folders.append(save(FAMILIES[name](), out / name))
        if name == "tiny-sdxl":
            save_sdxl_ip_adapter(folders[-1], out / "tiny-sdxl-ip-adapter")
        if name == "tiny-flux":
            save_flux_ip_adapter(folders[-1], out / "tiny-flux-ip-adapter")
        size = sum(p.stat().st_size for p in folders[-1].rglob("*") if p.is_file())
        log.info("%s: %.0f kB", folders[-1], size / 1e3)
    return folders


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=MODELS_DIR, help="parent folder [models/]")
    parser.add_argument("--only", nargs="+", choices=list(FAMILIES), default=list(FAMILIES), metavar="NAME",
                        help=f"families to build: {', '.join(FAMILIES)} [all]")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build(args.only, args.out)


if __name__ == "__main__":
    main()
