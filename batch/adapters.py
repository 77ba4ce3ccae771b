"""LoRA and IP-Adapter weights: read once a run, checked before any model loads, digested for the keys.

`check_adapters` runs before the first image (and in `validate`), so a bad adapter is an
input error (exit 2) rather than a failure of every row hours into a night:

- every LoRA is readable, a LoRA diffusers understands, and shaped for the model of each row
  that uses it: loaded into that model's UNet and text encoder built on the meta device
  (configs only, no weights, milliseconds);
- IP-Adapter weights are of a supported kind, and the image encoders that `ip_adapter` and
  `clip_embed` rows need are there (in the Hugging Face cache when HF_HUB_OFFLINE is set);
- `--attention-slicing` is not asked to serve `ip_adapter` rows.

Each adapter's content digest goes into the image keys: a new file at the same path is a new
image. A run of many LoRAs holds about one at a time (issue 19): the `AdapterStore` keeps their
digests, a state dict only from its read to its load (at most HELD_LORAS wait so), and a LoRA's
adapter leaves the model when a group needing another starts. A LoRA needed again is read again,
and must still have the content its image keys carry.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BatchError, ModelError
from .families import BY_NAME, SD, describe
from .models import (CLIP_VISION, SD15_IP_ADAPTER, TINY_IP_ADAPTERS, LoadOptions, _offline, config_folder,
                     ip_image_encoder_location, resolve_model)

log = logging.getLogger(__name__)
HELD_LORAS = 1  # LoRA state dicts waiting from check to load: each more saves a re-read and costs a LoRA's size


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA as diffusers' `lora_state_dict` returns it, ready for `load_lora_into_unet/_text_encoder`."""

    reference: str
    state_dict: dict
    network_alphas: dict | None
    metadata: dict | None
    digest: str


@dataclass(frozen=True)
class IpAdapterWeights:
    """An IP-Adapter state dict in diffusers' nested layout ({"image_proj": ..., "ip_adapter": ...})."""

    source: str  # as shown in messages: folder/file or org/repo/subfolder/file
    repo: str  # where its image encoder lives, for models without one (SD 1.5)
    subfolder: str
    state_dict: dict
    digest: str


@dataclass
class AdapterStore:
    """The run's adapters: LoRA digests for the whole run, LoRA state dicts only until loaded."""

    ip_adapter_override: str | None = None  # --ip-adapter
    loras: dict[str, LoraWeights] = field(default_factory=dict)  # read, not yet loaded: at most HELD_LORAS
    digests: dict[str, str] = field(default_factory=dict)  # LoRA reference -> content digest, as first read
    ip_adapters: dict[str, IpAdapterWeights] = field(default_factory=dict)  # by model

    def merge(self, other: AdapterStore) -> None:
        """Take what another store read and checked (the Generator checks each new adapter on its own)."""
        self.loras.update(other.loras)
        self.digests.update(other.digests)
        self.ip_adapters.update(other.ip_adapters)

    def lora(self, reference: str, family=SD) -> LoraWeights:
        """The LoRA's weights to load into a model, handed over: the store keeps only their digest."""
        return self.loras.pop(reference, None) or self._read_lora(reference, hold=False, family=family)

    def lora_digest(self, reference: str, family=SD) -> str:
        if reference not in self.digests:
            self.digests[reference] = (self.loras.get(reference)
                                       or self._read_lora(reference, hold=True, family=family)).digest
        return self.digests[reference]

    def _read_lora(self, reference: str, hold: bool, family=SD) -> LoraWeights:
        """Read the file, its content checked against the first read; `hold`: keep the weights for
        their load if fewer than HELD_LORAS wait (a one-LoRA run reads its file once)."""
        weights = read_lora(reference, family)
        first = self.digests.setdefault(reference, weights.digest)
        if weights.digest != first:
            raise ModelError(f"LoRA '{reference}' changed since this run read it (digest {first}, now "
                             f"{weights.digest}): its images' keys name the first content; run again to make "
                             "them with the new one")
        if hold and len(self.loras) < HELD_LORAS:
            self.loras[reference] = weights
        return weights

    def release_loras(self, family, keep=()) -> list[str]:
        """Delete from the family's model every LoRA not in `keep` (diffusers' `delete_adapters`).

        Called as a group starts, with the group's LoRA: adapters do not pile up over a run of many
        LoRAs, and one needed again later is read again and loaded again. Returns the references deleted.
        """
        dropped = [reference for reference in family.loras if reference not in keep]
        if not dropped:
            return []
        pipe = family.txt2img
        pipe.delete_adapters([family.loras.pop(reference) for reference in dropped])
        if family.active_lora and family.active_lora[0] in dropped:
            if family.loras:  # peft has made another loaded adapter active: back to none, as use_lora(None) leaves it
                pipe.disable_lora()
            family.active_lora = None
        log.debug("LoRA adapters deleted from %s: %s", family.model, ", ".join(dropped))
        return dropped

    def ip_adapter(self, model: str) -> IpAdapterWeights:
        if model not in self.ip_adapters:
            self.ip_adapters[model] = read_ip_adapter(model, self.ip_adapter_override)
        return self.ip_adapters[model]

    def salt(self, job) -> str:
        """What the job's adapters add to its image keys: their content, not their path."""
        salt = ""
        if job.lora:
            salt += f"|lora={self.lora_digest(job.lora, BY_NAME[job.family])}"
        if job.image_prompt_method == "ip_adapter":
            salt += f"|ip_adapter={self.ip_adapter(job.model).digest}"
        return salt


def check_adapters(jobs, options: LoadOptions) -> AdapterStore:
    """Read and check every adapter and image encoder the jobs need; all problems in one BatchError."""
    store = AdapterStore(options.ip_adapter)
    problems: list[str] = []
    uses: dict[tuple[str, str], list[str]] = {}  # (method, model) -> ids of the rows that need it
    loras: dict[str, dict[str, list[str]]] = {}  # reference -> model -> ids of the rows that need it
    for job in jobs:
        if job.lora:
            loras.setdefault(job.lora, {}).setdefault(job.model, []).append(job.id)
        if job.image_prompt_method:
            uses.setdefault((job.image_prompt_method, job.model), []).append(job.id)
    ip_rows = [ids for (what, _), ids in uses.items() if what == "ip_adapter"]
    if ip_rows and options.attention_slicing:
        problems.append(f"--attention-slicing cannot serve ip_adapter rows ({_rows(sum(ip_rows, []))}): sliced "
                        "attention replaces the IP-Adapter's attention processors; drop --attention-slicing "
                        "(PyTorch's scaled-dot-product attention is already memory-efficient)")
    for reference, models in loras.items():  # each read once (the first held for its load), fitted to its models
        try:
            weights = store._read_lora(reference, hold=True, family=describe(next(iter(models))).family)
        except ModelError as e:
            problems.append(f"{e} (needed by {_rows(sum(models.values(), []))})")
            continue
        for model, ids in models.items():
            try:
                _check_lora_fits(weights, model)
            except ModelError as e:
                problems.append(f"{e} (needed by {_rows(ids)})")
    for (what, model), ids in uses.items():
        try:
            if what == "ip_adapter":
                weights = store.ip_adapter(model)
                if _has_image_encoder(model) is False:
                    repo, folder = ip_image_encoder_location(weights.repo, weights.subfolder,
                                                             describe(model).family.ip_image_encoder)
                    _check_cached(repo, folder, f"the image encoder of IP-Adapter {weights.source}")
            elif what == "clip_embed" and model != "sd15-random" and _has_image_encoder(model) is False:
                _check_cached(CLIP_VISION, "", f"{CLIP_VISION} (the image encoder clip_embed rows use with "
                                               f"'{model}', which ships none)")
        except ModelError as e:
            problems.append(f"{e} (needed by {_rows(ids)})")
    if problems:
        raise BatchError("\n".join(problems) if len(problems) == 1
                         else f"{len(problems)} problems:\n" + "\n".join(f"- {p}" for p in problems))
    return store


def _rows(ids: list[str]) -> str:
    shown = ", ".join(ids[:3])
    return f"row{'s' if len(ids) > 1 else ''} {shown}" + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")


def digest(state_dict: dict, *extra) -> str:
    """A content hash of tensors (by name) and small extras: equal weights, equal digest, wherever they came from."""
    import torch

    h = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key]
        if isinstance(value, dict):
            h.update(f"{key}:{digest(value)}".encode())
            continue
        tensor = value.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{key}:{tensor.dtype}:{tuple(value.shape)}".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes())
    h.update(repr(extra).encode())
    return h.hexdigest()[:16]


def read_lora(reference: str, family=SD) -> LoraWeights:
    """Read a LoRA the way the family's `load_lora_weights` does (kohya and A1111 files converted)."""
    from .models import quiet_libraries

    quiet_libraries()  # before diffusers imports its pipelines, which warn
    pipeline = _pipeline_class(family)
    try:
        state_dict, alphas, metadata = _lora_state_dict(pipeline, reference)
    except Exception as e:  # diffusers raises OSError, ValueError, KeyError, SafetensorError... for bad files
        hint = " (HF_HUB_OFFLINE is set: is it in the Hugging Face cache?)" if _offline() and not Path(reference).exists() else ""
        raise ModelError(f"cannot read LoRA '{reference}'{hint}: {type(e).__name__}: {_first_line(e)}") from None
    if not state_dict or not all("lora" in key for key in state_dict):
        found = ", ".join(sorted(state_dict)[:3]) or "nothing"
        raise ModelError(f"'{reference}' is not a LoRA diffusers can load (its weights are named {found}...)")
    return LoraWeights(reference, state_dict, alphas, metadata, digest(state_dict, sorted((alphas or {}).items())))


def _pipeline_class(family):
    import diffusers

    return getattr(diffusers, family.pipelines[0])


def _lora_state_dict(pipeline, reference: str) -> tuple[dict, dict | None, dict | None]:
    """(state dict, network alphas, metadata) from the family's `lora_state_dict`, whose returns differ
    by family (SD3's has no alphas; Flux's gives them on request)."""
    kwargs = {"local_files_only": _offline(), "return_lora_metadata": True}
    if "return_alphas" in inspect.signature(pipeline.lora_state_dict).parameters:
        kwargs["return_alphas"] = True
    out = pipeline.lora_state_dict(reference, **kwargs)
    if len(out) == 3:
        return out
    return out[0], None, out[1]


def load_lora(pipe, weights: LoraWeights, adapter_name: str, family=SD) -> None:
    """Load a LoRA into the family's model: SD from the weights in memory (the two diffusers calls
    `load_lora_weights` makes); other families through their own `load_lora_weights`, which reads the
    file again and knows each family's text encoders and conversions."""
    from diffusers import StableDiffusionPipeline

    if not family.encodes_prompts_here:
        pipe.load_lora_weights(weights.reference, adapter_name=adapter_name, local_files_only=_offline())
        return

    common = dict(network_alphas=weights.network_alphas, adapter_name=adapter_name, metadata=weights.metadata,
                  _pipeline=pipe)
    StableDiffusionPipeline.load_lora_into_unet(dict(weights.state_dict), unet=pipe.unet, **common)
    StableDiffusionPipeline.load_lora_into_text_encoder(dict(weights.state_dict), text_encoder=pipe.text_encoder,
                                                        lora_scale=pipe.lora_scale, **common)


def _check_lora_fits(weights: LoraWeights, model: str) -> None:
    """Load the LoRA into the model's UNet and text encoder built on the meta device: a LoRA for
    another architecture (SDXL, SD 2) fails here with the shapes that do not match."""
    from diffusers import StableDiffusionPipeline

    family = describe(model).family
    if not family.encodes_prompts_here:
        return _check_denoiser_lora(weights, model, family)
    components = _meta_components(model)
    if components is None:
        return  # a hub model not downloaded yet (online): checked when it loads
    unet, text_encoder = components
    common = dict(network_alphas=weights.network_alphas, adapter_name="sdbatch_check", metadata=weights.metadata,
                  low_cpu_mem_usage=True)
    with _fit_check(weights, model):
        StableDiffusionPipeline.load_lora_into_unet(dict(weights.state_dict), unet=unet, **common)
        StableDiffusionPipeline.load_lora_into_text_encoder(dict(weights.state_dict), text_encoder=text_encoder, **common)


@contextlib.contextmanager
def _fit_check(weights: LoraWeights, model: str, what: str = ""):
    """A load into meta modules that fails is a ModelError naming the LoRA and the model (`what`: the family);
    diffusers logs the failure it raises, so its logging is silenced meanwhile: we say it once."""
    import diffusers.utils.logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    except Exception as e:  # size mismatches (RuntimeError), unknown layers (ValueError)...
        raise ModelError(f"LoRA '{weights.reference}' does not fit model '{model}'{what}: "
                         f"{_first_line(e, skip_header=True)}") from None
    finally:
        diffusers_logging.set_verbosity(level)


def _check_denoiser_lora(weights: LoraWeights, model: str, family) -> None:
    """SDXL, SD3, Flux: the LoRA names the family's denoiser and fits its shapes (built on the meta device)."""
    import diffusers
    import torch

    prefix = family.denoiser + "."
    if not any(key.startswith(prefix) for key in weights.state_dict):
        found = sorted({key.split(".")[0] for key in weights.state_dict})
        raise ModelError(f"LoRA '{weights.reference}' does not fit model '{model}' ({family.label}): it holds "
                         f"{', '.join(found)} weights, none for the {family.denoiser}")
    folder = config_folder(model)
    if folder is None:
        return
    config = json.loads((Path(folder) / family.denoiser / "config.json").read_text())
    with torch.device("meta"):
        denoiser = getattr(diffusers, config["_class_name"]).from_config(config)
    pipeline = _pipeline_class(family)
    method = getattr(pipeline, f"load_lora_into_{family.denoiser}")
    kwargs = {family.denoiser: denoiser, "adapter_name": "sdbatch_check", "low_cpu_mem_usage": True}
    if "network_alphas" in inspect.signature(method).parameters:
        kwargs["network_alphas"] = weights.network_alphas
    with _fit_check(weights, model, f" ({family.label})"):
        method({k: v for k, v in weights.state_dict.items() if k.startswith(prefix)}, **kwargs)


def _meta_components(model: str):
    """(UNet, text encoder) of `model` on the meta device, from its configs; None if they are not on disk."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = config_folder(model)
    if folder is None:
        return None
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
    return unet, text_encoder


def _has_image_encoder(model: str) -> bool | None:
    """Whether the model ships a CLIP image encoder (the tiny model does, SD 1.5 does not); None: unknown."""
    import json

    folder = config_folder(model)
    if folder is None:
        return None
    if resolve_model(model).kind in ("single_file", "random"):
        return False  # loaded with image_encoder=None / built without one
    entry = json.loads((Path(folder) / "model_index.json").read_text()).get("image_encoder")
    return bool(entry and entry[0] and (Path(folder) / "image_encoder").is_dir())


def _check_cached(repo: str, subfolder: str, what: str) -> None:
    """A folder's config.json is on disk (local) or in the cache (offline hub); online, the load fetches it."""
    if Path(repo).is_dir():
        if not (Path(repo) / subfolder / "config.json").exists():
            raise ModelError(f"{what} is missing: no {Path(repo) / subfolder / 'config.json'}")
        return
    if not _offline():
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(repo, f"{subfolder}/config.json".lstrip("/")), str):
        raise ModelError(f"{what} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: "
                         f"download {repo}{'/' + subfolder if subfolder else ''} once online")


def ip_adapter_location(model: str, override: str | None) -> tuple[str, str, str]:
    """(repo or folder, subfolder, weight name) of the IP-Adapter for `model`."""
    reference = override or (str(TINY_IP_ADAPTERS[model]) if model in TINY_IP_ADAPTERS
                             else describe(model).family.ip_adapter or SD15_IP_ADAPTER)
    path = Path(reference).expanduser()
    if path.is_file():
        return str(path.parent), "", path.name
    if path.is_dir():
        weights = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
        if len(weights) != 1:
            raise ModelError(f"{path}: expected one IP-Adapter weight file (.safetensors or .bin), found {len(weights)}")
        return str(path), "", weights[0]
    parts = reference.split("/")
    if len(parts) >= 3:  # org/repo/sub/folder/weights.safetensors
        return "/".join(parts[:2]), "/".join(parts[2:-1]), parts[-1]
    raise ModelError(f"IP-Adapter '{reference}': give a weight file, a folder with one, or 'org/repo/subfolder/file'")


def read_ip_adapter(model: str, override: str | None) -> IpAdapterWeights:
    """The IP-Adapter's state dict in the nested layout `load_ip_adapter` accepts, its kind checked."""
    from diffusers.models.modeling_utils import load_state_dict
    from huggingface_hub import hf_hub_download

    repo, subfolder, weight = ip_adapter_location(model, override)
    source = "/".join(p for p in (repo, subfolder, weight) if p)
    try:
        if Path(repo).is_dir():
            file = Path(repo) / subfolder / weight
        else:
            file = hf_hub_download(repo, weight, subfolder=subfolder or None, local_files_only=_offline())
        flat = load_state_dict(str(file))
    except Exception as e:  # missing (offline), unreadable, not safetensors...
        hint = " (HF_HUB_OFFLINE is set: is it in the Hugging Face cache?)" if _offline() and not Path(repo).is_dir() else ""
        raise ModelError(f"cannot read IP-Adapter {source}{hint}: {type(e).__name__}: {_first_line(e)}") from None
    nested = flat if "image_proj" in flat else nest_ip_adapter(flat)  # .bin files hold the nested layout already
    _check_ip_adapter_kind(nested["image_proj"], source)
    return IpAdapterWeights(source, repo, subfolder, nested, digest(nested))


def nest_ip_adapter(flat: dict) -> dict:
    """Flat .safetensors keys in the nested layout `load_ip_adapter` takes: h94's (`image_proj.*`,
    `ip_adapter.*`) and XLabs' for Flux (`ip_adapter_proj_model.*`, `double_blocks.N.processor.
    ip_adapter_double_stream_k_proj.*`), renamed as diffusers' FluxIPAdapterMixin renames them."""
    heads = {"image_proj": "image_proj", "ip_adapter_proj_model": "image_proj", "ip_adapter": "ip_adapter",
             "double_blocks": "ip_adapter"}
    nested = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        if head in heads:
            rest = (rest.replace("ip_adapter_double_stream_k_proj", "to_k_ip")
                    .replace("ip_adapter_double_stream_v_proj", "to_v_ip").replace("processor.", ""))
            nested[heads[head]][rest] = value
    return nested


def _check_ip_adapter_kind(image_proj: dict, source: str) -> None:
    """Refuse, by name, the IP-Adapter kinds whose image embeddings nothing here computes.

    The keys are told apart as diffusers' `_convert_ip_adapter_image_proj_to_diffusers` does.
    Plain (`proj`), Plus (`latents`) and full-face (`proj.3`) take CLIP image embeddings or
    hidden states; FaceID (`norm` without `proj`) and FaceID Plus (`perceiver_resampler`)
    take InsightFace face-identity embeddings.
    """
    if "perceiver_resampler.proj_in.weight" in image_proj:
        kind = "FaceID Plus"
    elif "norm.weight" in image_proj and "proj.weight" not in image_proj:
        kind = "FaceID"
    elif {"proj.weight", "latents", "proj.3.weight"} & image_proj.keys():
        return  # plain, Plus, full-face
    else:
        found = ", ".join(sorted(image_proj)[:6]) or "none"
        raise ModelError(f"IP-Adapter {source}: not an IP-Adapter diffusers can read (image_proj keys: {found}); "
                         "expected plain, Plus or full-face weights")
    raise ModelError(f"IP-Adapter {source} is an IP-Adapter {kind}, which is not supported: it needs InsightFace "
                     "face-identity embeddings, not the CLIP image embeddings computed here; use a plain, Plus "
                     "or full-face adapter (e.g. ip-adapter-plus-face_sd15.safetensors)")


def _first_line(error: Exception, skip_header: bool = False) -> str:
    """The message's first line; torch's "Error(s) in loading state_dict" puts the reason on the next."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    if skip_header and len(lines) > 1 and lines[0].endswith(":"):
        return lines[1] + (f" (and {len(lines) - 2} more)" if len(lines) > 2 else "")
    return lines[0]
