"""Run a manifest: validate, sync with the checkpoint, plan, generate, write, report.

`run` reads as its stages; each stage lives in the module of its concern: rows in manifest.py,
plan in plan.py, the launch's handshakes in ranks.py, generating batches in execute.py, what is
measured in tally.py, the journal in checkpoint.py, the files in writer.py and report.py.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__, devices
from .adapters import AdapterStore, check_adapters
from .checkpoint import FILE_NAME, Checkpoint, Counts, journal_name
from .config import RunConfig
from .context import RunContext
from .execute import execute
from .expand import folder_digest
from .families import BY_NAME, SD
from .interrupt import Stop, StopRequested
from .grids import write_grids
from .lock import FolderLock
from .manifest import Manifest, load_manifest, portable_row, read_bytes
from .models import LoadOptions, check_options, family_dtype, resolve_dtype, resolve_model
from .plan import Plan, from_layout, layout, make_plan
from .ranks import Claims, Ranks
from .report import write_reports
from .score import DEFAULT_BATCH_SIZE, resolve_clip, score_rest
from .tally import GroupTally, Stages, peak_rss_bytes
from .writer import adopt_written, remove_temp_files, write_failed, write_metadata, write_text_atomic

log = logging.getLogger(__name__)
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


@dataclass(frozen=True)
class RunResult:
    out: Path
    counts: Counts
    generated: int  # images made by this run
    skipped: int  # done earlier, skipped
    interrupted: bool

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_FAILED if self.counts.failed else EXIT_OK


def run(config: RunConfig, context: RunContext) -> RunResult:
    """The whole `run` command: nothing loads until every row is valid.

    `context` says how this run is being run (ranks, device, stop): the entry point builds it
    (`RunContext.launched` for the CLI, `RunContext.single` for a nested or main-process-only run).
    """
    # 1. Read and validate every row; resolve what the run needs
    started = time.perf_counter()
    ranks, device, stop = context.ranks, context.device, context.stop
    defaults = dataclasses.replace(config.defaults, model=config.model)
    dtype = resolve_dtype(config.dtype, device)
    options = load_options(config, device, dtype)
    check_options(options)
    salt = pixel_salt(options)
    data = read_bytes(Path(config.manifest))
    fingerprint = _resume_fingerprint(config, defaults, salt, data)
    existing = _image_files(Path(config.out) / "images")
    # Other ranks plan from rank 0's list (`_run_rank`), and must not hold the checkpoint open while rank 0 writes it.
    finished, finished_images = (_finished_lines(Path(config.out), fingerprint, existing) if ranks.main
                                 else (frozenset(), 0))
    manifest = load_manifest(config.manifest, defaults, config.seed, config.skip_invalid, data, finished,
                             wildcards=config.wildcards, max_rows=config.max_rows)
    jobs = manifest.jobs[: config.limit] if config.limit else manifest.jobs
    for model in dict.fromkeys(job.model for job in jobs):
        resolve_model(model)  # a bad model name fails before the output folder is touched
    if config.clip_score:
        resolve_clip(config.clip_score)  # so does a CLIP model that cannot be found (`--clip-score`)
    adapters = check_adapters(jobs, options)  # every LoRA, IP-Adapter and image encoder: before anything loads
    tasks = [task for job in jobs for task in job.images(pixel_salt(options, BY_NAME[job.family]) + adapters.salt(job))]

    # 2. Output folder (locked: one run at a time) and checkpoint: drop what is already done
    out = Path(config.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    file_log = _log_to(out / ("run.log" if ranks.main else f"run-rank{ranks.rank}.log"))
    try:
        with Claims(ranks, stop) as claims:
            if not ranks.main:  # rank 0 holds the lock and the checkpoint; this rank journals its own images
                return _run_rank(config, tasks, options, adapters, out, stop, claims, ranks)
            with FolderLock(out):
                return _run_locked(config, manifest, jobs, tasks, options, adapters, out, stop, started,
                                   {"resume_fingerprint": fingerprint, "finished_images": finished_images,
                                    "finished_rows": len(finished), "existing": existing}, claims, ranks)
    except StopRequested:  # stopped while waiting for the other ranks to start: nothing was made
        log.warning("interrupted before the first batch")
        return RunResult(out, Counts(len(tasks), 0, 0), 0, 0, True)
    finally:
        logging.getLogger("batch").removeHandler(file_log)
        file_log.close()


def pixel_salt(options: LoadOptions, family=SD) -> str:
    """The run-level settings that change pixels, for every image key (rows' own parameters and
    their adapters' content are added per job). Options that leave pixels as they are (offload,
    slicing, compile, batch size) stay out, so changing them remakes nothing."""
    salt = f"|dtype={family_dtype(options, family)}"  # --dtype auto: the family's own on CUDA
    if options.safety_checker:
        salt += "|safety_checker"
    if options.vae_tiling:  # blends tiles: pixels change near the seams
        salt += "|vae_tiling"
    if options.quantize != "none":
        salt += f"|quantize={options.quantize}"
    return salt


def _resume_fingerprint(config: RunConfig, defaults, salt: str, data: bytes) -> str | None:
    """What must be equal for a rerun to trust the last run's finished rows without re-reading them:
    the manifest bytes and everything that changes the images or their files."""
    if config.fresh or config.limit or config.skip_invalid:  # a partial or lenient run vouches for nothing
        return None
    # Rows naming files (images, LoRAs) are re-checked anyway; IP-Adapter rows name a prompt image.
    # `expand` rows are made from the wildcard files too: new files, new rows.
    wildcards = [folder_digest(Path(config.wildcards))] if config.wildcards else []
    settings = json.dumps([dataclasses.asdict(defaults), config.seed, salt, config.format, config.ip_adapter,
                           *wildcards], sort_keys=True)
    return hashlib.sha256(data + settings.encode()).hexdigest()


def _image_files(folder: Path) -> set[str]:
    """Names in the images folder, listed once per run (a million entries take a second or two)."""
    return {entry.name for entry in os.scandir(folder)} if folder.is_dir() else set()


def _finished_lines(out: Path, fingerprint: str | None, existing: set[str]) -> tuple[frozenset, int]:
    """Rows the last run of this same manifest and settings finished (files present), and their images."""
    path = out / FILE_NAME
    if fingerprint is None or not path.exists():
        return frozenset(), 0
    checkpoint = Checkpoint.merged(out)
    try:
        last = checkpoint.last_run()
        if last is None or last[1].get("resume_fingerprint") != fingerprint:
            return frozenset(), 0
        return checkpoint.finished_lines(existing)
    finally:
        checkpoint.close()


def _run_locked(config: RunConfig, manifest: Manifest, jobs, tasks, options: LoadOptions, adapters: AdapterStore,
                out: Path, stop: Stop, started: float, resume: dict, claims: Claims, ranks: Ranks) -> RunResult:
    """Steps 2-4 of `run`, with the folder locked (alone, or as rank 0 of several processes)."""
    images_dir = out / "images"
    if resume["finished_rows"]:
        log.info("the manifest and settings are those of the last run: %d finished rows not read again",
                 resume["finished_rows"])
    removed = remove_temp_files(images_dir)
    if removed:
        log.info("removed %d partial file(s) left by an interrupted run", removed)
    checkpoint = Checkpoint(out / FILE_NAME, wal=not ranks.distributed)
    absorbed = checkpoint.absorb_journals(out)  # what the ranks of an earlier launch recorded
    if absorbed:
        log.info("took %d image(s) from the journals of an earlier multi-process run", absorbed)
    settings = run_settings(config, options.device, options.dtype, manifest)
    settings["processes"] = ranks.world_size
    log.info("%s, %d CPU thread(s), %d process(es)", options.device, settings["threads"], ranks.world_size)
    checkpoint.start_run({**settings, "resume_fingerprint": None})
    write_text_atomic(out / "run.json", json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
    # Listed before the lock was taken; temp files removed since never match an image name.
    synced = checkpoint.sync(tasks, resume["existing"], config.retry_failed, config.fresh, config.max_attempts, config.format,
                             complete=not (config.limit or resume["finished_rows"] or config.adds_to_folder))
    synced = dataclasses.replace(synced, skipped=synced.skipped + resume["finished_images"])
    adopted = [] if config.fresh else adopt_written(synced.todo, images_dir, resume["existing"], config.model, config.format)
    if adopted:
        checkpoint.commit(adopted)
        log.info("adopted %d image(s) written by an interrupted run before it could record them", len(adopted))
        done = {(o.task.job.id, o.task.k) for o in adopted}
        synced = dataclasses.replace(synced, todo=[t for t in synced.todo if (t.job.id, t.k) not in done],
                                     skipped=synced.skipped + len(adopted))
    # With --limit, invalid rows past the last planned row are not this run's business.
    last_line = jobs[-1].line if config.limit and jobs else None
    invalid = [item for item in manifest.invalid if last_line is None or item[0] <= last_line]
    if invalid:
        folder = Path(config.manifest).resolve().parent
        checkpoint.record_invalid([(line, json.dumps(portable_row(raw, folder), ensure_ascii=False, default=str),
                                    "; ".join(str(e) for e in errors)) for line, raw, errors in invalid])
    checkpoint.set_fingerprint(resume["resume_fingerprint"])
    plan = make_plan(synced.todo, config.model, config.batch_size, options.device)
    log.info("%d jobs: %d images to make in %d batches, %d done earlier, %d failed earlier (not retried)",
             len(jobs) + manifest.skipped_rows, plan.images, plan.batches, synced.skipped, synced.failed_kept)
    if ranks.distributed:  # the exact batches, in order: the other ranks run rank 0's plan, batch sizes included
        write_text_atomic(out / _plan_name(checkpoint.run), json.dumps(layout(plan)))
    claims.announce("ready", str(checkpoint.run))

    # 3. Generate, writing as we go
    execution = execute(plan, config, options, adapters, out, checkpoint, stop, claims)
    tallies, interrupted = execution.tallies, execution.interrupted
    if ranks.distributed:
        checkpoint.save_rank(rank_stats(ranks, options.device, tallies))
        claims.finished()
        if not interrupted:  # stopped: the launcher stops the others too; the next run absorbs their journals
            log.info("waiting for the other ranks to finish")
            if claims.await_all_finished():
                checkpoint.absorb_journals(out)
                (out / _plan_name(checkpoint.run)).unlink(missing_ok=True)
            else:  # stopped while waiting: report what is recorded; the next run takes the rest
                interrupted = True
    if config.clip_score and not interrupted:  # the images done before this run: every image gets its score
        interrupted = score_rest(config.clip_score, options.device, checkpoint, out,
                                 config.batch_size or DEFAULT_BATCH_SIZE, stop, config.quiet)

    # 4. Folder-level outputs, rebuilt from the checkpoint
    generated = sum(len(t.per_image_s) for t in tallies)
    stages = Stages()
    for tally in tallies:
        stages.add(tally.stages)
    vram = [t.peak_vram_bytes for t in tallies if t.peak_vram_bytes is not None]
    checkpoint.finish_run({
        "jobs": len(jobs) + manifest.skipped_rows, "generated": generated, "skipped_from_checkpoint": synced.skipped,
        "wall_s": round(time.perf_counter() - started, 4),
        "generate_s": round(sum(t.wall_s for t in tallies), 4),
        "peak_vram_bytes": max(vram) if vram else None,
        "device_used_bytes": execution.device_used_bytes,
        "peak_rss_bytes": peak_rss_bytes(), "interrupted": interrupted,
        "stages": {k: round(v, 4) for k, v in vars(stages).items()},
    })
    finish_outputs(out, checkpoint)
    counts = checkpoint.counts()
    checkpoint.close()
    result = RunResult(out, counts, generated, synced.skipped, interrupted)
    log.info("%s: %d done, %d failed, %d pending; %d made now, %d skipped from checkpoint",
             "interrupted" if interrupted else "finished", counts.done, counts.failed, counts.pending,
             generated, synced.skipped)
    return result


def _run_rank(config: RunConfig, tasks, options: LoadOptions, adapters: AdapterStore, out: Path,
              stop: Stop, claims: Claims, ranks: Ranks) -> RunResult:
    """A rank other than 0: plan what rank 0 registered, claim batches, journal them in its own file."""
    run_id = int(claims.await_announcement("ready"))
    plan = rank_plan(out, run_id, tasks, config.model)
    journal = Checkpoint(out / journal_name(ranks.rank), wal=False)
    journal.run = run_id
    try:
        execution = execute(plan, config, options, adapters, out, journal, stop, claims)
        journal.save_rank(rank_stats(ranks, options.device, execution.tallies))
    finally:
        journal.close()
        claims.finished()
    generated = sum(len(t.per_image_s) for t in execution.tallies)
    view = Checkpoint.merged(out)
    counts = view.counts()
    view.close()
    log.info("rank %d: %d images made", ranks.rank, generated)
    # Failed jobs are rank 0's to report (exit 1): a non-zero exit here would make torchrun restart the group.
    return RunResult(out, Counts(counts.total, counts.done, 0), generated, 0, execution.interrupted)


def _plan_name(run_id: int) -> str:
    return f".plan-run{run_id}.json"


def rank_plan(out: Path, run_id: int, tasks, default_model: str) -> Plan:
    """Rank 0's plan for run `run_id`, batch for batch, rebuilt from this rank's tasks."""
    return from_layout(tasks, json.loads((out / _plan_name(run_id)).read_text(encoding="utf-8")), default_model)


def rank_stats(ranks: Ranks, device: str, tallies: list[GroupTally]) -> dict:
    """report.json's `ranks` entry for this process."""
    images = sum(len(t.per_image_s) for t in tallies)
    seconds = round(sum(t.wall_s for t in tallies), 4)
    return {"rank": ranks.rank, "host": ranks.host, "device": device, "images": images, "seconds": seconds,
            "images_per_s": round(images / seconds, 4) if seconds else 0.0}


def finish_outputs(out: Path, checkpoint: Checkpoint) -> None:
    """metadata.jsonl, failed.jsonl, the sweeps' grids and the report files, all from the checkpoint."""
    write_metadata(out, checkpoint.done_metadata())
    write_failed(out, checkpoint.failed_jobs())
    write_grids(out, checkpoint)  # before the report, which shows them
    write_reports(out, checkpoint)


def load_options(config: RunConfig, device: str, dtype: str) -> LoadOptions:
    return LoadOptions(
        device=device, dtype=dtype, offload=config.offload, attention_slicing=config.attention_slicing,
        vae_slicing=config.vae_slicing, vae_tiling=config.vae_tiling, safety_checker=config.safety_checker,
        ip_adapter=config.ip_adapter, compile=config.compile, dtype_auto=config.dtype == "auto",
        quantize=config.quantize)


def run_settings(config: RunConfig, device: str, dtype: str, manifest: Manifest) -> dict:
    """run.json and the report's "run" block: resolved settings, versions, device."""
    import diffusers
    import torch
    import transformers

    return {
        # report.html draws each group's peak VRAM against gpu_total_bytes
        "model": config.model, "device": device, "gpu_name": devices.name(device),
        "gpu_total_bytes": devices.total_bytes(device), "dtype": dtype,
        "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "sdbatch": __version__, "python": platform.python_version(),
        "batch_size": config.batch_size or "auto", "compile": config.compile, "threads": torch.get_num_threads(),
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "manifest": str(manifest.path), "manifest_sha256": manifest.sha256,
        "seed": config.seed, "format": config.format, "limit": config.limit,
        "fresh": config.fresh, "retry_failed": config.retry_failed, "skip_invalid": config.skip_invalid,
        "defaults": dataclasses.asdict(config.defaults),
        "host": platform.node(),
    }


def _log_to(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("batch")
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    return handler
