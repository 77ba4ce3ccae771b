"""Command line: turn options into a RunConfig and call the runner; user errors exit 2 with one message."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import DEFAULT_MODEL, Defaults, RunConfig
from .errors import BatchError
from .schedulers import SCHEDULERS

COMMANDS = ("run", "validate", "status", "report")

EXAMPLES = """\
examples:
  sdbatch manifests/demo.jsonl --model tiny                 # run (same as `sdbatch run ...`)
  sdbatch run prompts.csv --out outputs/night1 --steps 30 --batch-size 8
  sdbatch validate prompts.csv                              # check every row, print the plan
  sdbatch status outputs/night1 --json                      # {"total", "done", "failed", "pending"}
  sdbatch report outputs/night1                             # rebuild report.json/.csv/.md
  python run_batch.py manifests/demo.jsonl --model tiny --fresh

exit codes: 0 all done; 1 some jobs failed (the rest done); 2 bad input or usage,
nothing generated; 130 interrupted (checkpoint safe: run the same command again to resume)
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _manifest_options() -> argparse.ArgumentParser:
    """Options shared by `run` and `validate` (they change the plan)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("manifest", type=Path, help="CSV or JSONL manifest (.csv, .jsonl, .jsonl.gz)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id, diffusers folder, or 'tiny' (embedded) [{DEFAULT_MODEL}]")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [auto]")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="images per UNet call [auto: 4 on CPU, by resolution on CUDA]")
    p.add_argument("--steps", type=_positive_int, default=Defaults.steps, help=f"denoising steps [{Defaults.steps}]")
    p.add_argument("--cfg", type=float, default=Defaults.cfg, help=f"classifier-free guidance scale [{Defaults.cfg}]")
    p.add_argument("--width", type=int, default=Defaults.width, help=f"[{Defaults.width}]")
    p.add_argument("--height", type=int, default=Defaults.height, help=f"[{Defaults.height}]")
    p.add_argument("--scheduler", default=Defaults.scheduler, choices=list(SCHEDULERS), help=f"[{Defaults.scheduler}]")
    p.add_argument("--seed", type=int, default=0, help="run seed; rows without a seed derive theirs from (seed, id) [0]")
    p.add_argument("--skip-invalid", action="store_true", help="run the valid rows, record invalid ones as failed")
    p.add_argument("--limit", type=_positive_int, default=None, help="only the first N jobs (rows)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdbatch", description="Batch runner for Stable Diffusion: a manifest of txt2img, img2img and "
        "image-prompt jobs in; checkpointed images, metadata and a timing/VRAM report out.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"sdbatch {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    shared = _manifest_options()

    run = commands.add_parser("run", parents=[shared], help="validate, then generate with checkpointing",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--out", type=Path, default=None, help="output folder [outputs/<manifest stem>]")
    run.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"], help="[auto: fp16 on CUDA, fp32 on CPU]")
    run.add_argument("--format", default="png", choices=["png", "webp", "jpg"], help="[png]")
    run.add_argument("--retry-failed", action="store_true", help="retry images that failed in an earlier run")
    run.add_argument("--fresh", action="store_true", help="ignore the checkpoint: make every image again")
    run.add_argument("--compile", action="store_true", help="torch.compile the UNet (warm-up reported apart)")
    run.add_argument("--quiet", action="store_true", help="no progress bar: a plain line every 10 s")

    validate = commands.add_parser("validate", parents=[shared], help="check every row and print the plan; loads no model")
    validate.add_argument("--json", action="store_true", help="print the plan as JSON")

    status = commands.add_parser("status", help="progress of an output folder, from its checkpoint")
    status.add_argument("out", type=Path)
    status.add_argument("--json", action="store_true", help='print {"total","done","failed","pending"} (images)')

    report = commands.add_parser("report", help="rebuild report.json/.csv/.md (and metadata.jsonl, failed.jsonl) from the checkpoint")
    report.add_argument("out", type=Path)
    return parser


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
    root = logging.getLogger("batch")
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


def cmd_run(args) -> int:
    from .runner import run

    config = RunConfig(
        manifest=args.manifest, out=args.out or _default_out(args.manifest), model=args.model, device=args.device,
        dtype=args.dtype, batch_size=args.batch_size, seed=args.seed, format=args.format,
        skip_invalid=args.skip_invalid, retry_failed=args.retry_failed, fresh=args.fresh, limit=args.limit,
        quiet=args.quiet, compile=args.compile, defaults=_defaults(args))
    result = run(config)
    c = result.counts
    print(f"{c.done}/{c.total} images done ({result.generated} made now, {result.skipped} from checkpoint), "
          f"{c.failed} failed, {c.pending} pending -> {result.out}")
    if result.interrupted:
        print("interrupted: run the same command again to resume", file=sys.stderr)
    elif c.failed:
        print(f"failed jobs are listed in {result.out / 'failed.jsonl'} (rerun with --retry-failed)", file=sys.stderr)
    return result.exit_code


def cmd_validate(args) -> int:
    from .manifest import load_manifest
    from .plan import make_plan

    manifest = load_manifest(args.manifest, _defaults(args), args.seed, args.skip_invalid)
    jobs = manifest.jobs[: args.limit] if args.limit else manifest.jobs
    from .models import resolve_device

    device = resolve_device(args.device)  # the plan's batch sizes depend on it, as in `run`
    tasks = [t for job in jobs for t in job.images("")]
    plan = make_plan(tasks, args.model, args.batch_size, device)
    if args.json:
        print(json.dumps({"valid": True, "jobs": len(jobs), "images": plan.images, "batches": plan.batches,
                          "invalid_rows": len(manifest.invalid), "groups": [
                              {"model": g.model, "mode": g.mode, "width": g.width, "height": g.height, "lora": g.lora,
                               "batches": len(g.batches), "images": g.images} for g in plan.groups]}))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{manifest.path}: {len(jobs)} jobs, {plan.images} images, {plan.batches} batches")
    for column in ("group", "model", "mode", "size", "lora", "batches", "images"):
        table.add_column(column, justify="right" if column in ("group", "batches", "images") else "left")
    for i, g in enumerate(plan.groups, start=1):
        table.add_row(str(i), g.model, g.mode, f"{g.width}x{g.height}", g.lora or "-", str(len(g.batches)), str(g.images))
    console = Console()
    console.print(table)
    if manifest.invalid:
        console.print(f"{len(manifest.invalid)} invalid row(s) will be recorded as failed (--skip-invalid)")
    console.print("valid")
    return 0


def cmd_status(args) -> int:
    from .checkpoint import FILE_NAME, Checkpoint

    checkpoint = Checkpoint(args.out / FILE_NAME, readonly=True)
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
    checkpoint = Checkpoint(path)
    finish_outputs(args.out, checkpoint)
    checkpoint.close()
    print(f"wrote {args.out / 'report.json'}, report.csv, report.md")
    return 0


def main(argv: list[str] | None = None) -> None:
    sys.exit(run_cli(argv))


def run_cli(argv: list[str] | None = None) -> int:
    """Parse, dispatch and map errors to exit codes (returned, for tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "run")  # `sdbatch MANIFEST` is `sdbatch run MANIFEST`
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    _setup_logging(getattr(args, "quiet", False))
    handler = {"run": cmd_run, "validate": cmd_validate, "status": cmd_status, "report": cmd_report}[args.command]
    try:
        return handler(args)
    except BatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
