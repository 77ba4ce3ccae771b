"""Generate a plan's batches: claim the next batch, load each model once, warm up, retry a failing batch in
halves (smaller after an out-of-memory), hand images to the writer and record them in the checkpoint."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from . import devices
from .adapters import AdapterStore
from .checkpoint import Checkpoint, Outcome
from .config import RunConfig
from .errors import ModelError
from .estimate import group_estimate
from .generate import Conditioner, generate_batch, warm_up
from .interrupt import Stop, StopRequested
from .models import LoadOptions, load_family
from .plan import Batch, Group, Plan
from .progress import Progress
from .ranks import Claims
from .score import RunScorer
from .tally import Execution, GroupTally
from .writer import ImageWriter

log = logging.getLogger(__name__)


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
    # --clip-score: the CLIP model loads once, on the run's device, and scores each batch once it is recorded
    state = _Loaded(scorer=RunScorer(config.clip_score, options.device, out / "images", checkpoint)
                    if config.clip_score else None)
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
            commit_written(writer.close(), checkpoint, state.scorer)
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
    scorer: RunScorer | None = None  # --clip-score


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
        commit_written(writer.finished(block=True), checkpoint, state.scorer)
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
            commit_written(writer.finished(), checkpoint, state.scorer)
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


def commit_written(written, checkpoint: Checkpoint, scorer: RunScorer | None = None) -> None:
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
    if scorer is not None:  # after the commit: a score is only ever kept for a recorded image
        scorer.record(outcomes, checkpoint)
