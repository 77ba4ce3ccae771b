"""Find and load a model once, and build its pipeline family over one set of weights.

txt2img, img2img and image-prompt pipelines are `from_pipe` views: they hold the very
same UNet, VAE and text encoder objects, so a mixed manifest costs one copy in memory.
LoRA adapters, the IP-Adapter and the scheduler are switched on those shared modules
between batches; nothing is reloaded from disk.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import devices
from .errors import BatchError, ModelError
from .families import OWN_SCHEDULER
from .schedulers import build_scheduler

log = logging.getLogger(__name__)

_PACKAGE = Path(__file__).resolve().parent
# The shipped models: `models/` in a checkout; a wheel carries that same folder as `batch/models_data/`
# (pyproject's package-dir maps one onto the other), so an installed package needs no checkout.
MODELS_DIR = _PACKAGE / "models_data" if (_PACKAGE / "models_data").is_dir() else _PACKAGE.parent / "models"
SD15_CONFIGS = MODELS_DIR / "sd15"  # SD 1.5 configs and tokenizer, no weights
TINY_IP_ADAPTERS = {"tiny": MODELS_DIR / "tiny-ip-adapter" / "ip-adapter_tiny.safetensors",  # trained with it
                    "tiny-sdxl": MODELS_DIR / "tiny-sdxl-ip-adapter" / "ip-adapter_tiny-sdxl.safetensors",  # random
                    "tiny-flux": MODELS_DIR / "tiny-flux-ip-adapter" / "ip_adapter.safetensors"}  # random, XLabs' layout
SD15_IP_ADAPTER = "h94/IP-Adapter/models/ip-adapter_sd15.safetensors"
CLIP_VISION = "openai/clip-vit-large-patch14"  # SD 1.5's text encoder family; 768-d projection
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
HUB_ID = re.compile(r"[\w.\-]{1,96}/[\w.\-]{1,96}")  # org/name, as the Hub allows them
# Model names that are not paths or hub ids -> their folder under MODELS_DIR. The embedded models are
# diffusers folders with weights; the `-random` presets are the real architectures' configs only, built
# with random weights for benchmarks (batch/presets.py). tiny-<family>: one tiny random model per family.
PRESET_FOLDERS = {"tiny": "tiny", "sd15-random": "sd15", "sdxl-random": "sdxl", "flux-random": "flux",
                  **{f"tiny-{name}": f"tiny-{name}" for name in ("sd2-v", "sdxl", "sd3", "flux", "flux-schnell", "pixart")}}
PRESETS = tuple(PRESET_FOLDERS)
RANDOM_PRESETS = ("sd15-random", "sdxl-random", "flux-random")
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
OFFLOAD = ("none", "model", "sequential")
# --quantize: diffusers' PipelineQuantizationConfig backend and arguments (bitsandbytes; CUDA only).
QUANTIZE = {"none": None,
            "nf4": ("bitsandbytes_4bit", {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}),
            "int8": ("bitsandbytes_8bit", {"load_in_8bit": True})}

HUB_TIMEOUT_S = 10  # asking the Hub whether a model exists: a dead network must not stall the run for long


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from and how it loads."""

    name: str  # as the user wrote it
    kind: str  # folder | hub | single_file | random (a benchmark preset: configs, random weights)
    location: str  # path or hub id


@dataclass(frozen=True)
class LoadOptions:
    """How to place a model in memory: precision and the small-GPU switches."""

    device: str
    dtype: str
    offload: str = "none"  # model: whole components to the GPU in turn; sequential: layer by layer
    attention_slicing: bool = False
    vae_slicing: bool = False
    vae_tiling: bool = False
    safety_checker: bool = False
    ip_adapter: str | None = None  # None: the model's default (tiny's own, else h94's SD 1.5 adapter)
    compile: bool = False  # regional torch.compile of the denoiser's transformer blocks
    dtype_auto: bool = False  # --dtype auto: each family's own precision on CUDA (see family_dtype)
    quantize: str = "none"  # a QUANTIZE name


def resolve_model(name: str) -> ModelSource:
    """A model name to a source: a preset, a diffusers folder, a single file, or a hub id."""
    if name in PRESET_FOLDERS:
        path = MODELS_DIR / PRESET_FOLDERS[name]
        if not (path / "model_index.json").exists():
            raise ModelError(f"the shipped model '{name}' is missing at {path}: reinstall sdbatch (the package ships "
                             f"it), or in a checkout restore models/{PRESET_FOLDERS[name]} from git")
        return ModelSource(name, "random" if name in RANDOM_PRESETS else "folder", str(path))
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelError(f"{path}: a single-file checkpoint must end in {', '.join(SINGLE_FILE_SUFFIXES)}")
        return ModelSource(name, "single_file", str(path.resolve()))
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelError(f"{path} is not a diffusers model folder (no model_index.json)")
        return ModelSource(name, "folder", str(path.resolve()))
    if HUB_ID.fullmatch(name):
        check_hub_model(name)
        return ModelSource(name, "hub", name)
    raise ModelError(f"model '{name}' is neither an existing folder or checkpoint file nor a hub id like 'org/name'")


def check_hub_model(name: str) -> None:
    """A hub model is in the local cache, or the Hub says it exists; else a ModelError saying what to do.

    Asked before anything loads, so a model that cannot be fetched stops the run with one line
    instead of failing every job at load time.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "model_index.json"), str):
        return
    if _offline():
        raise ModelError(f"model '{name}' is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                         f"HF_HUB_OFFLINE is set: {_download_hint(name)}")
    _ask_hub(name)


_HUB_ANSWERS: dict[str, ModelError | None] = {}  # once per process and model, failures included


def _ask_hub(name: str) -> None:
    """Whether the Hub has the model: asked once a process (validation, describing the family and the load
    all ask), so a dead network costs one timeout, not one per question."""
    if name not in _HUB_ANSWERS:
        try:
            _ask_hub_once(name)
            _HUB_ANSWERS[name] = None
        except ModelError as e:
            _HUB_ANSWERS[name] = e
    if _HUB_ANSWERS[name] is not None:
        raise _HUB_ANSWERS[name]


def _ask_hub_once(name: str) -> None:
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().model_info(name, timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise ModelError(f"model '{name}': no such model on the Hugging Face Hub ({constants.ENDPOINT}), or it is "
                         "private (log in with `hf auth login`); check the name, or point --model at a local "
                         "folder or file") from None
    except HfHubHTTPError as e:
        raise ModelError(f"model '{name}' is not in the Hugging Face cache and the Hub ({constants.ENDPOINT}) "
                         f"answered {str(e).splitlines()[0]}: {_download_hint(name)}") from None
    except Exception as e:  # whatever the transport raises (refused, DNS, timeout, TLS, proxy): no Hub
        raise ModelError(f"model '{name}' is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub "
                         f"({constants.ENDPOINT}) cannot be reached ({type(e).__name__}: {e}): "
                         f"{_download_hint(name)}") from None


def _download_hint(name: str) -> str:
    return (f"download it with `hf download {name}` where there is a network (into the same HF_HOME), "
            "or point --model at a local diffusers folder or .safetensors file")


def native_size(model: str) -> int:
    """The side in pixels a model draws at: the size of rows that give no width or height.

    As diffusers' pipelines default, from the configs on disk (tiny: 128, SDXL: 1024); hub ids not
    downloaded get SD 1.5's 512. Never raises: a model that cannot be found is reported by `resolve_model`.
    """
    from .families import describe

    return describe(model).size


def resolve_device(name: str) -> str:
    """"cpu" or an indexed "cuda:N" (torch.cuda.set_device and friends refuse a bare "cuda");
    auto and cuda take the current CUDA device, GPU 0 unless the caller chose another."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise BatchError(f"--device {name}: use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BatchError(f"--device {name}: no CUDA device is available here (use --device cpu)")
    if name == "cuda":
        return f"cuda:{torch.cuda.current_device()}"
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise BatchError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return name


def resolve_dtype(name: str, device: str) -> str:
    if name == "auto":
        return "fp16" if device.startswith("cuda") else "fp32"
    if name not in DTYPES:
        raise BatchError(f"--dtype {name}: use auto, fp16, bf16 or fp32")
    if name == "fp16" and device == "cpu":
        raise BatchError("--dtype fp16 on the CPU: many CPU kernels have no fp16 version; use fp32 or bf16")
    return name


def check_options(options: LoadOptions) -> None:
    """Options that need an accelerator, or that cannot go together, fail before anything loads."""
    if options.offload not in OFFLOAD:
        raise BatchError(f"--offload {options.offload}: use {', '.join(OFFLOAD)}")
    if options.quantize not in QUANTIZE:
        raise BatchError(f"--quantize {options.quantize}: use {', '.join(QUANTIZE)}")
    if options.quantize != "none" and not options.device.startswith("cuda"):
        raise BatchError(f"--quantize {options.quantize} uses bitsandbytes' CUDA kernels: it needs a CUDA device "
                         f"(the device is {options.device})")
    if options.offload != "none" and not options.device.startswith("cuda"):
        raise BatchError(f"--offload {options.offload} moves weights between CPU and GPU memory: it needs a CUDA device "
                         f"(the device is {options.device})")


def quiet_libraries() -> None:
    """Our progress bar and log replace diffusers' and transformers' bars and warnings."""
    import transformers.utils.logging as transformers_logging

    transformers_logging.set_verbosity_error()  # before diffusers imports its pipelines, which warn
    transformers_logging.disable_progress_bar()
    import diffusers.utils.logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _torch_dtype(dtype: str):
    import torch

    return getattr(torch, DTYPES[dtype])


@dataclass
class PipelineFamily:
    """One model's loaded modules, the pipeline views that share them, and what is switched on them."""

    model: str
    options: LoadOptions  # dtype as loaded: --dtype auto resolves per family (bf16 for SD3/Flux on CUDA)
    spec: object  # families.Family: what this model's family takes and how it generates
    txt2img: object
    img2img: object  # None where the family has no img2img pipeline
    image_prompt: object  # None where the family takes no image prompts
    load_s: float
    schedulers: dict = field(default_factory=dict)
    base_scheduler_config: dict | None = None  # the model's own: every scheduler is built from it
    adapters: object = None  # the run's AdapterStore: LoRA and IP-Adapter weights, checked before any load
    loras: dict = field(default_factory=dict)  # reference -> adapter name, while loaded (one LoRA at a time)
    active_lora: tuple | None = None  # (reference, scale) now applied
    ip_image_encoder: object = None  # unload_ip_adapter() drops it from the pipeline; we keep it
    ip_attached: bool = False
    clip_vision: tuple | None = None  # (encoder, processor) for clip_embed rows

    @property
    def device(self) -> str:
        return self.options.device

    @property
    def dtype(self) -> str:
        return self.options.dtype

    def view(self, mode: str):
        return {"txt2img": self.txt2img, "img2img": self.img2img, "image_prompt": self.image_prompt}[mode]

    def views(self) -> list:
        return [v for v in (self.txt2img, self.img2img, self.image_prompt) if v is not None]

    def use_scheduler(self, name: str) -> None:
        """Switch every view to the named scheduler; built once per name, no weights touched."""
        if self.base_scheduler_config is None:
            self.base_scheduler_config = dict(self.txt2img.scheduler.config)
            self.schedulers[OWN_SCHEDULER] = self.txt2img.scheduler
        if name not in self.schedulers:
            # From the model's config, never the previous scheduler's: options such as karras
            # sigmas must not leak from one batch's scheduler into the next.
            self.schedulers[name] = build_scheduler(name, self.base_scheduler_config)
        for pipe in self.views():
            pipe.scheduler = self.schedulers[name]

    def use_lora(self, reference: str | None, scale: float | None) -> bool:
        """Apply one LoRA at a scale (None: none); each file is loaded once. Returns whether it changed."""
        wanted = (reference, scale) if reference else None
        if wanted == self.active_lora:
            return False
        pipe = self.txt2img
        if reference is None:
            pipe.disable_lora()
        else:
            if reference not in self.loras:
                from .adapters import load_lora

                name = "lora_" + hashlib.sha1(reference.encode()).hexdigest()[:10]
                started = time.perf_counter()
                load_lora(pipe, self.adapter_store().lora(reference, self.spec), name, self.spec)  # checked before the run
                log.info("loaded LoRA %s in %.2fs", reference, time.perf_counter() - started)
                self.loras[reference] = name
            pipe.enable_lora()
            pipe.set_adapters([self.loras[reference]], adapter_weights=[scale])
        self.active_lora = wanted
        return True

    def use_ip_adapter(self, on: bool, scale: float | None = None) -> None:
        """Attach the IP-Adapter to the shared UNet for ip_adapter batches, detach it for the rest.

        A UNet with an IP-Adapter attached requires image embeddings on every call, so
        plain rows need it detached; re-attaching comes from the state dict in memory.
        """
        pipe = self.image_prompt
        if on and not self.ip_attached:
            weights = self.adapter_store().ip_adapter(self.model)  # read, and its kind checked, before the run
            if self.ip_image_encoder is None:
                if pipe.image_encoder is None:  # SD 1.5 ships none: the adapter's own
                    _attach_ip_image_encoder(self, weights.repo, weights.subfolder, self.spec.ip_image_encoder)
                self.ip_image_encoder = pipe.image_encoder
            elif pipe.image_encoder is None:
                pipe.register_modules(image_encoder=self.ip_image_encoder)
            # No image encoder from the state dict: it is registered above (the keyword differs by family)
            encoder = ("image_encoder_folder" if "image_encoder_folder" in inspect.signature(pipe.load_ip_adapter).parameters
                       else "image_encoder_pretrained_model_name_or_path")
            pipe.load_ip_adapter(weights.state_dict, subfolder="", weight_name="", **{encoder: None})
            self.ip_attached = True
        elif not on and self.ip_attached:
            pipe.unload_ip_adapter()
            self.ip_attached = False
        if on:
            pipe.set_ip_adapter_scale(scale)

    def adapter_store(self):
        if self.adapters is None:  # a family used outside a run: adapters are read when first used
            from .adapters import AdapterStore

            self.adapters = AdapterStore(self.options.ip_adapter)
        return self.adapters

    def clip_vision_encoder(self):
        """(encoder, processor) for clip_embed rows: the model's own, else CLIP ViT-L/14's."""
        if self.clip_vision is None:
            pipe = self.txt2img
            if getattr(pipe, "image_encoder", None) is not None and pipe.feature_extractor is not None:
                self.clip_vision = (pipe.image_encoder, pipe.feature_extractor)
            elif self.model == "sd15-random":
                self.clip_vision = _random_clip_vision(self.options)
            else:
                self.clip_vision = _load_clip_vision(pipe, self.options)
        return self.clip_vision

    def unload(self) -> int | None:
        """Drop the modules so the next model has the memory; returns the bytes freed (CUDA) if known."""
        before = devices.allocated(self.device)
        self.txt2img = self.img2img = self.image_prompt = None
        self.schedulers.clear()
        self.clip_vision = self.ip_image_encoder = None
        devices.free_cache(self.device)
        return None if before is None else before - devices.allocated(self.device)


def family_dtype(options: LoadOptions, spec) -> str:
    """--dtype auto on CUDA: the family's own half precision (bf16 for SD3/Flux, whose activations overflow fp16)."""
    if options.dtype_auto and options.device.startswith("cuda"):
        return spec.cuda_dtype
    return options.dtype


def load_family(model: str, options: LoadOptions) -> PipelineFamily:
    """Load the model's modules once and build a view per mode its family has, all over one set of weights."""
    quiet_libraries()
    from diffusers import AutoPipelineForImage2Image

    from .families import describe

    check_options(options)
    source = resolve_model(model)
    spec = describe(model).family
    options = dataclasses.replace(options, dtype=family_dtype(options, spec))
    started = time.perf_counter()
    pipe = _load_pipeline(source, options, spec)
    _place(pipe, options, spec)
    family = PipelineFamily(
        model=model, options=options, spec=spec, txt2img=pipe,
        img2img=AutoPipelineForImage2Image.from_pipe(pipe) if "img2img" in spec.modes else None,
        image_prompt=image_prompt_pipeline_class(type(pipe)).from_pipe(pipe) if "image_prompt" in spec.modes else None,
        load_s=0.0,
    )
    for view in family.views():
        view.set_progress_bar_config(disable=True)
    devices.synchronize(options.device)
    family.load_s = time.perf_counter() - started
    log.info("loaded %s (%s, %s family, %s) on %s, %s, in %.1fs", model, source.kind, spec.name,
             type(pipe).__name__, options.device, options.dtype, family.load_s)
    return family


@functools.lru_cache(maxsize=None)  # one class per family: from_pipe and isinstance see the same one
def image_prompt_pipeline_class(base):
    """The family's pipeline (SD 1.x/2.x, SDXL, Flux) taking precomputed IP-Adapter embeddings per row.

    diffusers repeats `ip_adapter_image_embeds` batch_size times (it assumes one image prompt
    for the whole batch), which would mix the prompt images of a batch; here each row
    brings its own embedding, laid out as the denoiser wants it (UNets: [negatives; positives]).
    """

    class ImagePromptPipeline(base):
        def prepare_ip_adapter_image_embeds(self, ip_adapter_image, ip_adapter_image_embeds, device, *args):
            if ip_adapter_image_embeds is None:  # Flux's negative image prompt under true CFG: diffusers' own
                return super().prepare_ip_adapter_image_embeds(ip_adapter_image, None, device, *args)
            return [embeds.to(device) for embeds in ip_adapter_image_embeds]

    return ImagePromptPipeline


def _load_pipeline(source: ModelSource, options: LoadOptions, spec):
    """The family's text-to-image pipeline: AutoPipelineForText2Image for folders and hub ids, the family's
    own class for single files (with shipped configs, offline), or a benchmark preset built with random weights."""
    import diffusers

    dtype = _torch_dtype(options.dtype)
    checker = {}
    if spec.safety_checker and not options.safety_checker:
        checker = {"safety_checker": None, "requires_safety_checker": False}
    if options.quantize != "none" and source.kind in ("random", "single_file"):
        raise ModelError(f"--quantize applies as a diffusers folder or hub model loads; '{source.name}' is a "
                         f"{'benchmark preset' if source.kind == 'random' else 'single file'}")
    try:
        if source.kind == "random":
            from .presets import build

            # Offloaded: built in host memory, from where the offload hooks move each module in turn.
            return build(source.name, "cpu" if options.offload != "none" else options.device, dtype)
        if source.kind == "single_file":
            config = single_file_config(Path(source.location), spec)
            pipeline = getattr(diffusers, spec.pipelines[0])
            # config= a shipped folder keeps from_single_file offline; image_encoder=None because
            # checkpoints carry none (and the tiny config's would be looked for in the file).
            extra = {"image_encoder": None} if spec.safety_checker else {}  # SD's image encoder slot
            if _same_width_text_encoders(config):  # diffusers would load CLIP-L's weights into both
                from .single_file import load_sdxl_text_encoder_2

                extra["text_encoder_2"] = load_sdxl_text_encoder_2(source.location, config).to(dtype)
            return pipeline.from_single_file(source.location, config=str(config), local_files_only=True, dtype=dtype,
                                             **extra, **checker)
        if options.quantize != "none":
            checker["quantization_config"] = quantization_config(options, spec, source.location)
        return diffusers.AutoPipelineForText2Image.from_pretrained(
            source.location, dtype=dtype, local_files_only=_offline(), **checker)
    except (OSError, ValueError) as e:
        hint = " (HF_HUB_OFFLINE is set and it is not in the Hugging Face cache)" if _offline() and source.kind == "hub" else ""
        raise ModelError(f"cannot load model '{source.name}'{hint}: {str(e).splitlines()[0]}") from None


def quantization_arguments(options: LoadOptions, spec, index: dict) -> dict:
    """PipelineQuantizationConfig's arguments for --quantize: the family's denoiser and its T5 encoder
    (9.5 GB in bf16; `index` is the model_index.json), computing in the run's dtype, as the diffusers
    docs do for Flux on a 24 GB card."""
    backend, kwargs = QUANTIZE[options.quantize]
    if backend == "bitsandbytes_4bit":
        kwargs = dict(kwargs, bnb_4bit_compute_dtype=_torch_dtype(options.dtype))
    t5 = [name for name, entry in index.items() if isinstance(entry, list) and entry[-1] == "T5EncoderModel"]
    return {"quant_backend": backend, "quant_kwargs": kwargs, "components_to_quantize": [spec.denoiser, *t5]}


def quantization_config(options: LoadOptions, spec, location: str):
    from diffusers import DiffusionPipeline
    from diffusers.quantizers import PipelineQuantizationConfig

    try:
        index = DiffusionPipeline.load_config(location, local_files_only=_offline())
    except OSError:
        index = {}
    try:
        return PipelineQuantizationConfig(**quantization_arguments(options, spec, index))
    except (ImportError, ValueError) as e:  # bitsandbytes missing or too old
        raise ModelError(f"--quantize {options.quantize}: {str(e).splitlines()[0]} (pip install bitsandbytes)") from None


def _place(pipe, options: LoadOptions, spec) -> None:
    """Device placement and the memory switches, applied to the shared modules."""
    if options.offload == "model":
        pipe.enable_model_cpu_offload(device=options.device)
    elif options.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=options.device)
    else:
        pipe.to(options.device)
    if options.attention_slicing:
        pipe.enable_attention_slicing()
    if options.vae_slicing:
        pipe.vae.enable_slicing()
    if options.vae_tiling:
        pipe.vae.enable_tiling()
    denoiser = getattr(pipe, spec.denoiser)
    if options.compile:
        if options.device.startswith("cuda"):  # convolutions prefer NHWC on tensor cores
            import torch

            denoiser.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        # Regional compilation: the repeated transformer blocks compile once and are reused,
        # a fraction of a whole-model compile's time for most of its speed-up. Denoisers that declare
        # no repeated blocks to diffusers (SD3's, PixArt's in 0.42) are compiled whole.
        if getattr(denoiser, "_repeated_blocks", None):
            denoiser.compile_repeated_blocks(fullgraph=True)
        else:
            denoiser.compile()
    if options.safety_checker and getattr(pipe, "safety_checker", None) is None:
        log.warning("--safety-checker: this model ships no safety checker; images are not checked")


def single_file_config(path: Path, spec=None) -> Path:
    """The shipped config folder that matches a single-file checkpoint: the family's real configs
    (models/sd15, models/sdxl) or a shipped tiny model of that family with the same UNet width."""
    from .families import single_file_family

    spec = spec or single_file_family(path)
    if spec.single_file_config is None:
        raise ModelError(f"{path}: a {spec.label} single file holds the denoiser alone; diffusers cannot build "
                         "the whole pipeline from it offline: use the model's diffusers folder or hub id")
    real = MODELS_DIR / spec.single_file_config
    width = _conv_in_channels(path)
    if width is None or width == 320:
        return real  # .ckpt: reading it means unpickling; assume the family's real size
    for folder in sorted(MODELS_DIR.glob("tiny*")):
        if _tiny_conv_in_channels(folder) == width and (folder / "model_index.json").exists() and \
                json.loads((folder / "model_index.json").read_text())["_class_name"] in spec.pipelines:
            return folder
    raise ModelError(f"{path}: UNet width {width} matches no shipped {spec.label} config "
                     f"({spec.label} single files have 320)")


def config_folder(model: str) -> Path | None:
    """The folder holding a model's configs: its own folder, a preset's, the shipped configs its single file
    loads with, or its hub snapshot (`families.describe` has fetched the JSON files there, online); None where
    they are not on disk, or the name resolves to nothing (`run` and `validate` say so themselves)."""
    try:
        source = resolve_model(model)
    except ModelError:
        return None
    if source.kind in ("folder", "random"):
        return Path(source.location)
    if source.kind == "single_file":
        return single_file_config(Path(source.location))
    from huggingface_hub import try_to_load_from_cache

    index = try_to_load_from_cache(source.location, "model_index.json")
    return Path(index).parent if isinstance(index, str) else None


def _same_width_text_encoders(config: Path) -> bool:
    """Two text encoders of one width (tiny SDXL models): see single_file.load_sdxl_text_encoder_2."""
    widths = [json.loads(p.read_text()).get("hidden_size")
              for p in (config / "text_encoder" / "config.json", config / "text_encoder_2" / "config.json") if p.exists()]
    return len(widths) == 2 and widths[0] == widths[1]


def _conv_in_channels(path: Path) -> int | None:
    if path.suffix.lower() != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for key in ("model.diffusion_model.input_blocks.0.0.weight", "conv_in.weight"):
            if key in f.keys():
                return f.get_slice(key).get_shape()[0]
    raise ModelError(f"{path}: not a Stable Diffusion checkpoint (no UNet input convolution found)")


def _tiny_conv_in_channels(folder: Path) -> int | None:
    config = folder / "unet" / "config.json"
    return json.loads(config.read_text())["block_out_channels"][0] if config.exists() else None


def ip_image_encoder_location(repo: str, subfolder: str, fallback: str | None) -> tuple[str, str]:
    """(repo or folder, subfolder) of an IP-Adapter's image encoder: its own `image_encoder/`, or, for a family
    whose adapters ship without one (XLabs' for Flux), the family's CLIP."""
    folder = "/".join(p for p in (subfolder, "image_encoder") if p)
    if fallback and not (Path(repo) / folder / "config.json").exists():
        return fallback, ""
    return repo, folder


def _attach_ip_image_encoder(family: PipelineFamily, repo: str, subfolder: str, fallback: str | None = None) -> None:
    """The adapter's own CLIP image encoder (SD 1.5 has none), registered on the image-prompt view; adapters
    shipped without one (XLabs' for Flux) use the family's `fallback` CLIP."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    repo, folder = ip_image_encoder_location(repo, subfolder, fallback)
    kwargs = {"local_files_only": _offline()}
    if Path(repo).is_dir():
        encoder = CLIPVisionModelWithProjection.from_pretrained(Path(repo) / folder, dtype=_torch_dtype(family.dtype))
    else:
        encoder = CLIPVisionModelWithProjection.from_pretrained(repo, subfolder=folder, dtype=_torch_dtype(family.dtype), **kwargs)
    pipe = family.image_prompt
    pipe.register_modules(image_encoder=encoder.to(family.device), feature_extractor=CLIPImageProcessor())


def _random_clip_vision(options: LoadOptions):
    """CLIP ViT-L/14's architecture with random weights, for sd15-random's clip_embed rows."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    with torch.device(options.device):
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig.from_pretrained(SD15_CONFIGS / "image_encoder"))
    processor = CLIPImageProcessor.from_pretrained(SD15_CONFIGS / "feature_extractor")
    return encoder.to(dtype=_torch_dtype(options.dtype)).eval(), processor


def _load_clip_vision(pipe, options: LoadOptions):
    """Models without an image encoder (SD 1.5) get CLIP ViT-L/14's for clip_embed rows."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(
            CLIP_VISION, dtype=_torch_dtype(options.dtype), local_files_only=_offline())
        processor = CLIPImageProcessor.from_pretrained(CLIP_VISION, local_files_only=_offline())
    except OSError as e:
        raise ModelError(f"clip_embed rows need an image encoder; cannot load {CLIP_VISION}: {str(e).splitlines()[0]}") from None
    width = pipe.unet.config.cross_attention_dim
    if encoder.config.projection_dim != width:
        raise ModelError(f"{CLIP_VISION} projects to {encoder.config.projection_dim}, but the UNet expects {width}")
    return encoder.to(options.device), processor
