"""SDXL pipelines written as original-layout single files load back bit for bit; A1111's model hash."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import REPO  # noqa: E402
from safetensors import safe_open  # noqa: E402

from batch.single_file import (  # noqa: E402
    load_sdxl_text_encoder_2,
    main,
    model_hash,
    pipeline_to_ldm,
    save_single_file,
)

TINY_SDXL = REPO / "models" / "tiny-sdxl"
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def make_tiny_sdxl(folder: Path, width_2: int = 32) -> Path:
    """diffusers' SDXL test dummy components (tests/pipelines/stable_diffusion_xl), saved as a folder.

    `width_2` is text_encoder_2's hidden size: 32, as diffusers' tests have it, is CLIP-L's width too
    (the case from_single_file mis-loads); anything else is shaped like real SDXL (768 vs 1280).
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(REPO / "models" / "tiny" / "tokenizer")
    text_config = dict(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
                       num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=len(tokenizer),
                       hidden_act="gelu", projection_dim=32)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids * addition_time_embed_dim + pooled text
        cross_attention_dim=32 + width_2,  # both encoders' hidden states, concatenated
    )
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        sample_size=128)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**text_config, "hidden_size": width_2}))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(folder)
    return folder


MODELS = ["same-width", "wider-text-encoder-2"]
if (TINY_SDXL / "model_index.json").exists():  # the shipped tiny SDXL model, where the checkout has one
    MODELS.append("models/tiny-sdxl")


@pytest.fixture(scope="module", params=MODELS)
def sdxl_folder(request, tmp_path_factory):
    if request.param == "models/tiny-sdxl":
        return TINY_SDXL
    width_2 = 32 if request.param == "same-width" else 48
    return make_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "model", width_2)


def generate(pipe) -> np.ndarray:
    """A 2-step 64x64 image, from freshly allocated copies of the weights.

    MKL's CPU matrix-vector product (SDXL's pooled `text_projection`) rounds differently with the
    weight's 16-byte alignment, and loaded weights sit at whatever offset the safetensors file gave
    them: with every tensor re-allocated (64-byte aligned) both pipelines run the same kernels, so
    the pixels compare the weights alone.
    """
    for name in COMPONENTS:
        for tensor in [*getattr(pipe, name).parameters(), *getattr(pipe, name).buffers()]:
            tensor.data = tensor.data.clone()
    return pipe("a lighthouse", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator("cpu").manual_seed(3)).images[0]


def test_sdxl_single_file_round_trip_is_bit_identical(sdxl_folder, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_folder, local_files_only=True)
    path = save_single_file(pipe, tmp_path / "sdxl model.safetensors")
    with safe_open(str(path), "pt") as file:
        keys = set(file.keys())
    layers = pipe.text_encoder_2.config.num_hidden_layers
    assert {"model.diffusion_model.label_emb.0.0.weight", "first_stage_model.decoder.norm_out.weight",
            "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
            "conditioner.embedders.1.model.positional_embedding", "conditioner.embedders.1.model.text_projection",
            f"conditioner.embedders.1.model.transformer.resblocks.{layers - 1}.attn.in_proj_weight"} <= keys
    assert not any(k.startswith("cond_stage_model.") for k in keys)

    # Equal widths: diffusers would put CLIP-L's weights into text_encoder_2 (see load_sdxl_text_encoder_2).
    same_width = pipe.text_encoder.config.hidden_size == pipe.text_encoder_2.config.hidden_size
    extra = {"text_encoder_2": load_sdxl_text_encoder_2(path, sdxl_folder)} if same_width else {}
    loaded = StableDiffusionXLPipeline.from_single_file(str(path), config=str(sdxl_folder), local_files_only=True,
                                                        **extra)
    for name in COMPONENTS:
        want, got = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys(), name
        for key, value in want.items():
            assert not got[key].is_meta and got[key].dtype == value.dtype and torch.equal(got[key], value), (name, key)
    assert np.array_equal(generate(loaded), generate(pipe))


def test_cli_detects_sdxl_and_matches_save_single_file(sdxl_folder, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    main([str(sdxl_folder), str(tmp_path / "cli.safetensors")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli.safetensors")
    direct = save_single_file(StableDiffusionXLPipeline.from_pretrained(sdxl_folder, local_files_only=True),
                              tmp_path / "direct.safetensors")
    assert model_hash(tmp_path / "cli.safetensors") == model_hash(direct)


def test_real_sdxl_architecture_maps_to_what_diffusers_reads():
    """SDXL base 1.0's shapes (on the meta device: no weights, no download): the keys that real checkpoints
    have, recognised as SDXL by diffusers' `infer_diffusers_model_type`, and read back onto every parameter."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        infer_diffusers_model_type,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280), layers_per_block=2, attention_head_dim=(5, 10, 20),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                              num_hidden_layers=12, hidden_act="quick_gelu"))
        big_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                           num_attention_heads=20, num_hidden_layers=32,
                                                           hidden_act="gelu", projection_dim=1280))
    checkpoint = pipeline_to_ldm(SimpleNamespace(unet=unet, vae=vae, text_encoder=clip_l, text_encoder_2=big_g))
    assert infer_diffusers_model_type(checkpoint) == "xl_base"
    shapes = {k: tuple(v.shape) for k, v in checkpoint.items()}
    assert {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.6.0.op.weight": (640, 640, 3, 3),
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.6.0.skip_connection.weight": (320, 960, 1, 1),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_proj.bias": (1280,),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    }.items() <= shapes.items()

    def same_shapes(converted: dict, model) -> bool:  # transformers 5's CLIPTextModel has no `text_model.`
        def shapes(state_dict: dict) -> dict:
            return {k.removeprefix("text_model."): v.shape for k, v in state_dict.items()}

        return shapes(converted) == shapes(model.state_dict())

    assert same_shapes(convert_ldm_unet_checkpoint(checkpoint, unet.config), unet)
    assert same_shapes(convert_ldm_vae_checkpoint(checkpoint, vae.config), vae)
    assert same_shapes(convert_ldm_clip_checkpoint(checkpoint), clip_l)
    assert same_shapes(convert_open_clip_checkpoint(big_g, checkpoint, prefix="conditioner.embedders.1.model."), big_g)


def test_model_hash_is_a1111_short_sha256(tmp_path):
    path = tmp_path / "model.safetensors"
    data = os.urandom(3 * (1 << 20) + 12345)  # several 1 MiB chunks and a partial one
    path.write_bytes(data)
    assert model_hash(path) == hashlib.sha256(data).hexdigest()[:10]
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    assert model_hash(empty) == "e3b0c44298"
