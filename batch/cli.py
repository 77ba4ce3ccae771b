"""Command line: turn options into a RunConfig and call the runner; user errors exit 2 with one message."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

from .config import DEFAULT_MODEL, Defaults, RunConfig
from .errors import BatchError
from .models import QUANTIZE
from .schedulers import SCHEDULERS

COMMANDS = ("run", "validate", "status", "report", "compare", "bench", "prepare-dataset", "train-lora", "export",
            "score", "expand")

EXAMPLES = """\
examples:
  sdbatch manifests/demo.jsonl --model tiny                 # run (same as `sdbatch run ...`)
  sdbatch run prompts.csv --out outputs/night1 --steps 30 --batch-size 8
  sdbatch validate prompts.csv                              # check every row, print the plan
  sdbatch expand templates.jsonl -o rows.jsonl --wildcards wildcards/   # the rows expand/sweep stand for
  sdbatch status outputs/night1 --json                      # {"total", "done", "failed", "pending"}
  sdbatch report outputs/night1                             # rebuild report.json/.csv/.md
  sdbatch score outputs/night1 --clip tiny-clip             # add clip_score to metadata.jsonl
  python run_batch.py manifests/demo.jsonl --model tiny --fresh
  sdbatch prepare-dataset photos/ data/train --size 512          # images (+ .txt) -> training folder
  sdbatch train-lora data/train --out loras/mine --max-steps 500   # -> loras/mine/final/*.safetensors

exit codes: 0 all done; 1 some jobs failed (the rest done); 2 bad input or usage,
nothing generated; 130 interrupted (checkpoint safe: run the same command again to resume)
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _plan_options() -> argparse.ArgumentParser:
    """Options shared by `run` and `validate` (they change the plan or the estimate)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"hub id, diffusers folder, single-file .safetensors/.ckpt, 'tiny' (embedded) or 'sd15-random' [{DEFAULT_MODEL}]")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [auto]")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"], help="[auto: fp16 on CUDA, fp32 on CPU]")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="images per UNet call [auto: 4 on CPU, by resolution on CUDA]")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="denoising steps [the model family's: SD 25, SDXL 30, SD3 28, Flux-dev 28, schnell 4]")
    p.add_argument("--cfg", type=float, default=None,
                   help="guidance scale (Flux-dev: its embedded guidance) [the family's: SD 7.5, SDXL 5, SD3 7, "
                        "Flux-dev 3.5, schnell 0]")
    p.add_argument("--width", type=int, default=None, help="[the model's own size: 512; tiny 128]")
    p.add_argument("--height", type=int, default=None, help="[the model's own size: 512; tiny 128]")
    p.add_argument("--scheduler", default=None, choices=list(SCHEDULERS),
                   help="[the family's: SD dpmpp_2m_karras, SDXL euler, SD3/Flux flow_euler; default: the model's own]")
    p.add_argument("--seed", type=int, default=0, help="run seed; rows without a seed derive theirs from (seed, id) [0]")
    p.add_argument("--skip-invalid", action="store_true", help="run the valid rows, record invalid ones as failed")
    p.add_argument("--limit", type=_positive_int, default=None, help="only the first N jobs (rows)")
    _expansion_options(p)
    p.add_argument("--ip-adapter", default=None,
                   help="IP-Adapter weights: file, folder, or org/repo/subfolder/file "
                        "[tiny: models/tiny-ip-adapter; else h94/IP-Adapter/models/ip-adapter_sd15.safetensors]")
    memory = p.add_argument_group("memory (small GPUs; see README)")
    memory.add_argument("--offload", default="none", choices=["none", "model", "sequential"],
                        help="model: components take turns on the GPU; sequential: layer by layer, slowest [none]")
    memory.add_argument("--attention-slicing", action="store_true", help="compute attention in slices")
    memory.add_argument("--vae-slicing", action="store_true", help="decode a batch one image at a time")
    memory.add_argument("--vae-tiling", action="store_true", help="decode large images in tiles")
    memory.add_argument("--quantize", default="none", choices=list(QUANTIZE),
                        help="load the denoiser and T5 in 4-bit NF4 or 8-bit (bitsandbytes, CUDA): Flux-dev on a "
                             "24 GB card [none]")
    return p


def _expansion_options(p: argparse.ArgumentParser) -> None:
    """`expand` and `sweep` rows (batch/expand.py): shared by run, validate and expand."""
    from .expand import DEFAULT_MAX_ROWS

    p.add_argument("--wildcards", type=Path, default=None, metavar="DIR",
                   help="folder of __name__ wildcard files for expand templates: name.txt, one entry a line; "
                        "sub-folders as __sub/name__")
    p.add_argument("--max-rows", type=_positive_int, default=DEFAULT_MAX_ROWS, metavar="N",
                   help="refuse an expand/sweep row that would become more than N rows [%(default)s]")


def _single_job_options(p: argparse.ArgumentParser) -> None:
    job = p.add_argument_group("single job (no manifest): sdbatch --prompt \"a red fox\" --num 2")
    job.add_argument("--prompt", help="run one row with this prompt instead of a manifest")
    job.add_argument("--negative-prompt", default=None)
    job.add_argument("--num", type=_positive_int, default=1, help="images of that row [1]")
    job.add_argument("--init-image", type=Path, help="img2img: the source image")
    job.add_argument("--strength", type=float, default=None, help=f"img2img strength [{Defaults.strength}]")
    job.add_argument("--prompt-image", type=Path, help="image_prompt: the image used as the prompt")
    job.add_argument("--image-prompt-method", choices=["ip_adapter", "clip_embed"], default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdbatch", description="Batch runner for Stable Diffusion: a manifest of txt2img, img2img and "
        "image-prompt jobs in; checkpointed images, metadata and a timing/VRAM report out.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"sdbatch {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    shared = _plan_options()

    run = commands.add_parser("run", parents=[shared], help="validate, then generate with checkpointing",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("manifest", type=Path, nargs="?", help="CSV or JSONL manifest (.csv, .jsonl, .jsonl.gz)")
    run.add_argument("--out", type=Path, default=None, help="output folder [outputs/<manifest stem>]")
    run.add_argument("--format", default="png", choices=["png", "webp", "jpg"], help="[png]")
    run.add_argument("--retry-failed", action="store_true", help="retry images that failed in an earlier run")
    run.add_argument("--max-attempts", type=_positive_int, default=3,
                     help="--retry-failed leaves images that failed this many times [3]")
    run.add_argument("--fresh", action="store_true", help="ignore the checkpoint: make every image again")
    run.add_argument("--compile", action="store_true", help="torch.compile the UNet (warm-up reported apart)")
    run.add_argument("--quiet", action="store_true", help="no progress bar: a plain line every 10 s")
    run.add_argument("--safety-checker", action="store_true", help="run the model's safety checker, where it has one")
    run.add_argument("--clip-score", default=None, metavar="CLIP",
                     help="score each image against its prompt as it is written (as `sdbatch score --clip`): "
                          "tiny-clip, a CLIP folder or a hub id")
    _single_job_options(run)

    validate = commands.add_parser("validate", parents=[shared], help="check every row and print the plan; loads no model")
    validate.add_argument("manifest", type=Path, help="CSV or JSONL manifest (.csv, .jsonl, .jsonl.gz)")
    validate.add_argument("--json", action="store_true", help="print the plan as JSON")
    validate.add_argument("--estimate-vram", action="store_true", help="add a per-group VRAM estimate (GB)")

    status = commands.add_parser("status", help="progress of an output folder, from its checkpoint")
    status.add_argument("out", type=Path)
    status.add_argument("--json", action="store_true", help='print {"total","done","failed","pending"} (images)')

    report = commands.add_parser("report", help="rebuild report.json/.csv/.md (and metadata.jsonl, failed.jsonl) from the checkpoint")
    report.add_argument("out", type=Path)

    compare = commands.add_parser(
        "compare", help="compare two report.json files (nightly runs); exit 1 on a regression",
        description="Per group (model, mode, width, height): images/s, s/image p50/p95, peak VRAM and failures. "
        "Exit 0 when no matched group's images/s drops, or its peak VRAM grows, by more than --max-regression "
        "percent; 1 when one does; 2 on bad input. Groups on one side only are listed, not counted.")
    compare.add_argument("old", type=Path, help="the reference: a report.json or an output folder holding one")
    compare.add_argument("new", type=Path, help="the run to judge: a report.json or an output folder holding one")
    compare.add_argument("--max-regression", type=_percent, default=10.0, metavar="PCT",
                         help="allowed throughput drop / peak VRAM growth, in percent [10]")
    compare.add_argument("--format", default="md", choices=["md", "json"], help="markdown (for a CI comment) or JSON [md]")

    bench = commands.add_parser(
        "bench", help="sdbatch side by side with a naive diffusers loop on a synthetic manifest",
        description="Runs, one after another in this process on the same device: `naive` (from_pretrained "
        "pipelines, a second one for img2img rows, one call per row), `sdbatch` (the runner, default settings) "
        "and with --compile `sdbatch-compile`. Writes DIR/bench.json and DIR/bench.md.",
        epilog="example: sdbatch bench --model sd15-random --device cuda --images 256 --width 512 --height 512 "
        "--steps 20 --mix txt2img --compile --out reports/bench-h100")
    bench.add_argument("--model", default="sd15-random", help="[sd15-random]")
    bench.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [auto]")
    bench.add_argument("--images", type=_positive_int, default=64, help="[64]")
    bench.add_argument("--width", type=int, default=None, help="[the model's own size: SD 512, SDXL/Flux 1024]")
    bench.add_argument("--height", type=int, default=None, help="[the model's own size]")
    bench.add_argument("--steps", type=_positive_int, default=None, help="[the family's default]")
    bench.add_argument("--cfg", type=float, default=None, help="[the family's default]")
    bench.add_argument("--mix", default="txt2img", choices=["txt2img", "mixed"],
                       help="txt2img, or the modes the family has (SD: a third each of txt2img, img2img and "
                            "image_prompt; SDXL, SD3, Flux: half txt2img, half img2img), shuffled [txt2img]")
    bench.add_argument("--batch-size", type=_positive_int, default=None, help="sdbatch's batch size [auto]")
    bench.add_argument("--compile", action="store_true", help="add the sdbatch-compile variant")
    bench.add_argument("--out", type=Path, required=True, help="folder for bench.json, bench.md and the images")
    _training_parsers(commands)
    _export_parser(commands)
    _score_parser(commands)
    _expand_parser(commands)
    for command in commands.choices.values():
        command.add_argument("--threads", type=_positive_int, default=None,
                             help="CPU threads for torch [the CPUs this process may use, less those other programs "
                                  "keep busy, shared among a launch's processes on this host; or OMP_NUM_THREADS]")
    return parser


COMPUTING = ("bench", "prepare-dataset", "train-lora", "score")  # `run` sets its own, knowing its output folder


def _set_threads(args, out: Path | None = None) -> None:
    """Choose and set torch's thread count before anything computes (see batch/threads.py)."""
    if out is None and (args.command == "run" or (args.command not in COMPUTING and args.threads is None)):
        return
    from . import threads

    threads.configure(args.threads, threads.processes_on_host(), out)


PREPARE_EXAMPLES = """\
examples:
  sdbatch prepare-dataset photos/ data/train --size 512                 # square, centre-cropped
  sdbatch prepare-dataset outputs/night1 data/night1 --size 512         # an sdbatch output: prompts become captions
  sdbatch prepare-dataset photos/ data/train --size 512 --buckets --crop random --min-size 384

SRC: images with optional same-name .txt captions, an imagefolder with metadata.jsonl
(text/caption/prompt column), or an sdbatch output folder. DST gets 0000.png + 0000.txt,
metadata.jsonl (load it with datasets' "imagefolder"), prepare.json and summary.json.
Rerunning adds only new images. Exit codes: 0 all kept; 1 some files skipped (listed in
summary.json); 2 bad input, nothing written.
"""

TRAIN_EXAMPLES = """\
examples:
  sdbatch train-lora data/train --model stable-diffusion-v1-5/stable-diffusion-v1-5 --out loras/mine \\
      --max-steps 1000 --rank 4 --lr 1e-4 --validation-prompt "a photo of sks dog" --validation-every 250
  sdbatch train-lora data/purple --model tiny --out loras/purple --resolution 128 --max-steps 300 \\
      --batch-size 8 --lr 1e-3 --rank 8                                # the embedded model, on a CPU
  sdbatch train-lora data/train --out loras/mine --resume latest        # after an interruption
  accelerate launch -m batch.cli train-lora data/train --out loras/mine # several GPUs

DIR gets checkpoint-<step>/ (adapter, optimizer, LR schedule, RNG), final/pytorch_lora_weights.safetensors
(diffusers: load_lora_weights, sdbatch's lora column) and final/<name>.safetensors (kohya: AUTOMATIC1111,
ComfyUI), loss.csv, train.json, validation/ and validation.html. Advice on rank, steps and lr: README.
Exit codes: 0 done; 1 stopped on a non-finite loss (last good checkpoint kept); 2 bad input, nothing
loaded; 130 interrupted (a checkpoint is saved: rerun with --resume latest).
"""


def _training_parsers(commands) -> None:
    from .train.lora import LR_SCHEDULERS, TARGET_MODULES

    prepare = commands.add_parser(
        "prepare-dataset", help="images (+ captions) -> a training folder (NNNN.png + .txt, metadata.jsonl)",
        epilog=PREPARE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    prepare.add_argument("src", type=Path, help="folder of images, imagefolder, or sdbatch output folder")
    prepare.add_argument("dst", type=Path, help="training folder to write (or to add new images to)")
    prepare.add_argument("--size", type=int, default=512, help="output side in pixels, a multiple of 8 [512]")
    prepare.add_argument("--crop", default="center", choices=["center", "random", "none"],
                         help="center/random: square crops; none: whole image, longer side = size [center]")
    prepare.add_argument("--buckets", action="store_true", help="aspect-ratio buckets of about size x size pixels")
    prepare.add_argument("--min-size", type=int, default=0, help="skip images whose shorter side is smaller [0]")
    prepare.add_argument("--seed", type=int, default=0, help="random crops [0]")
    prepare.add_argument("--caption", default="", help="caption for images that have none [\"\"]")
    prepare.add_argument("--quiet", action="store_true", help="no progress bar")

    train = commands.add_parser(
        "train-lora", help="train a LoRA on a training folder (accelerate + peft)",
        epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("dataset", type=Path, help="a training folder (from prepare-dataset, or NNNN.png + .txt)")
    train.add_argument("--out", type=Path, required=True, help="folder for checkpoints, the adapter and logs")
    train.add_argument("--model", default=DEFAULT_MODEL, help=f"base model: hub id, folder, file or 'tiny' [{DEFAULT_MODEL}]")
    train.add_argument("--rank", type=int, default=4, help="LoRA rank: 2 fast, 4 balanced, 8-16 detailed [4]")
    train.add_argument("--alpha", type=float, default=None, help="LoRA alpha (scale = alpha / rank) [= rank]")
    train.add_argument("--lr", type=float, default=1e-4, help="learning rate [1e-4]")
    train.add_argument("--lr-scheduler", default="constant", choices=list(LR_SCHEDULERS), help="[constant]")
    train.add_argument("--lr-warmup-steps", type=int, default=0, help="[0]")
    train.add_argument("--max-steps", type=int, default=500, help="optimizer steps [500]")
    train.add_argument("--batch-size", type=int, default=1, help="images per step per device [1]")
    train.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps [1]")
    train.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"],
                       help="frozen weights in fp16/bf16; LoRA weights stay fp32 [no]")
    train.add_argument("--gradient-checkpointing", action="store_true", help="less memory, about 20%% slower")
    train.add_argument("--seed", type=int, default=0, help="[0]")
    train.add_argument("--resolution", type=int, default=None, help="square-crop every image to this [each image's size]")
    train.add_argument("--random-flip", action="store_true", help="mirror half the images at random")
    train.add_argument("--caption-dropout", type=float, default=0.0, help="share of empty captions [0]")
    train.add_argument("--snr-gamma", type=float, default=None, help="min-SNR loss weighting (5 is usual) [off]")
    train.add_argument("--noise-offset", type=float, default=0.0, help="[0]")
    train.add_argument("--cache-latents", action="store_true", help="encode every image once (same result, faster)")
    train.add_argument("--checkpoint-every", type=int, default=100, help="save a resumable checkpoint every N steps [100]")
    train.add_argument("--keep-checkpoints", type=int, default=None, help="keep only the newest K checkpoints [all]")
    train.add_argument("--resume", default=None, metavar="latest|DIR", help="continue from DIR's newest checkpoint, or from DIR")
    train.add_argument("--validation-prompt", action="append", default=[], help="repeatable; images at each validation")
    train.add_argument("--validation-every", type=int, default=None, help="steps between validations [--checkpoint-every]")
    train.add_argument("--validation-images", type=int, default=2, help="images per validation prompt [2]")
    train.add_argument("--target-modules", default=",".join(TARGET_MODULES),
                       help="UNet layers the LoRA adapts, comma-separated; add conv1,conv2 (the ResNet convs) for "
                            "shapes and textures attention alone cannot reach [%(default)s]")
    train.add_argument("--name", default=None, help="stem of the kohya file [DIR's name]")
    train.add_argument("--device", default="auto", help="auto or cpu (under accelerate launch: the launcher's) [auto]")
    train.add_argument("--quiet", action="store_true", help="no progress bar: a log line every 10 s")



def _defaults(args) -> Defaults:
    return Defaults(steps=args.steps, cfg=args.cfg, width=args.width, height=args.height, scheduler=args.scheduler,
                    model=args.model)


def _default_out(manifest: Path) -> Path:
    name = manifest.name
    for suffix in (".gz", ".jsonl", ".ndjson", ".csv"):
        name = name.removesuffix(suffix)
    return Path("outputs") / (name or "run")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now, so lines land above rich's live progress bar."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(quiet: bool) -> None:
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    if quiet:  # only warnings, plus the periodic progress lines
        handler.addFilter(lambda r: r.levelno >= logging.WARNING or r.name == "batch.progress")
    handler.setLevel(logging.INFO)
    root = logging.getLogger("batch")
    root.handlers = [handler]
    root.setLevel(logging.DEBUG)  # run.log keeps the per-batch lines; the terminal shows INFO
    root.propagate = False


def _single_job_manifest(args) -> Path:
    """`--prompt ...` without a manifest: write the one-row manifest into the output folder."""
    import hashlib

    # Every parameter on the row itself, so failed.jsonl (and a rerun of this manifest) is the same job.
    row: dict = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "num_images": args.num,
                 "seed": args.seed, "image_prompt_method": args.image_prompt_method, "steps": args.steps,
                 "cfg": args.cfg, "width": args.width, "height": args.height, "scheduler": args.scheduler}
    if args.init_image:
        row.update(init_image=str(args.init_image.resolve()), strength=args.strength)
    elif args.strength is not None:
        raise BatchError("--strength is for img2img: give --init-image too")
    if args.prompt_image:
        row["prompt_image"] = str(args.prompt_image.resolve())
    row = {k: v for k, v in row.items() if v is not None}
    text = args.prompt or (args.prompt_image.name if args.prompt_image else "")
    slug = "-".join(re.findall(r"[a-z0-9]+", text.lower()))[:40].strip("-") or "image"
    row["id"] = f"{slug}-{hashlib.sha1(json.dumps(row, sort_keys=True).encode()).hexdigest()[:6]}"
    out = args.out or Path("outputs") / "single"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "single-job.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    args.out = out
    return path


def cmd_run(args) -> int:
    from .context import RunContext
    from .interrupt import GracefulStop
    from .runner import run

    single = args.prompt is not None or args.prompt_image is not None or args.init_image is not None
    if single and args.manifest:
        raise BatchError("give a manifest or --prompt/--prompt-image, not both")
    if not single and not args.manifest:
        raise BatchError("nothing to run: give a manifest (sdbatch run prompts.csv) or --prompt \"...\"")
    manifest = _single_job_manifest(args) if single else args.manifest
    config = RunConfig(
        manifest=manifest, out=args.out or _default_out(manifest), model=args.model, device=args.device,
        dtype=args.dtype, batch_size=args.batch_size, seed=args.seed, format=args.format,
        skip_invalid=args.skip_invalid, retry_failed=args.retry_failed, max_attempts=args.max_attempts,
        fresh=args.fresh, limit=args.limit, quiet=args.quiet, compile=args.compile, defaults=_defaults(args),
        offload=args.offload, attention_slicing=args.attention_slicing, vae_slicing=args.vae_slicing,
        vae_tiling=args.vae_tiling, safety_checker=args.safety_checker, ip_adapter=args.ip_adapter,
        quantize=args.quantize, threads=args.threads, adds_to_folder=single, clip_score=args.clip_score,
        wildcards=args.wildcards, max_rows=args.max_rows)
    _set_threads(args, config.out)
    with GracefulStop() as stop:  # this process's place in a torchrun / accelerate launch, if any
        result = run(config, RunContext.launched(config.device, stop))
    c = result.counts
    print(f"{c.done}/{c.total} images done ({result.generated} made now, {result.skipped} from checkpoint), "
          f"{c.failed} failed, {c.pending} pending -> {result.out}")
    if result.interrupted:
        print("interrupted: run the same command again to resume", file=sys.stderr)
    elif c.failed:
        print(f"failed jobs are listed in {result.out / 'failed.jsonl'} (rerun with --retry-failed)", file=sys.stderr)
    return result.exit_code


def _gb(value: int) -> str:
    return f"{value / 2**30:.2f}"


def cmd_validate(args) -> int:
    from .adapters import check_adapters
    from .manifest import load_manifest
    from .models import LoadOptions, check_options, resolve_device, resolve_dtype, resolve_model
    from .plan import make_plan

    manifest = load_manifest(args.manifest, _defaults(args), args.seed, args.skip_invalid,
                             wildcards=args.wildcards, max_rows=args.max_rows)
    jobs = manifest.jobs[: args.limit] if args.limit else manifest.jobs
    for model in dict.fromkeys(job.model for job in jobs):
        resolve_model(model)  # as `run` does: a model that cannot be found or fetched is invalid
    device = resolve_device(args.device)  # the plan's batch sizes depend on it, as in `run`
    options = LoadOptions(device=device, dtype=resolve_dtype(args.dtype, device), offload=args.offload,
                          attention_slicing=args.attention_slicing, vae_slicing=args.vae_slicing,
                          vae_tiling=args.vae_tiling, ip_adapter=args.ip_adapter, dtype_auto=args.dtype == "auto",
                          quantize=args.quantize)
    if device.startswith("cuda"):
        check_options(options)
    check_adapters(jobs, options)  # what `run` checks before its first image: LoRAs, IP-Adapter, encoders
    tasks = [t for job in jobs for t in job.images("")]
    plan = make_plan(tasks, args.model, args.batch_size, device)
    estimates = {}
    if args.estimate_vram:
        from .estimate import group_estimate

        estimates = {i: group_estimate(g, options) for i, g in enumerate(plan.groups)}
    groups = []
    for i, g in enumerate(plan.groups):
        entry = {"model": g.model, "mode": g.mode, "width": g.width, "height": g.height, "lora": g.lora,
                 "batches": len(g.batches), "images": g.images}
        if i in estimates:
            e = estimates[i]
            entry.update(vram_estimate_bytes=e.total_bytes, weights_bytes=e.weights_bytes,
                         unet_activations_bytes=e.unet_bytes, vae_activations_bytes=e.vae_bytes)
        groups.append(entry)
    if args.json:
        print(json.dumps({"valid": True, "jobs": len(jobs), "images": plan.images, "batches": plan.batches,
                          "invalid_rows": len(manifest.invalid), "groups": groups,
                          "expanded": [{"line": line, "id": row_id, "rows": rows}
                                       for line, row_id, rows in manifest.expanded]}))
        return 0
    from rich.table import Table

    table = Table(title=f"{manifest.path}: {len(jobs)} jobs, {plan.images} images, {plan.batches} batches")
    columns = ["group", "model", "mode", "size", "lora", "batches", "images"]
    if estimates:
        columns += ["weights GB", "UNet act. GB", "VAE act. GB", "VRAM est. GB"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "mode", "size", "lora") else "right")
    for i, g in enumerate(groups, start=1):
        row = [str(i), g["model"], g["mode"], f"{g['width']}x{g['height']}", g["lora"] or "-", str(g["batches"]), str(g["images"])]
        if estimates:
            row += [_gb(g["weights_bytes"]), _gb(g["unet_activations_bytes"]), _gb(g["vae_activations_bytes"]),
                    _gb(g["vram_estimate_bytes"])]
        table.add_row(*row)
    console = _console()
    console.print(table)
    for line, row_id, rows in manifest.expanded:  # rich markup off: ids and paths are the user's text
        console.print(f"line {line} ({row_id}): expands to {rows} rows", markup=False, highlight=False)
    if manifest.invalid:
        console.print(f"{len(manifest.invalid)} invalid row(s) will be recorded as failed (--skip-invalid)")
    console.print("valid")
    return 0


def _console():
    """rich's console for stdout: on a terminal its width; piped to a file or a program, never
    truncated (rich would assume 80 columns and cut `sd15-random` to `sd1…`)."""
    from rich.console import Console

    if sys.stdout.isatty():
        return Console()
    return Console(width=100_000, soft_wrap=True)


def cmd_status(args) -> int:
    from .checkpoint import Checkpoint

    checkpoint = Checkpoint.merged(args.out)  # every rank's journal too, during or after a multi-process run
    counts = checkpoint.counts()
    checkpoint.close()
    if args.json:
        print(json.dumps(counts.as_dict()))
    else:
        share = 100 * counts.done / counts.total if counts.total else 100.0
        print(f"{args.out}: {counts.done}/{counts.total} images done ({share:.1f}%), "
              f"{counts.failed} failed, {counts.pending} pending")
    return 0


def cmd_report(args) -> int:
    from .checkpoint import FILE_NAME, Checkpoint
    from .runner import finish_outputs

    path = args.out / FILE_NAME
    if not path.exists():
        raise BatchError(f"no checkpoint at {path}: is this an sdbatch output folder?")
    checkpoint = Checkpoint.merged(args.out)
    finish_outputs(args.out, checkpoint)
    checkpoint.close()
    print(f"wrote {args.out / 'report.json'}, report.csv, report.md, report.html")
    return 0


def _percent(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a percentage >= 0, got {text}")
    return value


def cmd_bench(args) -> int:
    from .bench import Settings, bench

    if any(side is not None and (side % 8 or side < 8) for side in (args.width, args.height)):
        raise BatchError(f"--width and --height must be positive multiples of 8, got {args.width}x{args.height}")
    settings = Settings(model=args.model, device=args.device, images=args.images, width=args.width, height=args.height,
                        steps=args.steps, cfg=args.cfg, mix=args.mix, batch_size=args.batch_size, compile=args.compile)
    bench(settings, args.out)
    print((args.out / "bench.md").read_text())
    return 0


def cmd_prepare_dataset(args) -> int:
    from .train.prepare import PrepareOptions, prepare_dataset

    options = PrepareOptions(size=args.size, crop=args.crop, buckets=args.buckets, min_size=args.min_size,
                             seed=args.seed, caption=args.caption)
    summary = prepare_dataset(args.src, args.dst, options, quiet=args.quiet)
    skipped = ", ".join(f"{len(files)} {reason.replace('_', ' ')}" for reason, files in sorted(summary.skipped.items()))
    print(f"{summary.kept} images in {args.dst} ({summary.added} added now, {summary.already} from before); "
          f"skipped: {skipped or 'none'}; captions missing: {summary.captions_missing}")
    for reason, files in sorted(summary.skipped.items()):
        for name in files[:20]:
            print(f"  skipped ({reason.replace('_', ' ')}): {name}", file=sys.stderr)
    return 1 if summary.skipped_count else 0


def cmd_train_lora(args) -> int:
    from .context import RunContext
    from .interrupt import GracefulStop
    from .train.lora import LoraTrainConfig, train_lora

    config = LoraTrainConfig(
        dataset=args.dataset, out=args.out, model=args.model, rank=args.rank, alpha=args.alpha, lr=args.lr,
        lr_scheduler=args.lr_scheduler, lr_warmup_steps=args.lr_warmup_steps, max_steps=args.max_steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, seed=args.seed, resolution=args.resolution,
        random_flip=args.random_flip, caption_dropout=args.caption_dropout, snr_gamma=args.snr_gamma,
        noise_offset=args.noise_offset, cache_latents=args.cache_latents, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, resume=args.resume, validation_prompts=tuple(args.validation_prompt),
        validation_every=args.validation_every, validation_images=args.validation_images, name=args.name,
        device=args.device, quiet=args.quiet,
        target_modules=tuple(m.strip() for m in args.target_modules.split(",") if m.strip()))
    with GracefulStop() as stop:  # this process's place in a torchrun / accelerate launch, if any
        result = train_lora(config, RunContext.launched(config.device, stop))
    if result.interrupted:
        print(f"interrupted at step {result.step}: run the same command with --resume latest", file=sys.stderr)
    elif result.final is not None:  # the main process writes the adapter; the others only say they are done
        print(f"trained {result.step} steps -> {result.final} (diffusers) and {result.kohya} (kohya/A1111)")
    else:
        print(f"trained {result.step} steps (this process's share; the main process writes the adapter)")
    return result.exit_code


EXPORT_EXAMPLES = """\
examples:
  sdbatch export outputs/night1 --to datasets/night1 --format webdataset --shard-size 1000
  sdbatch export outputs/night1 --to datasets/night1-pq --format parquet --min-clip-score 28 --dedup 6
  sdbatch export outputs/night1 --to datasets/night1-pq --format parquet --min-clip-score 28 --dedup 6 \\
      --push-to-hub me/night1                                   # then upload DIR as a dataset repository

webdataset: DIR/shard-000000.tar ... (<key>.png, <key>.json, <key>.txt); parquet: DIR/train/shard-000000.parquet
... (datasets' Image feature); imagefolder: DIR/images/shard-000000/... + DIR/metadata.jsonl. DIR/export.json
lists the shards, the source, the options and what was dropped. Run it again after the run grew: only the new
images are added, as new shards. Exit codes: 0 done; 2 bad input (nothing exported); 130 interrupted (the
shards written so far are complete: run it again).
"""


def _export_parser(commands) -> None:
    export = commands.add_parser(
        "export", help="an output folder -> training shards (webdataset, parquet, imagefolder)",
        epilog=EXPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("out", type=Path, help="an sdbatch output folder")
    export.add_argument("--to", type=Path, required=True, help="folder for the shards and export.json")
    export.add_argument("--format", required=True, choices=["webdataset", "parquet", "imagefolder"])
    export.add_argument("--shard-size", type=_positive_int, default=1000,
                        help="images per shard [%(default)s]")
    export.add_argument("--min-clip-score", type=float, default=None, metavar="X",
                        help="leave out images whose clip_score (from `sdbatch score`) is below X")
    export.add_argument("--dedup", type=int, default=None, metavar="HAMMING",
                        help="leave out images whose perceptual hash is within HAMMING bits of an earlier one (4-8 is usual)")
    export.add_argument("--fresh", action="store_true", help="replace an export made with other settings in DIR")
    export.add_argument("--push-to-hub", default=None, metavar="REPO",
                        help="then upload DIR as the Hugging Face dataset repository REPO (needs a network and a token)")
    export.add_argument("--quiet", action="store_true", help="no progress bar: a log line every 10 s")


def cmd_export(args) -> int:
    from .export import ExportOptions, check_hub_reachable, export, push_to_hub

    options = ExportOptions(format=args.format, shard_size=args.shard_size, min_clip_score=args.min_clip_score,
                            dedup=args.dedup, fresh=args.fresh, quiet=args.quiet,
                            workers=args.threads or min(4, os.cpu_count() or 1))
    if args.push_to_hub:
        check_hub_reachable()  # before the export, not after an hour of it
    result = export(args.out, args.to, options)
    dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(result.dropped.items()) if n) or "none"
    print(f"{result.added} images exported now in {len(result.new_shards)} new shard(s); {result.kept} images in "
          f"{result.shards} shard(s) in {result.to}; left out: {dropped}")
    if args.push_to_hub:
        print(f"pushed {result.to} to {push_to_hub(result.to, args.push_to_hub)}")
    return 0


def cmd_compare(args) -> int:
    from .compare import compare, load_report, to_json, to_markdown

    result = compare(load_report(args.old), load_report(args.new), args.max_regression)
    if args.format == "json":
        print(json.dumps(to_json(result), indent=2, ensure_ascii=False))
    else:
        print(to_markdown(result, str(args.old), str(args.new)))
    return 0 if result.ok else 1



SCORE_EXAMPLES = """\
examples:
  sdbatch score outputs/night1 --clip openai/clip-vit-large-patch14 --device cuda --batch-size 64
  sdbatch score outputs/demo --clip tiny-clip         # the CLIP shipped for the embedded model
  sdbatch manifests/demo.jsonl --model tiny --clip-score tiny-clip   # scored while the run writes

clip_score = 100 * max(cos(image, prompt), 0), as torchmetrics' clip_score, added to each image's line in
OUT/images/metadata.jsonl (with clip_model); the report gains a histogram per group. Scores are kept in
checkpoint.sqlite: an interrupted score resumes, a second one computes nothing new. Images without a text
prompt (clip_embed rows) are skipped and counted. Exit codes: 0 done; 1 some image files could not be read
(named on stderr); 2 bad input (no checkpoint, a CLIP model that cannot be found); 130 interrupted.
"""


def _score_parser(commands) -> None:
    score = commands.add_parser(
        "score", help="add clip_score (CLIP image-prompt similarity) to every image of an output folder",
        epilog=SCORE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    score.add_argument("out", type=Path, help="an sdbatch output folder")
    score.add_argument("--clip", required=True, metavar="MODEL",
                       help="tiny-clip (shipped, for the embedded model), a CLIP folder or a hub id such as "
                            "openai/clip-vit-large-patch14")
    score.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [auto]")
    score.add_argument("--batch-size", type=_positive_int, default=32, help="images per CLIP call [%(default)s]")
    score.add_argument("--quiet", action="store_true", help="no progress bar: a log line every 10 s")


def cmd_score(args) -> int:
    from .interrupt import GracefulStop
    from .score import score_folder

    with GracefulStop() as stop:
        result = score_folder(args.out, args.clip, args.device, args.batch_size, args.quiet, stop)
    print(f"{result.scored} image(s) scored now with {result.model}, {result.earlier} earlier; {result.skipped} "
          f"skipped (no text prompt) -> {args.out / 'images' / 'metadata.jsonl'}")
    for name in result.unreadable[:20]:
        print(f"  not scored (cannot read the file): {name}", file=sys.stderr)
    if result.interrupted:
        print("interrupted: run the same command again to score the rest", file=sys.stderr)
    return result.exit_code


EXPAND_EXAMPLES = """\
examples:
  sdbatch expand templates.jsonl -o rows.jsonl                       # then: sdbatch rows.jsonl --model tiny
  sdbatch expand templates.csv -o rows.jsonl --wildcards wildcards/ --seed 7

A row with "expand": "all" becomes every combination of its prompt / negative_prompt templates
(dynamicprompts: {red|green}, {2$$a|b|c}, {1-2$$a|b|c}, __name__ wildcards); "expand": N becomes N
draws seeded by the row's seed; "sweep": {"cfg": [4, 7.5], "steps": [10, 20]} becomes one row per
cell. OUT.jsonl holds the rows `run` would make, as a manifest (ids <id>-<k>, explicit seeds, the
template in `template`). Exit codes: 0 written; 2 bad input (a template that cannot be expanded, a
missing wildcard file, more than --max-rows rows from one row), nothing written.
"""


def _expand_parser(commands) -> None:
    expand = commands.add_parser(
        "expand", help="write the rows that expand (templates) and sweep rows stand for, as a manifest",
        epilog=EXPAND_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    expand.add_argument("manifest", type=Path, help="CSV or JSONL manifest (.csv, .jsonl, .jsonl.gz)")
    expand.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.jsonl", help="the expanded manifest")
    expand.add_argument("--seed", type=int, default=0,
                        help="run seed, as for run: rows without a seed derive theirs (and their draws) from (seed, id) [0]")
    _expansion_options(expand)


def cmd_expand(args) -> int:
    from .manifest import expand_manifest
    from .writer import write_text_atomic

    if args.output.resolve() == args.manifest.resolve():
        raise BatchError(f"-o {args.output} is the manifest itself: write the expansion to another file")
    rows, expanded = expand_manifest(args.manifest, args.seed, args.wildcards, args.max_rows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.output, "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows))
    for line, row_id, count in expanded:
        print(f"line {line} ({row_id}): {count} rows")
    print(f"{len(rows)} rows ({len(expanded)} expanded) -> {args.output}")
    return 0


def main(argv: list[str] | None = None) -> None:
    try:
        code = run_cli(argv)
        sys.stdout.flush()
    except BrokenPipeError:  # `sdbatch compare ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit would fail too
        code = 141  # 128 + SIGPIPE, as a shell tool killed by it
    sys.exit(code)


def run_cli(argv: list[str] | None = None) -> int:
    """Parse, dispatch and map errors to exit codes (returned, for tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "run")  # `sdbatch MANIFEST` and `sdbatch --prompt ...` are `sdbatch run ...`
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    _setup_logging(getattr(args, "quiet", False))
    handler = {"run": cmd_run, "validate": cmd_validate, "status": cmd_status, "report": cmd_report,
               "compare": cmd_compare, "bench": cmd_bench, "prepare-dataset": cmd_prepare_dataset,
               "train-lora": cmd_train_lora, "export": cmd_export, "score": cmd_score,
               "expand": cmd_expand}[args.command]
    try:
        _set_threads(args)
        return handler(args)
    except BatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # `python -m batch.cli`, and so `torchrun ... -m batch.cli run MANIFEST`
    main()
