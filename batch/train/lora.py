"""`sdbatch train-lora DATASET --out DIR`: a LoRA on the UNet's attention, trained with accelerate + peft.

Read top to bottom as diffusers' `train_text_to_image_lora.py`: check everything, load,
add the adapter, optimizer and LR schedule, `accelerator.prepare`, resume, the loop, save.

What differs, and why:
- Every random draw of a step (noise, timesteps, flips, caption dropout) comes from a
  generator seeded with (seed, micro-batch, rank), and the batch order is a pure function of
  (seed, micro-batch): 10 steps + kill + resume 10 gives the same adapter as 20 straight.
- Latents are the VAE posterior's mean, cached or not, so `--cache-latents` changes speed only.
- Checkpoints hold the LoRA weights (not the frozen model), optimizer, LR schedule and RNG
  (`accelerator.save_state`), written to a temp folder and renamed: a kill never leaves half
  of one as the latest.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import DEFAULT_MODEL
from ..context import RunContext
from ..errors import BatchError
from ..interrupt import EXIT_INTERRUPTED, GracefulStop
from ..progress import StepProgress
from .dataset import BatchOrder, Example, Fingerprint, fingerprint, read_dataset
from .export import DIFFUSERS_NAME, kohya_metadata, save_diffusers, save_kohya
from .validation import ValidationSpec, validate, write_page

log = logging.getLogger(__name__)

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
PRECISIONS = ("no", "fp16", "bf16")
PREDICTION_TYPES = ("epsilon", "v_prediction")  # the targets _loss knows, as diffusers' LoRA example
TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")  # every attention projection, as diffusers' LoRA example
STATE_FILE = "trainer_state.json"
CHECKPOINT = re.compile(r"checkpoint-(\d+)")
# Settings a resumed run must share with the run it continues (max_steps may grow; the rest is bookkeeping).
FIXED_ON_RESUME = ("model", "rank", "alpha", "batch_size", "grad_accum", "seed", "resolution", "random_flip",
                   "caption_dropout", "snr_gamma", "noise_offset", "target_modules", "lr", "lr_scheduler",
                   "lr_warmup_steps", "mixed_precision")


class TrainingError(BatchError):
    """Training stopped on its own (a non-finite loss); the last good checkpoint is kept."""

    exit_code = 1


@dataclass(frozen=True)
class LoraTrainConfig:
    """Everything `train-lora` needs; the defaults are the seed's "balanced" column (see README)."""

    dataset: Path
    out: Path
    model: str = DEFAULT_MODEL
    rank: int = 4  # 2 fast and coarse, 4 balanced, 8-16 for fine detail (file size grows with it)
    alpha: float | None = None  # None: = rank (scale 1), what diffusers' trainer does
    lr: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_steps: int = 500
    batch_size: int = 1
    grad_accum: int = 1
    mixed_precision: str = "no"  # fp16 | bf16: frozen weights in that dtype, LoRA weights kept in fp32
    gradient_checkpointing: bool = False
    seed: int = 0
    resolution: int | None = None  # None: each image's own size (prepare-dataset made them fit)
    random_flip: bool = False
    caption_dropout: float = 0.0  # share of captions replaced by "" (keeps the prompt-free model usable)
    snr_gamma: float | None = None  # min-SNR weighting; 5 is the paper's value
    noise_offset: float = 0.0
    cache_latents: bool = False
    checkpoint_every: int = 100
    keep_checkpoints: int | None = None  # None: keep all
    resume: str | None = None  # "latest" or a checkpoint folder
    validation_prompts: tuple[str, ...] = ()
    validation_every: int | None = None  # None: at every checkpoint
    validation_images: int = 2  # per prompt
    name: str | None = None  # the kohya file's stem; None: DIR's name
    device: str = "auto"
    quiet: bool = False
    max_grad_norm: float = 1.0
    target_modules: tuple[str, ...] = TARGET_MODULES

    def settings(self) -> dict:
        """The training settings as plain JSON (written into train.json and both adapter files)."""
        keep = {k: v for k, v in asdict(self).items() if k not in ("dataset", "out", "resume", "quiet", "device")}
        alpha = self.alpha if self.alpha is not None else self.rank
        keep["alpha"] = int(alpha) if float(alpha).is_integer() else alpha  # "8", as kohya writes it, not "8.0"
        keep["target_modules"] = list(self.target_modules)
        keep["validation_prompts"] = list(self.validation_prompts)
        keep["dataset"] = str(Path(self.dataset).resolve())
        return keep


@dataclass
class TrainResult:
    out: Path
    step: int
    interrupted: bool = False
    final: Path | None = None
    kohya: Path | None = None
    losses: list[float] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.interrupted else 0


# --- 1. check everything, before any model loads ----------------------------------------------------

def check_config(config: LoraTrainConfig, context: RunContext) -> tuple[list[Example], Path | None]:
    """The dataset's examples and the checkpoint to resume from; raises BatchError (exit 2) for bad input."""
    from ..models import resolve_model

    for name in ("rank", "max_steps", "batch_size", "grad_accum", "checkpoint_every", "validation_images"):
        if getattr(config, name) < 1:
            raise BatchError(f"--{name.replace('_', '-')} must be >= 1 but is {getattr(config, name)}")
    if config.lr <= 0 or not math.isfinite(config.lr):
        raise BatchError(f"--lr must be a positive number but is {config.lr}")
    if config.alpha is not None and config.alpha <= 0:
        raise BatchError(f"--alpha must be > 0 but is {config.alpha}")
    if not 0 <= config.caption_dropout < 1:
        raise BatchError(f"--caption-dropout must be in [0, 1) but is {config.caption_dropout}")
    if config.lr_scheduler not in LR_SCHEDULERS:
        raise BatchError(f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)} but is {config.lr_scheduler!r}")
    if config.mixed_precision not in PRECISIONS:
        raise BatchError(f"--mixed-precision must be one of {', '.join(PRECISIONS)} but is {config.mixed_precision!r}")
    if config.keep_checkpoints is not None and config.keep_checkpoints < 1:
        raise BatchError(f"--keep-checkpoints must be >= 1 but is {config.keep_checkpoints}")
    if config.validation_every is not None and config.validation_every < 1:
        raise BatchError(f"--validation-every must be >= 1 but is {config.validation_every}")
    if config.mixed_precision == "fp16" and context.device == "cpu":
        raise BatchError("--mixed-precision fp16 needs a CUDA device: use bf16 or no on a CPU")
    source = resolve_model(config.model)
    if source.kind == "random":
        raise BatchError(f"{config.model} has random weights: train on a real model (a folder, file or hub id)")
    examples = read_dataset(config.dataset, config.resolution)
    return examples, _resume_from(config, examples, context.ranks.world_size)


def _resume_from(config: LoraTrainConfig, examples: list[Example], processes: int) -> Path | None:
    out = Path(config.out)
    existing = checkpoints(out)
    if config.resume is None:
        if existing or (out / "train.json").exists():
            latest = f" (latest: {existing[-1].name})" if existing else ""
            raise BatchError(f"{out} already holds a training run{latest}: add --resume latest to continue it, "
                             "or choose another --out")
        return None
    if config.resume == "latest":
        if not existing:
            log.info("--resume latest: no checkpoint in %s yet, starting from step 0", out)
            return None
        chosen = existing[-1]
    else:
        chosen = Path(config.resume)
        if not (chosen / STATE_FILE).is_file():
            raise BatchError(f"--resume {config.resume}: not a checkpoint folder (no {STATE_FILE})")
    previous = out / "train.json"
    if previous.is_file():
        recorded = json.loads(previous.read_text(encoding="utf-8"))
        earlier = recorded.get("settings", {})
        now = config.settings()
        changed = [f"{k}: {earlier.get(k)!r} then, {now[k]!r} now" for k in FIXED_ON_RESUME if earlier.get(k) != now[k]]
        earlier_processes = recorded.get("processes", processes)
        if earlier_processes != processes:  # the LR schedule and the batches of each step depend on it
            changed.append(f"processes: {earlier_processes} then, {processes} now")
        if changed:
            raise BatchError(f"cannot resume {chosen} with other settings ({'; '.join(changed)})")
        if "dataset_fingerprint" in recorded:  # the batches of each step are drawn from the examples by index
            dataset_changes = fingerprint(config.dataset, examples).changes_since(
                Fingerprint(**recorded["dataset_fingerprint"]))
            if dataset_changes:
                raise BatchError(f"cannot resume {chosen}: the training folder {config.dataset} changed since that "
                                 f"run began ({'; '.join(dataset_changes)}); restore it, or train with another --out")
        else:
            log.warning("%s predates dataset fingerprints: not checking that %s is unchanged", previous, config.dataset)
    return chosen


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoint folders in DIR, oldest first (a temp folder of a killed save is not one)."""
    found = []
    if Path(out).is_dir():
        for path in Path(out).iterdir():
            match = CHECKPOINT.fullmatch(path.name)
            if match and (path / STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


# --- 2. the run --------------------------------------------------------------------------------------

def train_lora(config: LoraTrainConfig, context: RunContext | None = None) -> TrainResult:
    """The whole `train-lora` command.

    `context`: this process's place among processes, its device and stop signal; by default,
    its place in a torchrun / accelerate launch (one process if none) with Ctrl-C handlers.
    """
    if context is not None:
        return _check_and_train(config, context)
    with GracefulStop() as stop:
        return _check_and_train(config, RunContext.launched(config.device, stop))


def _check_and_train(config: LoraTrainConfig, context: RunContext) -> TrainResult:
    examples, resume_from = check_config(config, context)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    return _train(config, examples, resume_from, out, context)


def _train(config: LoraTrainConfig, examples: list[Example], resume_from: Path | None, out: Path,
           context: RunContext) -> TrainResult:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from .. import devices
    from ..models import quiet_libraries

    quiet_libraries()
    stop = context.stop
    if context.device.startswith("cuda") and not context.ranks.distributed:
        # one process: accelerate takes "cuda", the current device; under a launcher it sets cuda:LOCAL_RANK itself
        devices.activate(context.device)
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, mixed_precision=config.mixed_precision,
                              cpu=context.device == "cpu")
    main = accelerator.is_main_process
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # 3. load the frozen model and add the adapter
    tokenizer, text_encoder, vae, unet, noise_scheduler = _load(config.model)
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
    set_seed(config.seed)  # the adapter's initial weights
    alpha = config.alpha if config.alpha is not None else config.rank
    unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=list(config.target_modules)))
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    if weight_dtype != torch.float32:
        cast_training_params(unet, dtype=torch.float32)  # the adapter learns in fp32 whatever the frozen weights are
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    parameters = [p for p in unet.parameters() if p.requires_grad]

    # 4. optimizer, LR schedule (stepped once per process per step, as accelerate's prepared schedulers are)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_schedule = get_scheduler(config.lr_scheduler, optimizer,
                                num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                num_training_steps=config.max_steps * accelerator.num_processes)
    unet, optimizer, lr_schedule = accelerator.prepare(unet, optimizer, lr_schedule)
    _register_hooks(accelerator, unet, weight_dtype)

    # 5. resume
    step = 0
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        step = json.loads((resume_from / STATE_FILE).read_text(encoding="utf-8"))["step"]
        log.info("resumed from %s (step %d)", resume_from, step)
    order = BatchOrder(examples, config.batch_size, config.seed)
    latents = _cache_latents(examples, vae, config, accelerator.device, weight_dtype) if config.cache_latents else None
    spec = _validation_spec(config, examples, context.device)
    if main:
        _write_run_file(out, config, examples, accelerator.num_processes, context.device, step)
        _trim_loss_log(out / "loss.csv", step)
        if spec and not (out / "validation" / f"step-{0:06d}" / "images" / "metadata.jsonl").is_file():
            validate(spec, out, 0, None, stop)
    accelerator.wait_for_everyone()

    # 6. the loop
    unet.train()
    result = TrainResult(out, step)
    last_saved = step if resume_from is not None else None
    progress = StepProgress("train-lora", config.max_steps, step, quiet=config.quiet or not main)
    loss = mean = None
    with progress:
        while step < config.max_steps:
            losses = []
            for k in range(config.grad_accum):
                micro = (step * config.grad_accum + k) * accelerator.num_processes + accelerator.process_index
                with accelerator.accumulate(unet):
                    loss = _loss(unet, text_encoder, vae, tokenizer, noise_scheduler, examples, order, micro, latents,
                                 config, accelerator.device, weight_dtype)
                    # the mean over processes, before the check: a non-finite loss on one rank stops every rank
                    # at this step (one raising alone would leave the others in the next collective)
                    mean = accelerator.reduce(loss.detach(), "mean")
                    if not torch.isfinite(mean).all():
                        kept = checkpoints(out)
                        raise TrainingError(
                            f"the loss is {mean.item()} at step {step + 1}: training stopped; "
                            + (f"the last good checkpoint is {kept[-1]} (resume with --resume latest, perhaps "
                               "with a lower --lr)" if kept else "no checkpoint was written yet (lower --lr?)"))
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
                    optimizer.step()
                    lr_schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                losses.append(mean.item())
            step += 1
            mean_loss = sum(losses) / len(losses)
            result.losses.append(mean_loss)
            if main:
                _log_loss(out / "loss.csv", step, mean_loss, lr_schedule.get_last_lr()[0])
            progress.update(step, mean_loss)
            if step % config.checkpoint_every == 0 or step == config.max_steps:
                _save_checkpoint(accelerator, out, step, config.keep_checkpoints)
                last_saved = step
            if spec and main and (step % (config.validation_every or config.checkpoint_every) == 0
                                  or step == config.max_steps):
                with progress.paused():
                    _validate_now(spec, out, step, accelerator.unwrap_model(unet), stop)
            accelerator.wait_for_everyone()
            if stop.requested:
                accelerator.set_trigger()
            # an interrupt that reached only some processes stops them all at this step (one stopping alone
            # would leave the others waiting in an all-reduce): check_trigger is true everywhere if set anywhere
            if accelerator.check_trigger() and step < config.max_steps:
                if last_saved != step:
                    _save_checkpoint(accelerator, out, step, config.keep_checkpoints)
                log.warning("stopped at step %d; checkpoint saved: run the same command with --resume latest", step)
                result.interrupted = True
                break

    # 7. save the adapter in both formats, as diffusers' trainers end: every process waits here, then the main
    # process writes; then every process tears down together (below).
    result.step = step
    accelerator.wait_for_everyone()
    if main and not result.interrupted:
        model = accelerator.unwrap_model(unet)
        settings = config.settings()
        meta = kohya_metadata(settings, step, len(examples), config.model)
        result.final = save_diffusers(model, out / "final", meta)
        result.kohya = save_kohya(model, out / "final" / f"{config.name or out.name}.safetensors", meta)
        _write_run_file(out, config, examples, accelerator.num_processes, context.device, step, finished=True)
        if spec:
            write_page(out, spec)
        log.info("adapter: %s (diffusers) and %s (kohya/A1111)", result.final, result.kohya)
        del model
    del unet, optimizer, lr_schedule, parameters, loss, mean  # the DDP wrapper (and its graph) hold the group
    _end(accelerator)
    return result


def _end(accelerator) -> None:
    """Tear down on every process at once, while every peer is still there.

    A rank that freed its DDP wrapper (and so its gloo process group) after rank 0 had left sat in
    gloo's teardown for ever (CI, and 1 of 8 local runs of test_ranks' train-lora test): so every rank
    waits until rank 0 has written final/, drops what accelerate prepared, and only then destroys the group.
    """
    import gc

    accelerator.wait_for_everyone()
    accelerator.free_memory()  # accelerate's own references to the prepared model, optimizer and schedule
    gc.collect()
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group


def _load(model: str):
    """The frozen parts of the model (tokenizer, text encoder, VAE, UNet) and its noise schedule, in fp32;
    BatchError for a model whose prediction type this trainer has no target for."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from ..errors import ModelError
    from ..models import resolve_model

    source = resolve_model(model)
    try:
        if source.kind == "single_file":
            pipe = StableDiffusionPipeline.from_single_file(source.location, safety_checker=None)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(source.location, safety_checker=None,
                                                           requires_safety_checker=False)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {model!r}: {e}") from e
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:  # "sample" would be trained against another target
        raise BatchError(f"model {model!r}: its scheduler has prediction_type {prediction_type!r}; train-lora "
                         f"trains {' or '.join(PREDICTION_TYPES)} models only")
    return pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, noise_scheduler


def _register_hooks(accelerator, unet, weight_dtype) -> None:
    """Checkpoints hold the adapter only, in diffusers' format (as the diffusers LoRA examples do)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.training_utils import cast_training_params
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    unet_class = type(accelerator.unwrap_model(unet))

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                if isinstance(model, unet_class):
                    save_diffusers(model, Path(output_dir))
                weights.pop()

    def load_hook(models, input_dir):
        target = None
        while models:
            model = models.pop()
            if isinstance(model, unet_class):
                target = model
        state, _ = StableDiffusionPipeline.lora_state_dict(input_dir, weight_name=DIFFUSERS_NAME)
        unet_state = convert_unet_state_dict_to_peft(
            {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")})
        result = set_peft_model_state_dict(target, unet_state, adapter_name="default")
        if getattr(result, "unexpected_keys", None):
            raise BatchError(f"{input_dir}: the checkpoint does not fit this adapter ({result.unexpected_keys[:3]} ...)")
        if weight_dtype != torch.float32:
            cast_training_params(target, dtype=torch.float32)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _pixels(example: Example, flip: bool):
    """The image as a 3 x H x W tensor in [-1, 1], square-cropped to the resolution when one was given."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    from .prepare import read_image

    image = read_image(example.image)
    if image.size != (example.width, example.height):
        image = ImageOps.fit(image, (example.width, example.height), Image.LANCZOS)
    if flip:
        image = ImageOps.mirror(image)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def _encode(vae, pixels, device, dtype):
    """Scaled latent means: deterministic, so caching them changes nothing but speed."""
    import torch

    with torch.no_grad():
        latents = vae.encode(pixels.to(device, dtype=dtype)).latent_dist.mode()
    return (latents * vae.config.scaling_factor).float()


def _cache_latents(examples, vae, config: LoraTrainConfig, device, dtype) -> dict:
    """{(index, flipped): latent} for every example (both orientations with --random-flip)."""
    cache = {}
    for flipped in ((False, True) if config.random_flip else (False,)):
        for index, example in enumerate(examples):
            cache[index, flipped] = _encode(vae, _pixels(example, flipped)[None], device, dtype)[0].cpu()
    log.info("cached %d latents", len(cache))
    return cache


def _loss(unet, text_encoder, vae, tokenizer, noise_scheduler, examples, order: BatchOrder, micro: int, latents,
          config: LoraTrainConfig, device, dtype):
    """The denoising loss of one micro-batch; every random draw from a generator seeded by (seed, micro)."""
    import torch
    import torch.nn.functional as F
    from diffusers.training_utils import compute_snr

    indices = order.batch(micro)
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + micro)
    n = len(indices)
    flips = (torch.rand(n, generator=generator) < 0.5).tolist() if config.random_flip else [False] * n
    drops = (torch.rand(n, generator=generator) < config.caption_dropout).tolist()
    captions = ["" if drop else examples[i].caption for i, drop in zip(indices, drops)]
    if latents is not None:
        x0 = torch.stack([latents[i, flip] for i, flip in zip(indices, flips)]).to(device)
    else:
        x0 = _encode(vae, torch.stack([_pixels(examples[i], flip) for i, flip in zip(indices, flips)]), device, dtype)
    noise = torch.randn(x0.shape, generator=generator)
    if config.noise_offset:
        noise += config.noise_offset * torch.randn((n, x0.shape[1], 1, 1), generator=generator)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), generator=generator)
    noise, timesteps = noise.to(device), timesteps.to(device)
    noisy = noise_scheduler.add_noise(x0, noise, timesteps)
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        hidden = text_encoder(ids, return_dict=False)[0]
    prediction_type = noise_scheduler.config.prediction_type
    target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(x0, noise, timesteps)
    predicted = unet(noisy.to(dtype), timesteps, hidden, return_dict=False)[0]
    if config.snr_gamma is None:
        return F.mse_loss(predicted.float(), target.float(), reduction="mean")
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.stack([snr, config.snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    loss = F.mse_loss(predicted.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (loss * weights).mean()


def _save_checkpoint(accelerator, out: Path, step: int, keep: int | None) -> Path:
    """DIR/checkpoint-<step>: adapter, optimizer, LR schedule, RNG; renamed into place when whole."""
    final = out / f"checkpoint-{step}"
    temp = out / f".checkpoint-{step}.partial"
    if accelerator.is_main_process and temp.exists():
        shutil.rmtree(temp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temp))
    accelerator.wait_for_everyone()  # every process's RNG file is in before the folder is renamed
    if accelerator.is_main_process:
        (temp / STATE_FILE).write_text(json.dumps({"step": step}) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(temp, final)
        if keep is not None:
            for old in checkpoints(out)[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _validation_spec(config: LoraTrainConfig, examples: list[Example], device) -> ValidationSpec | None:
    if not config.validation_prompts:
        return None
    width, height = Counter((e.width, e.height) for e in examples).most_common(1)[0][0]
    return ValidationSpec(tuple(config.validation_prompts), config.validation_images, width, height, config.seed,
                          config.model, str(device))


def _validate_now(spec: ValidationSpec, out: Path, step: int, unet, stop) -> None:
    adapter_dir = out / "validation" / f"step-{step:06d}" / "lora"
    adapter = save_diffusers(unet, adapter_dir)
    validate(spec, out, step, adapter, stop)
    write_page(out, spec)


def _write_run_file(out: Path, config: LoraTrainConfig, examples, processes: int, device: str, step: int,
                    finished: bool = False):
    from ..writer import write_text_atomic

    data = {"settings": config.settings(), "images": len(examples), "processes": processes, "device": device,
            "step": step, "finished": finished, "dataset_fingerprint": asdict(fingerprint(config.dataset, examples))}
    write_text_atomic(out / "train.json", json.dumps(data, indent=2) + "\n")


def _trim_loss_log(path: Path, step: int) -> None:
    """A resumed run continues loss.csv from its checkpoint's step (rows a killed run wrote after it go)."""
    if not path.is_file():
        path.write_text("step,loss,lr\n", encoding="utf-8")
        return
    rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
    kept = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
    path.write_text("".join(",".join(r) + "\n" for r in kept), encoding="utf-8")


def _log_loss(path: Path, step: int, loss: float, lr: float) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{step},{loss:.6g},{lr:.6g}\n")
