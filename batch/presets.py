"""Benchmark presets: the real SD 1.5, SDXL and Flux.1-dev architectures with seeded random weights.

Only configs and tokenizers ship (models/sd15, models/sdxl, models/flux): speed and memory depend on
the architecture, not on what the weights say. Every module is built on the meta device and each
parameter is then drawn once, on the target device in the target dtype: flux-random holds 16.9 B
parameters (34 GB in bf16), so the usual `from_config(...).to(device, dtype)`, a full fp32 copy in
host memory first, would need 68 GB of RAM and minutes of CPU initialisation.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .models import MODELS_DIR, PRESET_FOLDERS

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

SEED = 0
INIT_STD = 0.02  # weights ~ N(0, 0.02), transformers' initializer_range: a forward pass stays finite
MODEL_COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "image_encoder")
NOT_BUILT = ("safety_checker", "feature_extractor", "image_encoder")  # a benchmark draws with the model alone


@dataclass(frozen=True)
class Preset:
    """A benchmark model: a folder of real configs (no weights) and the pipeline that runs them."""

    name: str
    pipeline_class: str

    @property
    def configs(self) -> Path:
        return MODELS_DIR / PRESET_FOLDERS[self.name]


PRESETS = {p.name: p for p in (
    Preset("sd15-random", "StableDiffusionPipeline"),
    Preset("sdxl-random", "StableDiffusionXLPipeline"),
    Preset("flux-random", "FluxPipeline"),
)}


def build(name: str, device: str, dtype: torch.dtype, configs: Path | None = None,
          seed: int = SEED) -> DiffusionPipeline:
    """The preset's pipeline with every weight drawn from `seed` directly on `device` in `dtype`.

    `configs` replaces the preset's folder (tests build the same pipeline from small configs).
    The same seed gives the same weights on the same device.
    """
    import diffusers
    import torch

    folder = Path(configs or PRESETS[name].configs)
    pipeline = getattr(diffusers, PRESETS[name].pipeline_class)
    accepted = inspect.signature(pipeline.__init__).parameters
    generator = torch.Generator(device).manual_seed(seed)
    parts = {}
    for component, spec in _model_index(folder).items():
        if component.startswith("_") or component not in accepted:
            continue
        if not isinstance(spec, list):  # a pipeline option: requires_safety_checker, force_zeros_for_empty_prompt
            parts[component] = spec
        elif spec[1] is None or component in NOT_BUILT:
            parts[component] = None
        else:
            parts[component] = _component(folder / component, spec, device, dtype, generator)
    return pipeline(**parts)


def parameter_counts(folder_or_preset: str | Path) -> dict[str, int]:
    """Parameters per model component (unet or transformer, vae, text encoders, image encoder) of a
    preset or a diffusers folder, from its configs alone: built on the meta device, nothing allocated."""
    folder = PRESETS[folder_or_preset].configs if folder_or_preset in PRESETS else Path(folder_or_preset)
    return dict(_counts(str(folder.resolve())))


@functools.lru_cache(maxsize=None)  # asked for every plan group; a count builds the architecture
def _counts(folder: str) -> dict[str, int]:
    counts = {}
    for component, spec in _model_index(Path(folder)).items():
        config = Path(folder) / component
        if component in MODEL_COMPONENTS and isinstance(spec, list) and spec[1] and (config / "config.json").exists():
            counts[component] = sum(p.numel() for p in _empty(_class(spec), config).parameters())
    return counts


def _model_index(folder: Path) -> dict:
    return json.loads((folder / "model_index.json").read_text())


def _class(spec: list) -> type:
    library, name = spec
    return getattr(importlib.import_module(library), name)


def _component(folder: Path, spec: list, device: str, dtype: torch.dtype, generator: torch.Generator):
    """A model with random weights on `device`; a tokenizer or scheduler as shipped."""
    import torch

    cls = _class(spec)
    if not issubclass(cls, torch.nn.Module):
        return cls.from_pretrained(folder)
    module = _empty(cls, folder)
    _materialise(module, device, dtype, generator)
    return module.eval()  # as from_pretrained returns it


def _empty(cls: type, folder: Path) -> torch.nn.Module:
    """The architecture with its parameters on the meta device and its buffers computed on the CPU,
    as from_pretrained builds it (to_empty would leave buffers such as CLIP's position_ids garbage)."""
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights():
        if issubclass(cls, diffusers.ModelMixin):
            module = cls.from_config(cls.load_config(folder))
        else:
            module = cls(cls.config_class.from_pretrained(folder))
    if hasattr(module, "tie_weights"):
        module.tie_weights()  # the context re-creates parameters as they register, untying T5's shared embedding
    return module


def _materialise(module: torch.nn.Module, device: str, dtype: torch.dtype,
                 generator: torch.Generator) -> None:
    """Each meta parameter becomes a tensor on `device` in `dtype`, filled from `generator`; buffers move there.

    Filled in a fixed order (registration), so a seed gives the same weights. Norm weights are ones
    and biases zeros, as the layers initialise themselves; tied parameters stay one tensor.
    """
    import torch

    made = {}  # id(meta parameter) -> (meta parameter, its tensor): the meta one kept alive so ids stay unique
    with torch.no_grad():
        for owner in module.modules():
            norm = "norm" in type(owner).__name__.lower()
            for name, param in owner._parameters.items():
                if param is None:
                    continue
                if id(param) not in made:
                    tensor = torch.empty(param.shape, device=device,
                                         dtype=dtype if param.is_floating_point() else param.dtype)
                    if norm and name == "weight":
                        tensor.fill_(1)
                    elif name.endswith("bias") or not tensor.is_floating_point():
                        tensor.zero_()
                    else:
                        tensor.normal_(0, INIT_STD, generator=generator)
                    made[id(param)] = (param, torch.nn.Parameter(tensor, requires_grad=param.requires_grad))
                owner._parameters[name] = made[id(param)][1]
            for name, buffer in owner._buffers.items():
                if buffer is not None:
                    owner._buffers[name] = buffer.to(device=device,
                                                     dtype=dtype if buffer.is_floating_point() else buffer.dtype)
