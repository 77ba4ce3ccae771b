"""Write images and the output folder's files atomically; encode images in a small thread pool."""
from __future__ import annotations

import functools
import json
import os
import re
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from .families import BY_NAME
from .job import ImageTask
from .schedulers import SCHEDULERS

TEMP_MARK = ".tmp-"
FORMATS = {"png": "PNG", "webp": "WEBP", "jpg": "JPEG"}
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029]")  # keep \t and \n; the rest would break readers
EXIF_TEXT_CHARS = 30_000  # JPEG's EXIF block holds 64 KB: the UTF-16 UserComment must fit


def clean_text(text: str) -> str:
    """Text safe for a PNG text chunk: no NUL or control characters, newlines normalised."""
    return _CONTROL.sub(" ", text.replace("\r\n", "\n").replace("\r", "\n"))


@functools.lru_cache(maxsize=None)  # a checkpoint is read once a process, not once an image
def model_hash(model: str) -> str | None:
    """AUTOMATIC1111's "Model hash" of a single-file model (the first 10 hex digits of its sha256),
    by which model sites and prompt readers link an image to its checkpoint; None for folders and ids."""
    from .single_file import model_hash as file_hash

    path = Path(model).expanduser()
    return file_hash(path) if path.is_file() else None


def infotext(task: ImageTask, model: str) -> str:
    """The AUTOMATIC1111 `parameters` layout, which existing tools parse."""
    job = task.job
    lines = [clean_text(job.prompt) if job.image_prompt_method != "clip_embed" else ""]
    if job.negative_prompt:
        lines.append(f"Negative prompt: {clean_text(job.negative_prompt)}")
    spec = BY_NAME[job.family]
    guidance = [f"CFG scale: {job.cfg:g}"]
    if spec.guidance_label != "CFG scale":  # Forge writes Flux-dev's embedded guidance apart from CFG
        guidance = [f"CFG scale: {job.true_cfg or 1:g}", f"{spec.guidance_label}: {job.cfg:g}"]
    fields = [
        f"Steps: {job.steps}",
        f"Sampler: {SCHEDULERS[job.scheduler].label}",
        *guidance,
        f"Seed: {task.seed}",
        f"Size: {job.width}x{job.height}",
        *([f"Model hash: {digest}"] if (digest := model_hash(model)) else []),
        f"Model: {clean_text(model).replace(',', ' ')}",
    ]
    if job.strength is not None:
        fields.append(f"Denoising strength: {job.strength:g}")
    if job.image_prompt_method:
        fields.append(f"Image prompt: {job.image_prompt_method}")
    if job.ip_scale is not None:
        fields.append(f"IP scale: {job.ip_scale:g}")
    if job.lora:
        fields.append(f"LoRA: {clean_text(Path(job.lora).stem).replace(',', ' ')}:{job.lora_scale:g}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def image_metadata(task: ImageTask, model: str, file_name: str) -> dict:
    """One metadata.jsonl line: file name, every parameter, then the manifest's extra columns."""
    job = task.job
    meta = {
        "file_name": file_name,
        "id": job.id,
        "k": task.k,
        "mode": job.mode,
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "seed": task.seed,
        "steps": job.steps,
        "cfg": job.cfg,
        "width": job.width,
        "height": job.height,
        "scheduler": job.scheduler,
        "model": model,
        "family": job.family,
        **job.family_params(),
    }
    if job.strength is not None:
        meta.update(strength=job.strength, init_image=job.init_image)
    if job.prompt_image is not None:
        meta.update(prompt_image=job.prompt_image, image_prompt_method=job.image_prompt_method)
    if job.ip_scale is not None:
        meta["ip_scale"] = job.ip_scale
    if job.lora is not None:
        meta.update(lora=job.lora, lora_scale=job.lora_scale)
    for column, value in job.extra:
        meta[column] = value
    return meta


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write) -> int:
    """Call `write(file)` on a temp file beside `path`, fsync it, then rename over `path`.

    A reader (or a rerun after a crash) sees the old file or the whole new one, never half.
    """
    temp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    try:
        with open(temp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return size


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def remove_temp_files(folder: Path) -> int:
    """Delete temp files a killed run left behind; returns how many."""
    removed = 0
    if folder.is_dir():
        for entry in os.scandir(folder):
            if entry.name.startswith(".") and TEMP_MARK in entry.name:
                os.unlink(entry.path)
                removed += 1
    return removed


KEY_CHUNK = "sdbatch-key"  # PNG text chunk: lets a rerun adopt a file written just before a kill


def save_image(image, path: Path, fmt: str, parameters: str, key: str | None = None) -> int:
    """Encode one image with its parameters embedded, atomically."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    kind = FORMATS[fmt]
    options: dict = {}
    if kind == "PNG":
        info = PngInfo()
        info.add_text("parameters", parameters)  # PIL writes iTXt when the text is not Latin-1
        if key:
            info.add_text(KEY_CHUNK, key)
        options.update(pnginfo=info, compress_level=4)  # level 4: most of the size, a third of the time of 9
    else:
        exif = Image.Exif()
        # EXIF UserComment, as AUTOMATIC1111 does for JPEG and WebP.
        if len(parameters) > EXIF_TEXT_CHARS:  # keep the parameters line, shorten the prompt
            tail = parameters[parameters.rfind("\n"):]
            parameters = parameters[: EXIF_TEXT_CHARS - len(tail) - 3] + "..." + tail
        exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + parameters.encode("utf-16-be")
        options.update(exif=exif.tobytes(), quality=95)
    return write_atomic(path, lambda f: image.save(f, format=kind, **options))


@dataclass(frozen=True)
class Written:
    """The writer pool's answer for one image."""

    task: ImageTask
    file: str | None
    meta: dict | None  # the metadata.jsonl line
    error: str | None
    seconds: float
    context: object  # whatever the submitter attached (group, batch timings)


class ImageWriter:
    """Encodes and writes images on worker threads so the next batch can start at once."""

    def __init__(self, folder: Path, fmt: str, model: str, threads: int = 2, max_pending: int = 64):
        self.folder, self.fmt, self.model = folder, fmt, model
        self.max_pending = max_pending  # bounds the decoded images held in memory
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sdbatch-writer")
        self.pending: list[Future] = []
        self.done: list[Future] = []

    def submit(self, task: ImageTask, image, context=None, notes: dict | None = None) -> None:
        if len(self.pending) >= self.max_pending:
            wait(self.pending, return_when=FIRST_COMPLETED)
            self.done += [f for f in self.pending if f.done()]
            self.pending = [f for f in self.pending if not f.done()]
        self.pending.append(self.pool.submit(self._write, task, image, context, notes))

    def _write(self, task: ImageTask, image, context, notes: dict | None) -> Written:
        started = time.perf_counter()
        name = f"{task.stem}.{self.fmt}"
        model = task.job.model or self.model
        try:
            save_image(image, self.folder / name, self.fmt, infotext(task, model), task.key)
        except Exception as e:  # a full disk, a permission, an encoder refusing: this image fails, the run goes on
            return Written(task, None, None, f"write failed: {type(e).__name__}: {e}", time.perf_counter() - started, context)
        meta = image_metadata(task, model, name)
        meta.update(notes or {})
        return Written(task, name, meta, None, time.perf_counter() - started, context)

    def finished(self, block: bool = False) -> list[Written]:
        """Results of writes that have completed (all of them, waiting, when `block`)."""
        if block:
            wait(self.pending)
        done = self.done + [f for f in self.pending if f.done()]
        self.pending = [f for f in self.pending if not f.done()]
        self.done = []
        return [f.result() for f in done]

    def close(self) -> list[Written]:
        results = self.finished(block=True)
        self.pool.shutdown(wait=True)
        return results


def read_written(path: Path):
    """An image of the output folder as RGB, or None where it is missing or does not decode
    (the grid and the CLIP score each say what they do without it)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def adopt_written(tasks: list[ImageTask], folder: Path, existing: set[str], model: str, fmt: str = "png") -> list:
    """Images a killed run finished writing but did not record: their PNG carries the same key.

    Only files in `existing` (the folder's listing) are opened, so a fresh million-row run
    costs no stat calls; reading a PNG's text chunks does not decode its pixels. Files whose
    key matches are adopted, anything else is made again.
    """
    from PIL import Image

    from .checkpoint import Outcome

    adopted = []
    if fmt != "png":  # only PNGs carry the key
        return adopted
    for task in tasks:
        if f"{task.stem}.png" not in existing:
            continue
        path = folder / f"{task.stem}.png"
        try:
            with Image.open(path) as image:
                key = image.text.get(KEY_CHUNK)
        except Exception:  # a damaged file is simply made again
            continue
        if key == task.key:
            meta = image_metadata(task, task.job.model or model, path.name)
            adopted.append(Outcome(task, ok=True, file=path.name, meta=meta))
    return adopted


def write_metadata(out: Path, lines) -> None:
    """images/metadata.jsonl from the checkpoint's done images: each image exactly once."""

    def write(f):
        for line in lines:
            f.write(line.encode("utf-8") + b"\n")

    write_atomic(out / "images" / "metadata.jsonl", write)


def write_failed(out: Path, failed: list[tuple[str, str, str, int]]) -> int:
    """failed.jsonl: one manifest row per failed job, with its error, ready to run again."""
    seen, lines = set(), []
    for job_id, row, error, attempts in failed:
        if job_id in seen:
            continue
        seen.add(job_id)
        record = json.loads(row) if row else {}
        record.setdefault("id", job_id)
        record["error"] = error
        record["attempts"] = attempts
        lines.append(json.dumps(record, ensure_ascii=False))
    path = out / "failed.jsonl"
    if lines or path.exists():
        write_text_atomic(path, "".join(line + "\n" for line in lines))
    return len(lines)
