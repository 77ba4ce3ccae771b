"""The Python API: `run` a manifest, a DataFrame or a list of dicts; `Generator` keeps one model warm.

Both go through the runner's own machinery (manifest validation, the pipeline family,
`generate_batch`, the writer), so their images are the CLI's, pixel for pixel.

    from batch import run, Generator

    result = run(pandas_frame, out="outputs/nb1", model="tiny", steps=20)
    result.table()                       # one row per image
    gen = Generator("tiny", device="cpu")
    images = gen.generate("a red circle", num_images=2, seed=1)
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

from .config import DEFAULT_MODEL, Defaults, RunConfig
from .errors import ManifestError, RowError
from .job import FILE_COLUMNS

log = logging.getLogger(__name__)

__all__ = ["Generator", "Result", "run"]

_ROW_DEFAULTS = {f.name for f in fields(Defaults)} - {"model"}  # steps, cfg, width, ...: run-level defaults
_RUN_OPTIONS = {f.name for f in fields(RunConfig)} - {"manifest", "out", "model", "defaults", "adds_to_folder"}


@dataclass(frozen=True)
class Result:
    """What `run` did: the CLI's exit code and counts, the report, and a table of the images."""

    out: Path
    exit_code: int
    counts: object  # checkpoint.Counts: total, done, failed, pending (images)
    generated: int
    skipped: int
    interrupted: bool

    @property
    def report(self) -> dict:
        """report.json, as a dict."""
        return json.loads((self.out / "report.json").read_text(encoding="utf-8"))

    def table(self):
        """A pandas DataFrame, one row per image: id, k, status, path, error, then its metadata."""
        import pandas as pd

        from .checkpoint import Checkpoint

        view = Checkpoint.merged(self.out)
        try:
            rows = view.db.execute("SELECT id, k, status, file, error, meta FROM images ORDER BY ord, id, k").fetchall()
        finally:
            view.close()
        records = []
        for image_id, k, status, file, error, meta in rows:
            record = {"id": image_id, "k": k, "status": status,
                      "path": str(self.out / "images" / file) if file and status == "done" else None, "error": error}
            record.update({key: value for key, value in (json.loads(meta) if meta else {}).items()
                           if key not in ("id", "k")})
            records.append(record)
        return pd.DataFrame.from_records(records)


def run(rows, out=None, model: str = DEFAULT_MODEL, *, launcher: bool = False, **options) -> Result:
    """Run a manifest path, a pandas DataFrame or a list of dicts, as `sdbatch run` would.

    Keyword options are the CLI's run options with underscores (`batch_size`, `retry_failed`,
    `attention_slicing`, ...) and the per-row defaults (`steps`, `cfg`, `width`, `height`,
    `scheduler`, ...), with the CLI's defaults. A DataFrame or list is stored in OUT as
    `manifest.jsonl`, so resume, `status` and `report` work as for any run; an invalid row
    raises `ManifestError` listing every bad row by its index.

    The run is one process, even under torchrun / accelerate launch (so a call under
    `if accelerator.is_main_process:` never waits for the other ranks). `launcher=True` joins
    the launch instead: every rank must then call `run` with the same arguments, and the ranks
    share the work as `torchrun ... -m batch.cli run` does. Ctrl-C stops at the next batch.
    """
    from .context import RunContext
    from .interrupt import GracefulStop
    from .runner import run as run_manifest

    _show_progress(not options.get("quiet", False))
    unknown = set(options) - _RUN_OPTIONS - _ROW_DEFAULTS
    if unknown:
        raise TypeError(f"run() got unknown option(s) {sorted(unknown)}; known: {sorted(_RUN_OPTIONS | _ROW_DEFAULTS)}")
    defaults = Defaults(**{k: v for k, v in options.items() if k in _ROW_DEFAULTS})
    if isinstance(rows, (str, Path)):
        manifest, labels = Path(rows), None
        out = Path(out) if out is not None else Path("outputs") / manifest.name.split(".")[0]
    else:
        out = Path(out) if out is not None else Path("outputs") / "python"
        manifest, labels = _store_rows(rows, out)
    config = RunConfig(manifest=manifest, out=out, model=model, defaults=defaults,
                       **{k: v for k, v in options.items() if k in _RUN_OPTIONS})
    _set_threads(config.threads, launcher, out)
    try:
        with GracefulStop() as stop:
            context = (RunContext.launched if launcher else RunContext.single)(config.device, stop)
            outcome = run_manifest(config, context)
    except ManifestError as e:
        if labels is None:
            raise
        raise ManifestError("rows", [_by_index(error, labels) for error in e.errors]) from None
    return Result(outcome.out, outcome.exit_code, outcome.counts, outcome.generated, outcome.skipped,
                  outcome.interrupted)


def _set_threads(requested: int | None, launcher: bool = False, out: Path | None = None) -> None:
    """torch's CPU threads: `threads=N`, else OMP_NUM_THREADS, else the count OUT's last run used,
    else the free share of this process's CPUs."""
    from . import threads

    threads.configure(requested, threads.processes_on_host() if launcher else 1, out)


def _show_progress(on: bool) -> None:
    """Progress lines on stderr (a rich bar on a terminal or in a notebook) unless the caller set up logging."""
    import logging
    import sys

    logger = logging.getLogger("batch")
    if on and not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.setLevel(logging.INFO)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _store_rows(rows, out: Path) -> tuple[Path, list]:
    """OUT/manifest.jsonl from a DataFrame or list of dicts; (its path, each line's row label)."""
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is a dependency
        pd = None
    if pd is not None and isinstance(rows, pd.DataFrame):
        labels = list(rows.index)
        records = rows.to_dict(orient="records")
    else:
        records = [dict(row) for row in rows]
        labels = list(range(len(records)))
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for record in records:
        clean = {str(k): _plain(v) for k, v in record.items()}
        clean = {k: v for k, v in clean.items() if v is not None}  # NaN cells: the default, as an empty CSV cell
        for column in FILE_COLUMNS:  # relative to where the caller is, not to OUT where the rows are kept
            if isinstance(clean.get(column), str) and clean[column] and _local(clean[column]):
                clean[column] = str(Path(clean[column]).expanduser().resolve())
        lines.append(json.dumps(clean, ensure_ascii=False) + "\n")
    path = out / "manifest.jsonl"
    from .writer import write_text_atomic

    write_text_atomic(path, "".join(lines))
    return path, labels


def _local(value: str) -> bool:
    return Path(value).expanduser().exists() or value.startswith((".", "/", "~"))


def _plain(value):
    """numpy scalars to Python, NaN/NaT to None, so the row reads like one from a JSONL file."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    try:
        import pandas as pd

        if value is pd.NaT:
            return None
    except ImportError:  # pragma: no cover
        pass
    return value


def _by_index(error: RowError, labels: list) -> RowError:
    """A manifest line number as the DataFrame's row label."""
    if error.line is None or not 1 <= error.line <= len(labels):
        return error
    return _IndexedError(error.line, error.column, error.value, error.allowed, labels[error.line - 1])


@dataclass(frozen=True)
class _IndexedError(RowError):
    index: object = None

    def __str__(self) -> str:
        text = super().__str__()
        return f"row {self.index!r}" + text[len(f"line {self.line}"):]


class Generator:
    """One model, loaded once, serving txt2img, img2img and image prompts warm (the runner's pipeline family).

    Methods take a manifest row's parameters as keywords, with the same defaults
    (`steps`, `cfg`, `width`, `height`, `scheduler`, `negative_prompt`, `seed`, ...), and
    return PIL images; with `out=`, images are also written with their metadata as a run does.
    """

    def __init__(self, model: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", *,
                 ip_adapter: str | None = None, offload: str = "none", attention_slicing: bool = False,
                 vae_slicing: bool = False, vae_tiling: bool = False, safety_checker: bool = False,
                 quiet: bool = False, threads: int | None = None, **defaults):
        from .adapters import AdapterStore
        from .generate import Conditioner
        from .models import LoadOptions, check_options, load_family, resolve_device, resolve_dtype

        unknown = set(defaults) - _ROW_DEFAULTS
        if unknown:
            raise TypeError(f"Generator() got unknown option(s) {sorted(unknown)}")
        _set_threads(threads)
        device = resolve_device(device)
        self.options = LoadOptions(device=device, dtype=resolve_dtype(dtype, device), offload=offload,
                                   attention_slicing=attention_slicing, vae_slicing=vae_slicing, vae_tiling=vae_tiling,
                                   safety_checker=safety_checker, ip_adapter=ip_adapter, dtype_auto=dtype == "auto")
        check_options(self.options)
        self.model, self.quiet = model, quiet
        _show_progress(not quiet)
        self.defaults = Defaults(model=model, **defaults)
        self.family = load_family(model, self.options)
        for view in self.family.views():  # one kind of progress: sdbatch's log lines, not diffusers' tqdm bars too
            view.set_progress_bar_config(disable=True)
        self.family.adapters = self.store = AdapterStore(ip_adapter)  # each adapter read once, checked once
        self._checked: set[str] = set()
        self.conditioner = Conditioner(self.family)
        self.lora: tuple[str, float] | None = None
        self._calls = 0
        self._scratch = tempfile.TemporaryDirectory(prefix="sdbatch_generator_")

    # --- the three modes -------------------------------------------------------------------------

    def generate(self, prompt: str, num_images: int = 1, seed: int | None = None, out=None, **params) -> list:
        """Text to image."""
        return self._run({"prompt": prompt, "num_images": num_images, "seed": seed, **params}, out)

    def img2img(self, prompt: str, init_image, strength: float | None = None, num_images: int = 1,
                seed: int | None = None, out=None, **params) -> list:
        """An init image (path or PIL image) redrawn toward the prompt; `strength` as in a manifest [0.6]."""
        return self._run({"prompt": prompt, "init_image": self._file(init_image), "strength": strength,
                          "num_images": num_images, "seed": seed, **params}, out)

    def image_prompt(self, image, method: str | None = None, prompt: str | None = None, num_images: int = 1,
                     seed: int | None = None, out=None, **params) -> list:
        """An image as the prompt (path or PIL image): method `ip_adapter` [default] or `clip_embed`."""
        return self._run({"prompt_image": self._file(image), "image_prompt_method": method, "prompt": prompt,
                          "num_images": num_images, "seed": seed, **params}, out)

    # --- adapters --------------------------------------------------------------------------------

    def load_lora(self, reference: str, scale: float = 1.0) -> None:
        """Apply a LoRA (file, folder or hub id) to the calls that follow, until `unload`.

        The LoRA is read and checked against the model now: a missing or unsuitable one raises here.
        """
        self._job({"id": "load_lora", "prompt": "load_lora", "lora": str(reference), "lora_scale": scale})
        self.lora = (str(reference), float(scale))

    def unload(self) -> None:
        """Back to the base model (the LoRA stays loaded, disabled, should it come back)."""
        self.lora = None

    def close(self) -> None:
        """Free the model (GPU memory included)."""
        if self.family is not None:
            self.conditioner.clear()
            self.family.unload()
            self.family = self.conditioner = None
        self._scratch.cleanup()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- one call = one validated manifest row ----------------------------------------------------

    def _file(self, image) -> str:
        if isinstance(image, (str, Path)):
            return str(Path(image).expanduser().resolve())
        self._calls += 1
        path = Path(self._scratch.name) / f"image-{self._calls}.png"
        image.convert("RGB").save(path)  # lossless: the pixels the row reads are the caller's
        return str(path)

    def _run(self, params: dict, out) -> list:
        from .generate import generate_batch
        from .plan import Batch
        from .runner import pixel_salt

        if self.family is None:
            raise RuntimeError("this Generator was closed")
        raw = {k: v for k, v in params.items() if v is not None}
        raw.setdefault("id", f"gen{self._calls}")
        if self.lora is not None:
            raw.setdefault("lora", self.lora[0])
            raw.setdefault("lora_scale", self.lora[1])
        job = self._job(raw)
        tasks = job.images(pixel_salt(self.options, self.family.spec) + self.store.salt(job))
        output = generate_batch(self.family, self.conditioner, Batch(0, tuple(tasks)))
        if output.errors:
            raise RuntimeError("; ".join(f"image {i}: {e}" for i, e in sorted(output.errors.items())))
        if out is not None:
            self._write(out, tasks, output.images)
        self._calls += 1
        if not self.quiet:  # sdbatch's one kind of progress: a line per call (diffusers' own bars stay off)
            log.info("%s: %d image(s) in %.1fs", job.mode, len(tasks), output.seconds)
        return list(output.images)

    def _job(self, raw: dict):
        """One call's arguments as a validated manifest row; a new adapter is read and checked against the model
        now, as a run checks its rows before it starts."""
        from .adapters import check_adapters
        from .manifest import ImageChecker, validate_row

        job, errors = validate_row(1, raw, self.defaults, 0, ImageChecker(Path.cwd(), "the current directory"))
        if errors:
            raise ManifestError("arguments", [_IndexedError(e.line, e.column, e.value, e.allowed, "call") for e in errors])
        needs = {f"lora:{job.lora}" if job.lora else None, job.image_prompt_method} - {None, "clip_embed"}
        if needs - self._checked:
            self.store.merge(check_adapters([job], self.options))
            self._checked |= needs
        return job

    def _write(self, out, tasks, images) -> None:
        """Files and a metadata.jsonl line per image, as a run writes them."""
        from .writer import image_metadata, infotext, save_image

        folder = Path(out) / "images"
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for task, image in zip(tasks, images):
            name = f"{task.stem}.png"
            save_image(image, folder / name, "png", infotext(task, self.model), task.key)
            lines.append(json.dumps(image_metadata(task, self.model, name), ensure_ascii=False) + "\n")
        with open(folder / "metadata.jsonl", "a", encoding="utf-8") as f:
            f.writelines(lines)
