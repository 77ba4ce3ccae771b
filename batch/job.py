"""Validated jobs (one per manifest row) and the images they expand into."""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field

from .families import BY_NAME

MODES = ("txt2img", "img2img", "image_prompt")
FILE_COLUMNS = ("init_image", "prompt_image", "lora", "model")  # relative paths resolve against the manifest
IMAGE_PROMPT_METHODS = ("ip_adapter", "clip_embed")


@dataclass(frozen=True)
class Job:
    """One manifest row with every default resolved; never changed after validation."""

    id: str
    line: int
    stem: str  # file-safe form of id
    mode: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    cfg: float
    seed: int
    num_images: int
    scheduler: str
    strength: float | None = None  # img2img only
    init_image: str | None = None  # absolute path
    init_image_sha: str | None = None
    prompt_image: str | None = None  # absolute path
    prompt_image_sha: str | None = None
    image_prompt_method: str | None = None  # image_prompt only
    ip_scale: float | None = None  # image_prompt with ip_adapter only
    lora: str | None = None
    lora_scale: float | None = None
    model: str = ""  # the row's model, or the run's --model
    family: str = "sd"  # families.Family.name of the model
    prompt_2: str | None = None  # SDXL, SD3, Flux: the second text encoder's prompt (None: the prompt)
    negative_prompt_2: str | None = None
    true_cfg: float | None = None  # Flux: true classifier-free guidance scale (> 1: the negative prompt counts)
    max_sequence_length: int | None = None  # T5 families: tokens of text (None: the pipeline's default)
    extra: tuple[tuple[str, object], ...] = ()  # unknown columns, carried into metadata
    raw: dict = field(default_factory=dict, compare=False, hash=False, repr=False)  # the row as read, for failed.jsonl

    @property
    def row(self) -> str:
        """The manifest row as read, as JSON, its file columns as resolved (absolute paths), so that
        failed.jsonl runs from any folder. Only serialised for rows that are still to make."""
        row = dict(self.raw)
        for column in FILE_COLUMNS:
            if row.get(column) not in (None, ""):
                row[column] = getattr(self, column)
        return json.dumps(row, ensure_ascii=False, default=str)

    def pixel_params(self) -> dict:
        """Every row parameter that changes the pixels (file contents stand for image paths)."""
        return {
            "mode": self.mode,
            "prompt": self.prompt if self.image_prompt_method != "clip_embed" else None,
            "negative_prompt": self.negative_prompt,
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "cfg": self.cfg,
            "seed": self.seed,
            "scheduler": self.scheduler,
            "strength": self.strength,
            "init_image": self.init_image_sha,
            "prompt_image": self.prompt_image_sha,
            "image_prompt_method": self.image_prompt_method,
            "ip_scale": self.ip_scale,
            "lora": self.lora,
            "lora_scale": self.lora_scale,
            "model": self.model,
        } | self.family_params()

    def family_params(self) -> dict:
        """The columns only some families take, where set: rows without them keep the keys they always had."""
        params = {"prompt_2": self.prompt_2, "negative_prompt_2": self.negative_prompt_2, "true_cfg": self.true_cfg,
                  "max_sequence_length": self.max_sequence_length}
        return {k: v for k, v in params.items() if v is not None}

    def batch_key(self) -> tuple:
        """Rows with equal batch keys may share one UNet call."""
        # SDXL encodes "no negative prompt" as zeros, unlike an empty one: such rows cannot share a call.
        zeroed = not self.negative_prompt if BY_NAME[self.family].zero_empty_negative else None
        return (self.steps, self.cfg, self.strength, self.scheduler, self.image_prompt_method, self.ip_scale,
                self.lora_scale, self.true_cfg, self.max_sequence_length, zeroed)

    def images(self, salt: str) -> list[ImageTask]:
        """The images this job makes; `salt` names the run-level settings that change pixels."""
        if self.num_images == 1:
            return [ImageTask(job=self, k=0, seed=self.seed, stem=self.stem, salt=salt)]
        return [ImageTask(job=self, k=k, seed=self.seed + k, stem=f"{self.stem}-{k}", salt=salt)
                for k in range(self.num_images)]


@dataclass(frozen=True)
class ImageTask:
    """Image k of a job: its own seed, file stem and checkpoint key."""

    job: Job
    k: int
    seed: int
    stem: str
    salt: str = ""  # run-level settings that change pixels (dtype)

    @functools.cached_property
    def key(self) -> str:
        """Checkpoint key: a hash of every parameter that changes this image's pixels.

        Computed on first use only: `validate` of a million rows never needs it.
        """
        params = repr(tuple(self.job.pixel_params().values()))  # repr: stable, and cheap at a million rows
        return hashlib.sha256(f"{params}{self.salt}|{self.k}".encode()).hexdigest()[:32]
