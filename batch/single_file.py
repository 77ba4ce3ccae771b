"""Write a diffusers Stable Diffusion 1.x pipeline as one original-layout (LDM / A1111) checkpoint.

`save_single_file(pipe, path)` is the reverse of what diffusers'
`StableDiffusionPipeline.from_single_file(path, config=<diffusers folder>)` reads: the UNet
under `model.diffusion_model.`, the VAE under `first_stage_model.` and the CLIP text
encoder under `cond_stage_model.transformer.text_model.`, with CompVis key names (as the
`.safetensors` / `.ckpt` files that A1111 and civitai hand around).

diffusers 0.42 ships only the forward conversion (`loaders/single_file_utils.py`); the
reverse lives in its repository's `scripts/convert_diffusers_to_original_stable_diffusion.py`,
which is not part of the package and hard-codes SD 1.5's block counts. This module derives
the mapping from the UNet/VAE configs instead, so it works for the embedded tiny model
(2 UNet levels, 1 layer per block) as well as for SD 1.5. It is used by the tests to make a
single-file checkpoint offline; round-tripping through `from_single_file` gives back
bit-identical weights.

Usage: python -m batch.single_file MODEL_DIR OUT.safetensors
"""
from __future__ import annotations

import argparse
from pathlib import Path

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

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
}
# VAE: ResnetBlock names are the same except the shortcut; attention (AttnBlock) differs.
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
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
    if config.get("class_embed_type") or config.get("addition_embed_type") or config.get("num_class_embeds"):
        raise ValueError("class / addition embeddings are not supported (SD 1.x UNets have none)")
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


def pipeline_to_ldm(pipe) -> dict:
    """All of `pipe`'s UNet, VAE and text encoder weights, keyed as an SD 1.x single-file checkpoint."""
    checkpoint = {}
    for key, value in unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items():
        checkpoint[UNET_PREFIX + key] = value
    for key, value in vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items():
        checkpoint[VAE_PREFIX + key] = value
    for key, value in text_encoder_to_ldm(pipe.text_encoder.state_dict()).items():
        checkpoint[TEXT_PREFIX + key] = value
    return checkpoint


def save_single_file(pipe, path) -> Path:
    """Save `pipe` (a StableDiffusionPipeline) as one original-layout `.safetensors` checkpoint.

    Used by tests to make a single-file checkpoint offline (from the embedded tiny model);
    load it back with `StableDiffusionPipeline.from_single_file(path, config=<the model's
    diffusers folder>, local_files_only=True)`. Tensors are written contiguous, in their
    current dtype; nothing else (EMA, scheduler buffers) is added.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sorted(pipeline_to_ldm(pipe).items())}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="diffusers StableDiffusionPipeline folder")
    parser.add_argument("out", type=Path, help="output .safetensors file")
    args = parser.parse_args(argv)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.model_dir, safety_checker=None, local_files_only=True)
    print(save_single_file(pipe, args.out))


if __name__ == "__main__":
    main()
