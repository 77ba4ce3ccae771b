"""`sdbatch prepare-dataset SRC DST`: images (+ captions) -> `0000.png` + `0000.txt` pairs and `metadata.jsonl`.

SRC may be a folder of images with optional same-name `.txt` captions, an imagefolder with
a `metadata.jsonl` (`file_name` + `text`, `caption` or `prompt`), or an sdbatch output folder
(its `images/metadata.jsonl` prompts become the captions). The same SRC gives the same DST,
byte for byte; a rerun adds only images whose pixels DST does not hold yet.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import BatchError
from ..writer import write_atomic, write_text_atomic

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
CAPTION_COLUMNS = ("text", "caption", "prompt")  # HF imagefolder's usual name first; sdbatch writes `prompt`
CROPS = ("center", "random", "none")
SETTINGS_FILE = "prepare.json"  # the options DST was made with: a rerun must use the same
SUMMARY_FILE = "summary.json"


class DatasetError(BatchError):
    """A source or training folder that cannot be used as it is."""


@dataclass(frozen=True)
class PrepareOptions:
    """How every image is made square (or bucketed) and which ones are left out."""

    size: int = 512  # side of the square output, or the area (size x size) buckets keep
    crop: str = "center"  # center | random (seeded per image) | none (whole image, longer side = size)
    buckets: bool = False  # aspect-ratio buckets of about size x size pixels instead of squares
    min_size: int = 0  # skip images whose shorter side is smaller (they would be upscaled)
    seed: int = 0  # random crops
    caption: str = ""  # the caption of images that have none

    def check(self) -> None:
        if self.size < 8 or self.size % 8:
            raise DatasetError(f"--size must be a multiple of 8 (the VAE downsamples by 8) but is {self.size}")
        if self.crop not in CROPS:
            raise DatasetError(f"--crop must be one of {', '.join(CROPS)} but is {self.crop!r}")
        if self.buckets and self.crop == "none":
            raise DatasetError("--buckets crops each image to its nearest bucket: use --crop center or random")
        if self.min_size < 0:
            raise DatasetError(f"--min-size must be >= 0 but is {self.min_size}")

    def settings(self) -> dict:
        """What changes the output pixels (the caption of uncaptioned images does not)."""
        return {k: v for k, v in asdict(self).items() if k != "caption"}


@dataclass
class PrepareSummary:
    """What a run did: images in DST, added now, skipped by reason (with the files), captions missing."""

    kept: int = 0
    added: int = 0
    already: int = 0  # in DST from an earlier run
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> source files
    captions_missing: int = 0
    buckets: dict[str, int] = field(default_factory=dict)  # "WxH" -> images, over the whole of DST

    def skip(self, reason: str, name: str) -> None:
        self.skipped.setdefault(reason, []).append(name)

    @property
    def skipped_count(self) -> int:
        return sum(len(files) for files in self.skipped.values())

    def to_json(self) -> dict:
        return {"kept": self.kept, "added": self.added, "already": self.already,
                "skipped": {reason: len(files) for reason, files in sorted(self.skipped.items())},
                "skipped_files": {reason: files for reason, files in sorted(self.skipped.items())},
                "captions_missing": self.captions_missing, "buckets": dict(sorted(self.buckets.items()))}


@dataclass(frozen=True)
class Source:
    """One candidate image and where its caption comes from."""

    path: Path
    name: str  # relative to the image folder, with forward slashes: stable across machines
    metadata_caption: str | None  # from the folder's metadata.jsonl; a same-name .txt wins over it

    def caption(self) -> str | None:
        """The caption, or None where the image has none; raises UnicodeDecodeError for a non-UTF-8 .txt."""
        text_file = self.path.with_suffix(".txt")
        if text_file.is_file():
            return text_file.read_text(encoding="utf-8").strip()
        return self.metadata_caption


# --- finding the sources ---------------------------------------------------------------------------

def find_sources(src: Path, dst: Path | None = None) -> list[Source]:
    """Every image under SRC, sorted by relative path, with its caption."""
    src = Path(src)
    if not src.is_dir():
        raise DatasetError(f"{src}: not a folder of images")
    folder = src / "images" if _is_sdbatch_output(src) else src
    metadata = _metadata_captions(folder)
    skip = Path(dst).resolve() if dst is not None else None
    sources = []
    for path in sorted(folder.rglob("*"), key=lambda p: p.relative_to(folder).as_posix()):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue  # hidden files, and the temp files of an unfinished write
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if skip is not None and (skip == path.resolve().parent or skip in path.resolve().parents):
            continue  # DST inside SRC: never feed our own output back in
        name = relative.as_posix()
        sources.append(Source(path, name, metadata.get(name)))
    return sources


def _is_sdbatch_output(folder: Path) -> bool:
    return (folder / "images" / "metadata.jsonl").is_file() and (
        (folder / "checkpoint.sqlite").exists() or (folder / "run.json").exists())


def _metadata_captions(folder: Path) -> dict[str, str]:
    """{file_name: caption} from an imagefolder's metadata.jsonl (first caption column present)."""
    path = folder / "metadata.jsonl"
    if not path.is_file():
        return {}
    captions = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}, line {number}: not JSON ({e.msg})") from e
        column = next((c for c in CAPTION_COLUMNS if isinstance(entry.get(c), str)), None)
        if isinstance(entry.get("file_name"), str) and column:
            captions[entry["file_name"]] = entry[column]
    return captions


# --- one image -------------------------------------------------------------------------------------

def read_image(path: Path):
    """The image upright (EXIF orientation applied) in RGB; transparency over white."""
    from PIL import Image, ImageOps

    with Image.open(path) as picture:
        picture.load()  # decode now: a truncated file fails here, not later
        upright = ImageOps.exif_transpose(picture)
    if upright.mode in ("RGBA", "LA") or (upright.mode == "P" and "transparency" in upright.info):
        rgba = upright.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return upright.convert("RGB")


def pixel_hash(image) -> str:
    """Exact duplicates are the same pixels, whatever the file format or metadata around them."""
    digest = hashlib.sha256(f"{image.width}x{image.height}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def buckets_for(size: int) -> list[tuple[int, int]]:
    """(width, height) pairs of about size x size pixels, multiples of a step, aspect 1:2 to 2:1 (kohya's idea)."""
    step = max(8, size // 8 // 8 * 8)
    area = size * size
    found = set()
    width = size // 2 // step * step or step
    while width <= size * 2:
        height = min(size * 2, area // width // step * step)
        if height >= size // 2 and height > 0:
            found.add((width, height))
            found.add((height, width))
        width += step
    return sorted(found)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def fit(image, target: tuple[int, int] | None, options: PrepareOptions, key: str):
    """Resize and crop to `target` (crop center/random), or, with crop none, scale the longer side to size."""
    from PIL import Image

    w, h = image.size
    if target is None:  # crop none: the whole picture, each side rounded to a multiple of 8
        scale = options.size / max(w, h)
        size = (max(8, round(w * scale / 8) * 8), max(8, round(h * scale / 8) * 8))
        return image.resize(size, Image.LANCZOS)
    tw, th = target
    scale = max(tw / w, th / h)
    resized = image.resize((max(tw, math.ceil(w * scale)), max(th, math.ceil(h * scale))), Image.LANCZOS)
    spare_x, spare_y = resized.width - tw, resized.height - th
    if options.crop == "random":
        rng = random.Random(f"{options.seed}/{key}")  # per image: the same crop whatever else SRC holds
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    else:
        left, top = spare_x // 2, spare_y // 2
    return resized.crop((left, top, left + tw, top + th))


# --- the whole folder ------------------------------------------------------------------------------

def prepare_dataset(src: Path, dst: Path, options: PrepareOptions, quiet: bool = True) -> PrepareSummary:
    """Turn SRC into a training folder at DST (or add SRC's new images to it); a progress bar unless quiet."""
    from ..progress import Progress

    options.check()
    src, dst = Path(src), Path(dst)
    if dst.exists() and not dst.is_dir():
        raise DatasetError(f"{dst}: exists and is not a folder")
    sources = find_sources(src, dst)
    if not sources:
        raise DatasetError(f"{src}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    dst.mkdir(parents=True, exist_ok=True)
    entries = _existing(dst, options)
    earlier = {entry["source_sha256"] for entry in entries}
    added: set[str] = set()
    summary = PrepareSummary(already=len(entries))
    buckets = buckets_for(options.size) if options.buckets else None
    # New pairs are numbered after the highest number in DST, so a pair deleted by hand never gets overwritten.
    numbers = [int(Path(e["file_name"]).stem) for e in entries if Path(e["file_name"]).stem.isdigit()]
    numbers += [int(p.stem) for p in dst.glob("*.png") if p.stem.isdigit()]
    next_number = max(numbers, default=-1) + 1
    with Progress(len(sources), quiet=quiet) as progress, open(dst / "metadata.jsonl", "ab") as metadata:
        progress.set_group(f"prepare-dataset {dst.name}")
        for source in sources:
            entry = _prepare_one(source, dst, options, buckets, earlier, added, next_number, summary)
            if entry is not None:
                next_number += 1
                added.add(entry["source_sha256"])
                entries.append(entry)
                metadata.write((json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8"))
                metadata.flush()  # the pair is on disk already: a crash after this line loses nothing
            progress.advance(1)
    summary.kept = len(entries)
    summary.added = summary.kept - summary.already
    summary.captions_missing = sum(1 for entry in entries if entry.get("caption_missing"))
    for entry in entries:
        bucket = f"{entry['width']}x{entry['height']}"
        summary.buckets[bucket] = summary.buckets.get(bucket, 0) + 1
    write_text_atomic(dst / SUMMARY_FILE, json.dumps(summary.to_json(), indent=2) + "\n")
    return summary


def _existing(dst: Path, options: PrepareOptions) -> list[dict]:
    """Entries an earlier run wrote, after checking it used the same settings."""
    settings_path = dst / SETTINGS_FILE
    metadata_path = dst / "metadata.jsonl"
    if settings_path.is_file():
        earlier = json.loads(settings_path.read_text(encoding="utf-8"))
        if earlier != options.settings():
            changed = ", ".join(f"{k}: {earlier.get(k)!r} then, {v!r} now" for k, v in options.settings().items()
                                if earlier.get(k) != v)
            raise DatasetError(f"{dst} was prepared with other settings ({changed}): use the same ones to add "
                               "images, or another DST")
    elif metadata_path.is_file() or any(dst.iterdir()):
        raise DatasetError(f"{dst}: not empty and not made by prepare-dataset (no {SETTINGS_FILE}): choose another DST")
    else:
        write_text_atomic(settings_path, json.dumps(options.settings(), indent=2) + "\n")
    entries = []
    if metadata_path.is_file():
        lines = metadata_path.read_bytes().split(b"\n")
        for line in lines:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # the torn last line of a killed run: its image is made again
            if (dst / entry["file_name"]).is_file():
                entries.append(entry)
        # rewrite without torn lines, so appending continues from a clean end
        write_atomic(metadata_path, lambda f: f.write(b"".join(
            (json.dumps(e, ensure_ascii=False) + "\n").encode("utf-8") for e in entries)))
    return entries


def _prepare_one(source: Source, dst: Path, options: PrepareOptions, buckets, earlier: set, added: set,
                 index: int, summary: PrepareSummary) -> dict | None:
    """Write one pair and return its metadata entry; None where the image is skipped or already in DST."""
    try:
        image = read_image(source.path)
    except Exception as e:  # noqa: BLE001 -- PIL raises many types (even SyntaxError) for damaged files
        log.warning("skipped %s: unreadable (%s: %s)", source.name, type(e).__name__, e)
        summary.skip("unreadable", source.name)
        return None
    digest = pixel_hash(image)
    if digest in earlier:
        return None  # prepared by an earlier run
    if digest in added:
        summary.skip("duplicate", source.name)
        return None
    if min(image.size) < options.min_size:
        summary.skip("too_small", source.name)
        return None
    try:
        caption = source.caption()
    except UnicodeDecodeError:
        log.warning("skipped %s: its caption file is not UTF-8 text", source.name)
        summary.skip("caption_unreadable", source.name)
        return None
    target = None
    if buckets is not None:
        target = nearest_bucket(*image.size, buckets)
    elif options.crop != "none":
        target = (options.size, options.size)
    result = fit(image, target, options, digest)
    stem = f"{index:04d}"
    write_atomic(dst / f"{stem}.png", lambda f: result.save(f, format="PNG"))
    write_text_atomic(dst / f"{stem}.txt", (caption if caption is not None else options.caption) + "\n")
    entry = {"file_name": f"{stem}.png", "text": caption if caption is not None else options.caption,
             "width": result.width, "height": result.height, "source": source.name, "source_sha256": digest}
    if buckets is not None:
        entry["bucket"] = f"{result.width}x{result.height}"
    if caption is None:
        entry["caption_missing"] = True
    return entry
