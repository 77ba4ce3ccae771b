"""The trained adapter on disk: diffusers' format and kohya's (AUTOMATIC1111, ComfyUI), with the settings inside.

Both are written through diffusers: `save_lora_weights` (the peft LoraConfig inside, so
`load_lora_weights` restores alpha) and `convert_state_dict_to_kohya` (an `.alpha` per module,
as kohya's trainer writes, and `ss_*` metadata that A1111 shows). Every file is written under a
temp name and renamed into place, so a kill never leaves half of one where the last one was.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

DIFFUSERS_NAME = "pytorch_lora_weights.safetensors"


def unet_lora_state_dict(unet) -> dict:
    """The UNet's LoRA weights in peft's naming (`...to_q.lora_A.weight`)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def save_diffusers(unet, folder: Path, metadata: dict[str, str] | None = None) -> Path:
    """`folder/pytorch_lora_weights.safetensors`, every module under peft's names (`...conv1.lora_A.weight`).

    Not through `convert_state_dict_to_diffusers`, as `train_text_to_image_lora.py` does: it renames
    the attention projections only (`to_q.lora.down`), so convolutions would keep peft's names, and
    `load_lora_weights` reads a whole file in the naming of its first key: such a file loads only in
    part. peft's names throughout are what diffusers' newer trainers save and its loader reads as is.
    """
    from diffusers import StableDiffusionPipeline

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / DIFFUSERS_NAME
    temp = folder / f".{DIFFUSERS_NAME}.partial"
    config = unet.peft_config["default"]
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=unet_lora_state_dict(unet), weight_name=temp.name, safe_serialization=True,
        unet_lora_adapter_metadata=_json_safe(config.to_dict()))
    if metadata:
        _add_metadata(temp, metadata)
    _shareable(temp)
    os.replace(temp, path)
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
    temp = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(temp), metadata={"format": "pt", **(metadata or {})})
    _shareable(temp)
    os.replace(temp, path)
    return path


def _shareable(path: Path) -> None:
    """The mode any new file gets under the user's umask: safetensors writes 0600 whatever the umask,
    and an adapter is made to be shared (a model site, a colleague, a web UI running as another user)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


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
    """Rewrite a temp file with more metadata (safetensors keeps it in the header, before the tensors)."""
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
