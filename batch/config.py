"""Run-level settings: one small dataclass; a manifest column overrides its field for that row."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .expand import DEFAULT_MAX_ROWS

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@dataclass(frozen=True)
class Defaults:
    """Per-row defaults: what an empty manifest cell means."""

    steps: int | None = None  # None: the family's (families.py: SD 25, SDXL 30, Flux-dev 28, schnell 4)
    cfg: float | None = None  # None: the family's (SD 7.5, SDXL 5, Flux-dev guidance 3.5, schnell 0)
    width: int | None = None  # None: the row's model's own size (models.native_size: tiny 128, SD 1.5 512)
    height: int | None = None
    scheduler: str | None = None  # None: the family's (SD dpmpp_2m_karras, SDXL euler, SD3/Flux flow_euler)
    strength: float = 0.6  # img2img: fraction of the schedule re-run over the init image
    ip_scale: float = 0.6
    image_prompt_method: str = "ip_adapter"
    num_images: int = 1
    negative_prompt: str = ""
    model: str = DEFAULT_MODEL  # the run's --model; a row's `model` column overrides it


@dataclass(frozen=True)
class RunConfig:
    """Everything `run` needs besides the manifest rows."""

    manifest: Path
    out: Path
    model: str = DEFAULT_MODEL
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    batch_size: int | None = None  # None: chosen from device and resolution
    seed: int = 0  # run seed: rows without a seed derive theirs from (seed, id)
    format: str = "png"
    skip_invalid: bool = False
    retry_failed: bool = False
    max_attempts: int = 3  # --retry-failed skips images that failed this many times
    fresh: bool = False
    limit: int | None = None  # first N jobs (rows) only
    wildcards: Path | None = None  # folder of `__name__` files for `expand` templates (expand.py)
    max_rows: int = DEFAULT_MAX_ROWS  # most rows one `expand` / `sweep` row may become: refused past it
    # The manifest adds to what OUT holds (a `--prompt` run into outputs/single): the images of earlier
    # runs stay in the checkpoint, metadata.jsonl and the report instead of being forgotten.
    adds_to_folder: bool = False
    quiet: bool = False
    compile: bool = False
    # Small GPUs: see README "Memory". offload: none | model | sequential.
    offload: str = "none"
    quantize: str = "none"  # none | nf4 | int8: the denoiser and T5 loaded quantised (models.QUANTIZE)
    attention_slicing: bool = False
    vae_slicing: bool = False
    vae_tiling: bool = False
    safety_checker: bool = False  # off by default, as for a batch tool; on where the model ships one
    ip_adapter: str | None = None  # None: tiny's own for --model tiny, else h94/IP-Adapter's SD 1.5 adapter
    clip_score: str | None = None  # a CLIP model (batch/score.py): each batch's images are scored once recorded
    writer_threads: int = 2  # PNG encoding releases the GIL in zlib; two keep up with a GPU
    threads: int | None = None  # torch's CPU threads, set by the entry point (batch/threads.py); None: chosen there
    defaults: Defaults = field(default_factory=Defaults)
