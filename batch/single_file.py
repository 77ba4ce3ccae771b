"""Write a diffusers Stable Diffusion 1.x or SDXL pipeline as one original-layout (LDM / A1111) checkpoint.

`save_single_file(pipe, path)` is the reverse of what diffusers'
`StableDiffusionPipeline.from_single_file(path, config=<diffusers folder>)` (or
`StableDiffusionXLPipeline.from_single_file`) reads: the UNet under `model.diffusion_model.`, the
VAE under `first_stage_model.`, with CompVis key names (as the `.safetensors` / `.ckpt` files that
A1111 and civitai hand around), and the text encoders
- SD 1.x: CLIP under `cond_stage_model.transformer.text_model.`;
- SDXL: CLIP-L under `conditioner.embedders.0.transformer.text_model.` and the OpenCLIP bigG
  `text_encoder_2` under `conditioner.embedders.1.model.` in OpenCLIP's own layout (fused q/k/v
  `in_proj`, `resblocks.N`, transposed `text_projection`).

diffusers 0.42 ships only the forward conversion (`loaders/single_file_utils.py`); the
reverse lives in its repository's `scripts/convert_diffusers_to_original_stable_diffusion.py`
(and `..._sdxl.py`), which are not part of the package and hard-code the real models' block
counts. This module derives the mapping from the UNet/VAE configs instead, so it works for the
embedded tiny models (2 UNet levels) as well as for SD 1.5 and SDXL. It is used by the tests to
make single-file checkpoints offline; round-tripping through `from_single_file` gives back
bit-identical weights.

Usage: python -m batch.single_file MODEL_DIR OUT.safetensors
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTextModelWithProjection

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT_2_PREFIX = "conditioner.embedders.1.model."

# diffusers resnet parameter names -> CompVis ones (UNet ResBlock).
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's addition_embed_type "text_time"
    "add_embedding.linear_2": "label_emb.0.2",
}
# VAE: ResnetBlock names are the same except the shortcut; attention (AttnBlock) differs.
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# OpenCLIP `TextTransformer` names for a `CLIPTextModelWithProjection` (SDXL's bigG encoder).
_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_VAE_TOP = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}


def _rename(rest: str, table: dict[str, str]) -> str:
    """Map the leading module name of `rest` ("norm1.weight" -> "in_layers.0.weight")."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_to_ldm(state_dict: dict, config) -> dict:
    """diffusers `UNet2DConditionModel` state dict -> CompVis `openaimodel.UNetModel` keys (no prefix)."""
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError("per-block layers_per_block is not supported")
    if config.get("class_embed_type") or config.get("num_class_embeds"):
        raise ValueError("class embeddings are not supported (SD 1.x / SDXL UNets have none)")
    if config.get("addition_embed_type") not in (None, "text_time"):
        raise ValueError(f"addition_embed_type {config['addition_embed_type']!r} is not supported (SDXL's: text_time)")
    out: dict = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "down_blocks":
            block, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":  # down_blocks.B.downsamplers.0.conv.* -> input_blocks.N.0.op.*
                new = f"input_blocks.{(block + 1) * (layers + 1)}.0.op." + ".".join(parts[5:])
            else:
                index = 1 + block * (layers + 1) + int(parts[3])
                rest = ".".join(parts[4:])
                if kind == "resnets":
                    new = f"input_blocks.{index}.0." + _rename(rest, _UNET_RESNET)
                else:  # attentions: same names inside the SpatialTransformer
                    new = f"input_blocks.{index}.1." + rest
        elif parts[0] == "mid_block":
            rest = ".".join(parts[3:])
            if parts[1] == "resnets":  # resnets.0 -> middle_block.0, resnets.1 -> middle_block.2
                new = f"middle_block.{2 * int(parts[2])}." + _rename(rest, _UNET_RESNET)
            else:
                new = f"middle_block.{2 * int(parts[2]) + 1}." + rest
        elif parts[0] == "up_blocks":
            block, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":  # after the block's last layer: .1 without attention, .2 with
                has_attn = "CrossAttn" in config["up_block_types"][block]
                index = block * (layers + 1) + layers
                new = f"output_blocks.{index}.{2 if has_attn else 1}.conv." + ".".join(parts[5:])
            else:
                index = block * (layers + 1) + int(parts[3])
                rest = ".".join(parts[4:])
                if kind == "resnets":
                    new = f"output_blocks.{index}.0." + _rename(rest, _UNET_RESNET)
                else:
                    new = f"output_blocks.{index}.1." + rest
        else:
            new = _rename(key, _UNET_TOP)
            if new == key:
                raise ValueError(f"unexpected UNet key {key!r}")
        out[new] = value
    return out


def vae_to_ldm(state_dict: dict, config) -> dict:
    """diffusers `AutoencoderKL` state dict -> CompVis `AutoencoderKL` keys (no prefix).

    The mid-block attention's linear weights become 1x1 convolutions, as in SD checkpoints.
    """
    num_up = len(config["up_block_types"])
    out: dict = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        coder = parts[0]
        if len(parts) > 2 and parts[1] == "down_blocks":  # encoder.down_blocks.I.{resnets.J|downsamplers.0}.*
            i = int(parts[2])
            if parts[3] == "resnets":
                new = f"encoder.down.{i}.block.{parts[4]}." + _rename(".".join(parts[5:]), _VAE_RESNET)
            else:
                new = f"encoder.down.{i}.downsample." + ".".join(parts[5:])
        elif len(parts) > 2 and parts[1] == "up_blocks":  # decoder up blocks are stored in reverse order
            i = num_up - 1 - int(parts[2])
            if parts[3] == "resnets":
                new = f"decoder.up.{i}.block.{parts[4]}." + _rename(".".join(parts[5:]), _VAE_RESNET)
            else:
                new = f"decoder.up.{i}.upsample." + ".".join(parts[5:])
        elif len(parts) > 2 and parts[1] == "mid_block":
            if parts[2] == "resnets":
                new = f"{coder}.mid.block_{int(parts[3]) + 1}." + _rename(".".join(parts[4:]), _VAE_RESNET)
            else:
                new = f"{coder}.mid.attn_1." + _rename(".".join(parts[4:]), _VAE_ATTN)
                if value.ndim == 2:
                    value = value[:, :, None, None]
        else:
            new = _rename(key, _VAE_TOP)
            if new == key and not any(key.startswith(k + ".") for k in _VAE_TOP):
                raise ValueError(f"unexpected VAE key {key!r}")
        out[new] = value
    return out


def text_encoder_to_ldm(state_dict: dict) -> dict:
    """`CLIPTextModel` state dict -> keys under `text_model.` (transformers 5 saves them without it)."""
    return {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state_dict.items()}


def text_encoder_to_open_clip(state_dict: dict) -> dict:
    """`CLIPTextModelWithProjection` state dict -> OpenCLIP `TextTransformer` keys (no prefix).

    The layout SDXL checkpoints store their second text encoder in: q/k/v fused into one
    `attn.in_proj_*` (in that order), and `text_projection` as a bare (hidden, projection)
    matrix, the transpose of the Linear weight, as diffusers' `convert_open_clip_checkpoint`
    expects (it also takes the q/k/v split size from its first dimension).
    """
    import torch

    weights = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    out: dict = {"text_projection": weights.pop("text_projection.weight").T}
    for key, value in weights.items():
        parts = key.split(".")
        if parts[:2] == ["encoder", "layers"]:  # encoder.layers.N.<module>.<param>
            block, rest = f"transformer.resblocks.{parts[2]}.", ".".join(parts[3:])
            if parts[3] == "self_attn" and parts[4] in ("q_proj", "k_proj", "v_proj"):
                if parts[4] == "q_proj":  # one fused in_proj per parameter, written when its q comes by
                    param = parts[5]
                    qkv = [weights[f"encoder.layers.{parts[2]}.self_attn.{p}_proj.{param}"] for p in "qkv"]
                    out[f"{block}attn.in_proj_{param}"] = torch.cat(qkv)
                continue
            new = block + _rename(rest, _OPEN_CLIP_LAYER)
            if new == block + rest:
                raise ValueError(f"unexpected text encoder key {key!r}")
        elif key in _OPEN_CLIP_TOP:
            new = _OPEN_CLIP_TOP[key]
        else:
            raise ValueError(f"unexpected text encoder key {key!r}")
        out[new] = value
    return out


def pipeline_to_ldm(pipe) -> dict:
    """All of `pipe`'s UNet, VAE and text encoder weights, keyed as an SD 1.x or SDXL single-file checkpoint.

    A pipeline with a `text_encoder_2` (StableDiffusionXLPipeline) gets SDXL's `conditioner.embedders.*` layout.
    """
    checkpoint = {}
    for key, value in unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items():
        checkpoint[UNET_PREFIX + key] = value
    for key, value in vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items():
        checkpoint[VAE_PREFIX + key] = value
    text_encoder_2 = getattr(pipe, "text_encoder_2", None)
    text_prefix = TEXT_PREFIX if text_encoder_2 is None else SDXL_TEXT_PREFIX
    for key, value in text_encoder_to_ldm(pipe.text_encoder.state_dict()).items():
        checkpoint[text_prefix + key] = value
    if text_encoder_2 is not None:
        for key, value in text_encoder_to_open_clip(text_encoder_2.state_dict()).items():
            checkpoint[SDXL_TEXT_2_PREFIX + key] = value
    return checkpoint


def save_single_file(pipe, path) -> Path:
    """Save `pipe` (a StableDiffusion(XL)Pipeline) as one original-layout `.safetensors` checkpoint.

    Used by tests to make a single-file checkpoint offline (from the embedded tiny models);
    load it back with `<the pipeline class>.from_single_file(path, config=<the model's
    diffusers folder>, local_files_only=True)`. Tensors are written contiguous, in their
    current dtype; nothing else (EMA, scheduler buffers) is added.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sorted(pipeline_to_ldm(pipe).items())}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def load_sdxl_text_encoder_2(path: str | Path, config: str | Path) -> CLIPTextModelWithProjection:
    """SDXL's `text_encoder_2` (a `CLIPTextModelWithProjection`) read from the single file at `path`.

    For `StableDiffusionXLPipeline.from_single_file(path, config=config, text_encoder_2=...)` when both
    text encoders have the same width (tiny test models): diffusers 0.42's
    `single_file_utils.create_diffusers_clip_model_from_ldm` picks the checkpoint's CLIP-L branch for
    any CLIP class whose position-embedding width matches CLIP-L's, so it would load the CLIP-L
    weights into `text_encoder_2` and leave its `text_projection` on the meta device. Real SDXL
    (768 vs 1280 wide) loads fine without this. `config` is the diffusers folder (its
    `text_encoder_2/config.json`); only the `conditioner.embedders.1.model.` tensors are read.
    """
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with safe_open(str(path), "pt") as file:
        checkpoint = {k: file.get_tensor(k) for k in file.keys() if k.startswith(SDXL_TEXT_2_PREFIX)}
    model = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config, subfolder="text_encoder_2"))
    model.load_state_dict(convert_open_clip_checkpoint(model, checkpoint, prefix=SDXL_TEXT_2_PREFIX))
    return model.eval()


def model_hash(path: str | Path) -> str:
    """AUTOMATIC1111's "Model hash" of a checkpoint: the first 10 hex digits of the file's sha256.

    What A1111 writes into an image's parameters (and civitai lists), so a row's checkpoint can be
    matched to its images; read in 1 MiB chunks, as checkpoints run to several GB.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:10]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="diffusers StableDiffusion(XL)Pipeline folder")
    parser.add_argument("out", type=Path, help="output .safetensors file")
    args = parser.parse_args(argv)
    import diffusers

    class_name = json.loads((args.model_dir / "model_index.json").read_text())["_class_name"]
    if class_name not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        parser.error(f"{args.model_dir} holds a {class_name}; only StableDiffusion(XL)Pipeline folders are supported")
    # SD 1.x folders may name a safety checker; a single file has none.
    extra = {"safety_checker": None} if class_name == "StableDiffusionPipeline" else {}
    pipe = getattr(diffusers, class_name).from_pretrained(args.model_dir, local_files_only=True, **extra)
    print(save_single_file(pipe, args.out))


if __name__ == "__main__":
    main()
