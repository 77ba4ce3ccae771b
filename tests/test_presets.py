"""Benchmark presets: the shipped SDXL and Flux configs are the real ones, and presets are built from
configs on the meta device, then drawn once on the target device in the target dtype.

The real architectures are only counted here (17 B parameters do not fit a CI runner); the same
build runs end to end on small configs made from the real files by overriding their sizes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from batch.presets import NOT_BUILT, PRESETS, build, parameter_counts  # noqa: E402

SDXL, FLUX, SD15 = PRESETS["sdxl-random"].configs, PRESETS["flux-random"].configs, PRESETS["sd15-random"].configs
CLIP_SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
              "projection_dim": 32}
VAE_SMALL = {"block_out_channels": [16, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
             "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "norm_num_groups": 8}
# Each preset's components at a small size: only the widths and depths change, the block types,
# embeddings and options are the real configs' (SDXL's text_time embedding: 6 sizes x 8 + 32 pooled).
SMALL = {
    "sd15-random": {
        "unet": {"block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": 4, "layers_per_block": 1,
                 "norm_num_groups": 8, "cross_attention_dim": 32, "sample_size": 8},
        "vae": VAE_SMALL, "text_encoder": CLIP_SMALL},
    "sdxl-random": {
        "unet": {"block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                 "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": [2, 4],
                 "transformer_layers_per_block": [1, 2], "layers_per_block": 1, "norm_num_groups": 8,
                 "cross_attention_dim": 64, "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 80,
                 "sample_size": 8},
        "vae": VAE_SMALL, "text_encoder": CLIP_SMALL, "text_encoder_2": CLIP_SMALL},
    "flux-random": {
        "transformer": {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
                        "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": [4, 6, 6]},
        "vae": VAE_SMALL, "text_encoder": CLIP_SMALL,
        "text_encoder_2": {"d_model": 32, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 2}},
}


def small_configs(preset: str, folder):
    """The preset's folder with its model configs shrunk (tokenizers and scheduler as shipped)."""
    shutil.copytree(PRESETS[preset].configs, folder)
    for component, sizes in SMALL[preset].items():
        path = folder / component / "config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | sizes))
    return folder


def all_tensors(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": t for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)
            for key, t in module.state_dict(keep_vars=True).items()}


# --- the shipped configs ------------------------------------------------------------------------------


def test_real_configs_load_offline():
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                           FluxTransformer2DModel, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTokenizer, T5Config, T5TokenizerFast

    unet = UNet2DConditionModel.load_config(SDXL / "unet")
    assert (unet["cross_attention_dim"], unet["projection_class_embeddings_input_dim"]) == (2048, 2816)
    assert (unet["transformer_layers_per_block"], unet["sample_size"]) == ([1, 2, 10], 128)
    assert AutoencoderKL.load_config(SDXL / "vae")["scaling_factor"] == 0.13025
    bigg = CLIPTextConfig.from_pretrained(SDXL / "text_encoder_2")
    assert (bigg.hidden_size, bigg.num_hidden_layers, bigg.projection_dim, bigg.hidden_act) == (1280, 32, 1280, "gelu")
    assert CLIPTokenizer.from_pretrained(SDXL / "tokenizer_2").pad_token == "!"
    assert CLIPTokenizer.from_pretrained(SDXL / "tokenizer").pad_token == "<|endoftext|>"
    assert isinstance(EulerDiscreteScheduler.from_pretrained(SDXL / "scheduler"), EulerDiscreteScheduler)

    assert FluxTransformer2DModel.load_config(FLUX / "transformer")["guidance_embeds"] is True
    vae = AutoencoderKL.load_config(FLUX / "vae")
    assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (16, 0.3611, 0.1159)
    assert T5Config.from_pretrained(FLUX / "text_encoder_2").feed_forward_proj == "gated-gelu"
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(FLUX / "scheduler")
    assert scheduler.config.use_dynamic_shifting and scheduler.config.max_shift == 1.15
    t5 = T5TokenizerFast.from_pretrained(FLUX / "tokenizer_2")
    ids = t5("A red lighthouse at dusk").input_ids
    assert ids[-1] == t5.eos_token_id and t5.unk_token_id not in ids and t5.model_max_length == 512


@pytest.mark.parametrize("preset", list(PRESETS))
def test_model_index_names_every_pipeline_component(preset):
    import diffusers

    index = json.loads((PRESETS[preset].configs / "model_index.json").read_text())
    pipeline = getattr(diffusers, PRESETS[preset].pipeline_class)
    assert index["_class_name"] == PRESETS[preset].pipeline_class
    expected, optional = pipeline._get_signature_keys(pipeline)
    required = set(expected) - set(optional) - set(NOT_BUILT)
    assert required <= set(index)


def test_parameter_counts_of_the_real_architectures():
    """Published sizes: SDXL UNet 2.567 B, OpenCLIP bigG 694.7 M; Flux.1 transformer 11.90 B, T5-XXL encoder 4.76 B."""
    sdxl, flux = parameter_counts("sdxl-random"), parameter_counts(FLUX)
    for counted, published in ((sdxl["unet"], 2.567e9), (sdxl["text_encoder_2"], 694.7e6),
                               (flux["transformer"], 11.90e9), (flux["text_encoder_2"], 4.76e9)):
        assert abs(counted / published - 1) < 0.01
    assert parameter_counts("sd15-random") == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert set(flux) == {"transformer", "vae", "text_encoder", "text_encoder_2"}


# --- building from configs ----------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["sdxl-random", "flux-random"])
def test_small_build_is_materialised_deterministic_and_denoises(preset, tmp_path):
    from diffusers import ModelMixin

    configs = small_configs(preset, tmp_path / "configs")
    pipe = build(preset, "cpu", torch.bfloat16, configs=configs)
    tensors = all_tensors(pipe)
    assert not [k for k, t in tensors.items() if t.is_meta]
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.bfloat16}
    again = all_tensors(build(preset, "cpu", torch.bfloat16, configs=configs))
    assert all(torch.equal(t, again[k]) for k, t in tensors.items())
    other = all_tensors(build(preset, "cpu", torch.bfloat16, configs=configs, seed=1))
    assert not all(torch.equal(t, other[k]) for k, t in tensors.items() if t.is_floating_point())

    for module in pipe.components.values():  # every buffer (CLIP's position_ids) as the module computes it
        if isinstance(module, torch.nn.Module):
            cls = type(module)
            fresh = cls.from_config(module.config) if isinstance(module, ModelMixin) else cls(module.config)
            buffers = {k: b.tolist() for k, b in fresh.named_buffers()}
            assert {k: b.tolist() for k, b in module.named_buffers()} == buffers
    if preset == "flux-random":  # T5's input embedding is its shared one, as from_pretrained ties it
        t5 = pipe.text_encoder_2
        assert t5.encoder.embed_tokens.weight is t5.shared.weight

    extra = {"max_sequence_length": 16} if preset == "flux-random" else {}
    image = pipe("a red lighthouse", num_inference_steps=1, height=16, width=16, output_type="pt", **extra).images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()


def test_sd15_preset_keeps_the_pipeline_build_random_sd15_made(tmp_path):
    pipe = build("sd15-random", "cpu", torch.float32, configs=small_configs("sd15-random", tmp_path / "c"))
    assert type(pipe).__name__ == "StableDiffusionPipeline" and type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert pipe.safety_checker is None and pipe.feature_extractor is None and pipe.image_encoder is None
    assert not pipe.config.requires_safety_checker
    norm = pipe.unet.conv_norm_out
    assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()
    assert abs(pipe.unet.conv_in.weight.std().item() - 0.02) < 0.005


def test_build_never_holds_an_fp32_copy(tmp_path):
    """Peak host memory of a bf16 build of SD 1.5's real text encoder (and a small UNet and VAE) stays near
    its bf16 size: building in fp32 and casting, as `from_config(...).to(dtype)` does, would first hold
    the fp32 copy (measured: 1.1x the bf16 size here, 2.4x that way)."""
    configs = small_configs("sd15-random", tmp_path / "c")
    shutil.copy(SD15 / "text_encoder" / "config.json", configs / "text_encoder" / "config.json")
    params = sum(parameter_counts(configs).values())
    script = textwrap.dedent(f"""
        import psutil, re, torch
        from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer
        from batch.presets import build
        before = psutil.Process().memory_info().rss
        build("sd15-random", "cpu", torch.bfloat16, configs={str(configs)!r})
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec from the forked parent (pytest, GBs by then)
        peak = int(re.search(r"VmHWM:[ \t]+([0-9]+) kB", open("/proc/self/status").read()).group(1)) * 1024
        print(peak - before)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(SD15.parents[1])})
    assert done.returncode == 0, done.stderr
    grown = int(done.stdout)
    assert params > 120e6
    assert grown < 0.75 * 4 * params, f"{grown / 2**20:.0f} MiB for {params / 1e6:.0f} M parameters in bf16"


# --- the VRAM estimate of each family -----------------------------------------------------------------


def test_estimate_of_each_family_lands_in_the_published_range():
    """Published peaks at 1024x1024, batch 1: SDXL fp16 10-12 GB; Flux.1-dev bf16 with T5 resident 33-35 GB."""
    from batch.estimate import estimate
    from batch.models import LoadOptions

    gib = 2**30
    sdxl = estimate("sdxl-random", 1024, 1024, 1, 5.0, LoadOptions("cuda:0", "fp16"))
    assert sdxl.weights_bytes == 2 * sum(parameter_counts("sdxl-random").values())
    assert 10 * gib < sdxl.total_bytes < 12 * gib and sdxl.vae_bytes > sdxl.unet_bytes  # the fp32 decode
    flux = estimate("flux-random", 1024, 1024, 1, 3.5, LoadOptions("cuda:0", "bf16"))
    assert 33 * gib < flux.total_bytes < 35 * gib
    assert 23.5e9 < 2 * parameter_counts("flux-random")["transformer"] < 24e9
    sd15 = estimate("sd15-random", 512, 512, 1, 7.5, LoadOptions("cuda:0", "fp16"))
    assert 2.5 * gib < sd15.total_bytes < 3.5 * gib


def test_estimate_follows_each_family_s_guidance_and_text_length():
    from batch.estimate import estimate
    from batch.models import LoadOptions

    options = LoadOptions("cuda:0", "bf16")
    sdxl = [estimate("sdxl-random", 1024, 1024, 2, cfg, options).unet_bytes for cfg in (1.0, 5.0)]
    assert sdxl[1] == 2 * sdxl[0]  # CFG: the UNet runs twice the samples
    flux = [estimate("flux-random", 1024, 1024, 2, cfg, options).unet_bytes for cfg in (1.0, 5.0)]
    assert flux[0] == flux[1]  # guidance is embedded: no negative half
    short = estimate("flux-random", 1024, 1024, 2, 3.5, options, max_sequence_length=256).unet_bytes
    assert short / flux[0] == pytest.approx((4096 + 256) / (4096 + 512))
    fp16 = estimate("sdxl-random", 1024, 1024, 1, 5.0, LoadOptions("cuda:0", "fp16")).vae_bytes
    assert fp16 > 2 * estimate("sdxl-random", 1024, 1024, 1, 5.0, options).vae_bytes  # force_upcast: fp32 decode
