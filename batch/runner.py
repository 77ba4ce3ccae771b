"""Run a manifest: validate, sync with the checkpoint, plan, generate, write, report."""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, devices
from .adapters import AdapterStore, check_adapters
from .checkpoint import FILE_NAME, Checkpoint, Counts, Outcome, journal_name
from .config import RunConfig
from .context import RunContext
from .errors import ModelError
from .estimate import group_estimate
from .generate import Conditioner, generate_batch, warm_up
from .interrupt import Stop, StopRequested
from .lock import FolderLock
from .manifest import Manifest, load_manifest, portable_row, read_bytes
from .models import LoadOptions, check_options, load_family, resolve_dtype, resolve_model
from .plan import Batch, Group, Plan, from_layout, layout, make_plan
from .progress import Progress
from .ranks import Claims, Ranks
from .report import write_reports
from .writer import ImageWriter, adopt_written, remove_temp_files, write_failed, write_metadata, write_text_atomic

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


@dataclass
class Execution:
    """What generating the plan left: per-group tallies, whether it was stopped, device memory seen."""

    tallies: list[GroupTally]
    interrupted: bool
    device_used_bytes: int | None  # the most the whole device held with a model loaded (CUDA)


@dataclass
class Stages:
    """Seconds per stage, summed over batches."""

    encode_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0
    write_s: float = 0.0

    def add(self, other: Stages) -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class GroupTally:
    """What one group's run measured, stored in the checkpoint for the report."""

    group: Group
    load_s: float = 0.0
    warmup_s: float = 0.0
    wall_s: float = 0.0
    per_image_s: list[float] = field(default_factory=list)
    failed: int = 0
    batches: int = 0  # the batches this process ran: under a launcher, its share of the group's
    peak_vram_bytes: int | None = None
    freed_before_bytes: int | None = None  # GPU memory freed by unloading the previous model
    vram_estimate_bytes: int | None = None  # what `validate --estimate-vram` predicts, beside the measured peak
    working_batch_size: int | None = None  # set when an out-of-memory made the group go on smaller
    stages: Stages = field(default_factory=Stages)

    def as_dict(self) -> dict:
        g, times = self.group, sorted(self.per_image_s)
        made = len(times)
        return {
            "model": g.model, "mode": g.mode, "width": g.width, "height": g.height, "lora": g.lora,
            "images": made, "failed": self.failed, "batches": self.batches,
            "batch_size": max(len(b.tasks) for b in g.batches),
            "working_batch_size": self.working_batch_size or max(len(b.tasks) for b in g.batches),
            "load_s": round(self.load_s, 4), "warmup_s": round(self.warmup_s, 4), "wall_s": round(self.wall_s, 4),
            "images_per_s": round(made / self.wall_s, 4) if self.wall_s > 0 else 0.0,
            "s_per_image_p50": round(percentile(times, 50), 4) if times else None,
            "s_per_image_p95": round(percentile(times, 95), 4) if times else None,
            "peak_vram_bytes": self.peak_vram_bytes,
            "vram_estimate_bytes": self.vram_estimate_bytes,
            "freed_before_bytes": self.freed_before_bytes,
            "stages": {k: round(v, 4) for k, v in vars(self.stages).items()},
        }


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile of already sorted values (inclusive method)."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[int(q) - 1]


def peak_rss_bytes() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    except ImportError:  # Windows
        import psutil

        return psutil.Process().memory_info().peak_wset


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
    manifest = load_manifest(config.manifest, defaults, config.seed, config.skip_invalid, data, finished)
    jobs = manifest.jobs[: config.limit] if config.limit else manifest.jobs
    for model in dict.fromkeys(job.model for job in jobs):
        resolve_model(model)  # a bad model name fails before the output folder is touched
    adapters = check_adapters(jobs, options)  # every LoRA, IP-Adapter and image encoder: before anything loads
    tasks = [task for job in jobs for task in job.images(salt + adapters.salt(job))]

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


def pixel_salt(options: LoadOptions) -> str:
    """The run-level settings that change pixels, for every image key (rows' own parameters and
    their adapters' content are added per job). Options that leave pixels as they are (offload,
    slicing, compile, batch size) stay out, so changing them remakes nothing."""
    salt = f"|dtype={options.dtype}"
    if options.safety_checker:
        salt += "|safety_checker"
    if options.vae_tiling:  # blends tiles: pixels change near the seams
        salt += "|vae_tiling"
    return salt


def _resume_fingerprint(config: RunConfig, defaults, salt: str, data: bytes) -> str | None:
    """What must be equal for a rerun to trust the last run's finished rows without re-reading them:
    the manifest bytes and everything that changes the images or their files."""
    if config.fresh or config.limit or config.skip_invalid:  # a partial or lenient run vouches for nothing
        return None
    # Rows naming files (images, LoRAs) are re-checked anyway; IP-Adapter rows name a prompt image.
    settings = json.dumps([dataclasses.asdict(defaults), config.seed, salt, config.format, config.ip_adapter],
                          sort_keys=True)
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
    """metadata.jsonl, failed.jsonl and the report files, all from the checkpoint."""
    write_metadata(out, checkpoint.done_metadata())
    write_failed(out, checkpoint.failed_jobs())
    write_reports(out, checkpoint)


def load_options(config: RunConfig, device: str, dtype: str) -> LoadOptions:
    return LoadOptions(
        device=device, dtype=dtype, offload=config.offload, attention_slicing=config.attention_slicing,
        vae_slicing=config.vae_slicing, vae_tiling=config.vae_tiling, safety_checker=config.safety_checker,
        ip_adapter=config.ip_adapter, compile=config.compile)


def execute(plan: Plan, config: RunConfig, options: LoadOptions, adapters: AdapterStore, out: Path,
            checkpoint: Checkpoint, stop: Stop, claims: Claims) -> Execution:
    """Generate the batches this process claims, in plan order, one model at a time.

    Alone, a process claims every batch in turn; under a launcher, ranks claim from a shared
    counter, so each runs a stretch of the plan and loads a model only when its claims reach it.
    """
    # The writer holds at most one batch: a kill loses at most one batch of finished images.
    largest = max((len(b.tasks) for g in plan.groups for b in g.batches), default=1)
    writer = ImageWriter(out / "images", config.format, config.model, config.writer_threads, max_pending=largest)
    execution = Execution([], False, None)
    devices.activate(options.device)  # the CUDA context and every default allocation on the run's GPU
    ordered = [(group, batch) for group in plan.groups for batch in group.batches]
    state = _Loaded()
    with Progress(plan.images, quiet=config.quiet) as progress:
        try:
            while True:
                stop.check()  # a safe point: everything before it is written or queued
                number = claims.next_batch()
                if number >= len(ordered):
                    break
                group, batch = ordered[number]
                if state.group is not group:
                    _end_group(state, writer, checkpoint, execution, options.device)
                    if state.model != group.model:
                        _unload(state, options, execution)
                        state.model = group.model
                        state.family, state.load_error = _load_or_fail(group.model, options)
                        if state.family is not None:
                            state.load_s = state.family.load_s
                            state.family.adapters = adapters
                            state.conditioner = Conditioner(state.family)
                    _start_group(state, group, config, options, execution, progress)
                state.tally.batches += 1
                if state.family is None:  # the model did not load: its batches fail, with why
                    checkpoint.commit([Outcome(t, ok=False, error=f"model did not load: {state.load_error}",
                                               group=group.name) for t in batch.tasks])
                    state.tally.failed += len(batch.tasks)
                    progress.advance(len(batch.tasks))
                    continue
                _run_batch(batch, state, config, options.device, writer, checkpoint, progress)
            _end_group(state, writer, checkpoint, execution, options.device)
            _unload(state, options, execution)
        except (KeyboardInterrupt, StopRequested):
            execution.interrupted = True
            log.warning("interrupted: the images already made are recorded; run the same command again to resume")
        finally:
            _commit_written(writer.close(), checkpoint)
            if execution.tallies:
                checkpoint.save_group(len(execution.tallies) - 1, execution.tallies[-1].as_dict())
    return execution


@dataclass
class _Loaded:
    """What `execute` holds between batches: the model and group in hand."""

    model: str | None = None
    family: object = None
    conditioner: object = None
    load_error: str | None = None
    load_s: float = 0.0  # charged to the next group started
    group: Group | None = None
    tally: GroupTally | None = None
    freed: int | None = None


def _start_group(state: _Loaded, group: Group, config: RunConfig, options: LoadOptions, execution: Execution,
                 progress: Progress) -> None:
    family = state.family
    load_s, state.load_s = state.load_s, 0.0  # the load is charged to the model's first group
    state.group = group
    state.tally = GroupTally(group, load_s=load_s, freed_before_bytes=state.freed,
                             vram_estimate_bytes=group_estimate(group, options).total_bytes)
    state.freed = None
    progress.set_group(group.name)
    if family is None:
        return  # its images fail; the report's groups are the groups that ran
    family.adapters.release_loras(family, keep={group.lora})  # earlier groups' LoRAs leave the model (issue 19)
    execution.tallies.append(state.tally)
    devices.reset_peak(options.device)
    if devices.is_cuda(options.device) or config.compile:
        started = time.perf_counter()  # first calls pick kernels (and compile): keep that out of the timings
        if not _warm_up(family, state.conditioner, group):
            devices.free_cache(options.device)
        state.tally.warmup_s = time.perf_counter() - started


def _end_group(state: _Loaded, writer: ImageWriter, checkpoint: Checkpoint, execution: Execution, device: str) -> None:
    if state.tally is None:
        return
    if state.family is not None:
        started = time.perf_counter()
        _commit_written(writer.finished(block=True), checkpoint)
        state.tally.wall_s += time.perf_counter() - started
        state.tally.peak_vram_bytes = devices.peak_allocated(device)
        checkpoint.save_group(len(execution.tallies) - 1, state.tally.as_dict())
    state.group, state.tally = None, None


def _unload(state: _Loaded, options: LoadOptions, execution: Execution) -> None:
    if state.family is None:
        return
    # Read while the model is loaded: after the unload it would show an empty device.
    used = devices.used_bytes(options.device)
    if used is not None:
        execution.device_used_bytes = max(used, execution.device_used_bytes or 0)
    # The embedding caches live on the device too: drop them before the next model loads.
    state.conditioner.clear()
    state.freed = state.family.unload()
    if state.freed is not None:
        log.info("freed %.2f GB of GPU memory held by %s", state.freed / 2**30, state.model)
    state.family = state.conditioner = None


def _load_or_fail(model: str, options: LoadOptions):
    """(the model's pipeline family, None), or (None, why) if it does not load: its rows fail, the run goes on."""
    try:
        return load_family(model, options), None
    except Exception as e:  # any load failure (missing file, bad config, CUDA out of memory...) is this model's alone
        message = f"{type(e).__name__}: {e}" if not isinstance(e, ModelError) else str(e)
        log.error("cannot load %s: %s", model, message)
        log.debug("traceback of that failure:", exc_info=True)  # run.log only
    devices.free_cache(options.device)  # whatever the failed load left behind
    return None, message


def _run_batch(planned: Batch, state: _Loaded, config: RunConfig, device: str, writer: ImageWriter,
               checkpoint: Checkpoint, progress: Progress) -> None:
    """One claimed batch: generate (in halves after an out-of-memory), hand images to the writer, record."""
    tally, group = state.tally, state.group
    started = time.perf_counter()
    try:
        for batch in _at_most(planned, tally.working_batch_size):
            bucket = (tally.working_batch_size or len(group.batches[0].tasks)) if config.compile else None
            made, failures = _make(batch, state.family, state.conditioner, tally, pad_to=bucket)
            for task, image, seconds, notes in made:
                writer.submit(task, image, context=(tally, batch.index, seconds), notes=notes)
            checkpoint.commit([Outcome(task, ok=False, error=error, group=group.name, batch=batch.index)
                               for task, error in failures])
            tally.failed += len(failures)
            log.debug("batch %d: %d generated, %d failed", batch.index, len(made), len(failures))
            _commit_written(writer.finished(), checkpoint)
            progress.advance(len(batch.tasks))
    finally:
        tally.wall_s += time.perf_counter() - started


def _warm_up(family, conditioner, group: Group) -> bool:
    """One short pass at the group's shape; False (and a warning) if it failed."""
    try:
        warm_up(family, conditioner, group.batches[0])
        return True
    except Exception as e:  # the real batch will meet the same problem and handle it per job
        log.warning("warm-up of %s failed (%s: %s); going on without it", group.name, type(e).__name__, e)
        return False


def _make(batch: Batch, family, conditioner, tally: GroupTally, pad_to: int | None = None):
    """Generate a batch; a failing batch is retried in halves down to single images.

    `pad_to`: with a compiled UNet, a short last batch is padded (its last image repeated,
    the copies thrown away) so the compiled shapes stay static and nothing recompiles.
    Returns ([(task, image, seconds, notes)], [(task, error)]).
    """
    size = len(batch.tasks)
    padded = batch
    if pad_to and size < pad_to:
        padded = Batch(batch.index, batch.tasks + (batch.tasks[-1],) * (pad_to - size))
    try:
        output, error, out_of_memory = generate_batch(family, conditioner, padded), None, False
    except KeyboardInterrupt:
        raise
    except Exception as e:  # one bad job must not stop the night: record it, go on
        output, error, out_of_memory = None, f"{type(e).__name__}: {e}", _is_oom(e)
        if size == 1:
            log.debug("traceback of job %s image %d's failure:", batch.tasks[0].job.id, batch.tasks[0].k,
                      exc_info=True)  # run.log only
    if output is not None:
        return _made(batch, output, tally)
    # Retry only here, outside the handler: while it runs, the exception's traceback keeps the
    # failed call's frames, and so its tensors, alive; freeing memory in there frees nothing.
    devices.free_cache(family.device)
    if out_of_memory:
        smaller = max(1, size // 2)
        if tally.working_batch_size is None or smaller < tally.working_batch_size:
            tally.working_batch_size = smaller  # kept for the rest of the group
            log.warning("out of memory at batch size %d: continuing this group at %d", size, smaller)
    if size == 1:
        log.error("job %s image %d failed: %s", batch.tasks[0].job.id, batch.tasks[0].k, error)
        return [], [(batch.tasks[0], error)]
    log.warning("batch %d failed (%s); retrying in halves", batch.index, error)
    half = size // 2
    made, failures = [], []
    for part in (batch.tasks[:half], batch.tasks[half:]):
        for chunk in _at_most(Batch(batch.index, part), tally.working_batch_size):  # the size may have shrunk
            m, f = _make(chunk, family, conditioner, tally)
            made += m
            failures += f
    return made, failures


def _made(batch: Batch, output, tally: GroupTally):
    """A generated batch's images (padding dropped) and per-image failures, with the stage times tallied."""
    size = len(batch.tasks)
    tally.stages.encode_s += output.encode_s
    tally.stages.denoise_s += output.denoise_s
    tally.stages.decode_s += output.decode_s
    share = output.seconds / size
    made = [(task, image, share, output.notes.get(i)) for i, (task, image) in enumerate(zip(batch.tasks, output.images))
            if i not in output.errors]
    return made, [(batch.tasks[i], error) for i, error in output.errors.items() if i < size]


def _is_oom(error: Exception) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _at_most(batch: Batch, size: int | None) -> list[Batch]:
    """The batch, split into chunks of the group's working size after an out-of-memory."""
    if size is None or len(batch.tasks) <= size:
        return [batch]
    return [Batch(batch.index, batch.tasks[i : i + size]) for i in range(0, len(batch.tasks), size)]


def _commit_written(written, checkpoint: Checkpoint) -> None:
    """Record what the writer finished, crediting each image to the group (tally) that made it."""
    outcomes = []
    for w in written:
        tally, batch, seconds = w.context
        group = tally.group.name
        if w.error:
            outcomes.append(Outcome(w.task, ok=False, error=w.error, group=group, batch=batch))
            continue
        outcomes.append(Outcome(w.task, ok=True, file=w.file, meta=w.meta, group=group, batch=batch, seconds=seconds))
        tally.per_image_s.append(seconds)
        tally.stages.write_s += w.seconds
    checkpoint.commit(outcomes)


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
