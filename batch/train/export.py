"""The trained adapter on disk: diffusers' format and kohya's (AUTOMATIC1111, ComfyUI), with the settings inside.

Both are written with diffusers' own converters. The diffusers file carries the peft
LoraConfig (so `load_lora_weights` restores alpha); the kohya file carries an `.alpha`
per module, as kohya's trainer writes, and `ss_*` metadata that A1111 shows.
"""
from __future__ import annotations

import json
from pathlib import Path

DIFFUSERS_NAME = "pytorch_lora_weights.safetensors"


def unet_lora_state_dict(unet) -> dict:
    """The UNet's LoRA weights in peft's naming (`...to_q.lora_A.weight`)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def save_diffusers(unet, folder: Path, metadata: dict[str, str] | None = None) -> Path:
    """`folder/pytorch_lora_weights.safetensors`, as diffusers' training examples save it."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    folder.mkdir(parents=True, exist_ok=True)
    config = unet.peft_config["default"]
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(unet_lora_state_dict(unet)),
        safe_serialization=True, unet_lora_adapter_metadata=_json_safe(config.to_dict()))
    path = folder / DIFFUSERS_NAME
    if metadata:
        _add_metadata(path, metadata)
    return path


def save_kohya(unet, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """One `<name>.safetensors` in kohya's layout (`lora_unet_..._to_q.lora_down.weight` + `.alpha`)."""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    alpha = float(unet.peft_config["default"].lora_alpha)
    tensors = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in unet_lora_state_dict(unet).items()})
    # the converter writes alpha = rank (scale 1); ours may differ, and kohya's loaders scale by alpha / rank
    tensors = {k: (torch.tensor(alpha) if k.endswith(".alpha") else v).contiguous() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {})})
    return path


def kohya_metadata(settings: dict, steps: int, images: int, base_model: str) -> dict[str, str]:
    """kohya's `ss_*` keys that A1111 and ComfyUI read, plus every sdbatch setting as JSON."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(settings["rank"]),
        "ss_network_alpha": str(settings["alpha"]),
        "ss_learning_rate": str(settings["lr"]),
        "ss_unet_lr": str(settings["lr"]),
        "ss_lr_scheduler": str(settings["lr_scheduler"]),
        "ss_max_train_steps": str(settings["max_steps"]),
        "ss_steps": str(steps),
        "ss_num_train_images": str(images),
        "ss_batch_size_per_device": str(settings["batch_size"]),
        "ss_gradient_accumulation_steps": str(settings["grad_accum"]),
        "ss_mixed_precision": str(settings["mixed_precision"]),
        "ss_seed": str(settings["seed"]),
        "ss_noise_offset": str(settings["noise_offset"]),
        "ss_min_snr_gamma": str(settings["snr_gamma"]),
        "ss_sd_model_name": base_model,
        "ss_base_model_version": "sd_v1",
        "ss_network_args": json.dumps({"target_modules": list(settings["target_modules"])}),
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "sdbatch_training": json.dumps(settings, sort_keys=True),
    }


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _add_metadata(path: Path, extra: dict[str, str]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={**metadata, **extra})


def _json_safe(value):
    """peft configs hold sets and enums; the adapter metadata must be JSON."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_json_safe(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(getattr(value, "value", value))
