"""A training folder, read and checked before any model loads; its fingerprint; the order of its batches.

A training folder is what `prepare-dataset` writes (`metadata.jsonl` with `file_name` and
`text`), or the seed layout alone: `0000.png` + `0000.txt` pairs. Every problem is listed
at once, as the manifest's are.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from .prepare import CAPTION_COLUMNS, IMAGE_SUFFIXES, DatasetError


@dataclass(frozen=True)
class Example:
    """One training image and its caption; width and height as stored."""

    image: Path
    caption: str
    width: int
    height: int


def read_dataset(folder: Path, resolution: int | None = None) -> list[Example]:
    """Every example of a training folder; raises DatasetError naming every bad file.

    With `resolution`, images are square-cropped to it when loaded, so only it must be a
    multiple of 8; without, every image's own sides must be.
    """
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such training folder (make one with `sdbatch prepare-dataset SRC {folder}`)")
    if resolution is not None and (resolution < 8 or resolution % 8):
        raise DatasetError(f"--resolution must be a multiple of 8 but is {resolution}")
    problems: list[str] = []
    pairs = _pairs_from_metadata(folder, problems) if (folder / "metadata.jsonl").is_file() else _pairs(folder, problems)
    examples = []
    for image_path, caption in pairs:
        try:
            with Image.open(image_path) as picture:
                width, height = picture.size
        except Exception as e:  # noqa: BLE001 -- PIL raises many types for damaged files
            problems.append(f"{image_path.name}: unreadable image ({type(e).__name__}: {e})")
            continue
        if resolution is None and (width % 8 or height % 8):
            problems.append(f"{image_path.name}: {width}x{height} is not a multiple of 8 on each side "
                            "(prepare it with `sdbatch prepare-dataset`, or give --resolution)")
            continue
        if resolution is not None:
            width = height = resolution
        examples.append(Example(image_path, caption, width, height))
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise DatasetError(f"{folder}: {len(problems)} problem{'s' * (len(problems) > 1)}\n{shown}{more}")
    if not examples:
        raise DatasetError(f"{folder}: no training images")
    return examples


def _pairs(folder: Path, problems: list[str]) -> list[tuple[Path, str]]:
    """The seed layout: images with same-name .txt captions (a missing caption is an empty one)."""
    pairs = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")):
        caption = _read_caption(path.with_suffix(".txt"), problems)
        if caption is not None:
            pairs.append((path, caption))
    return pairs


def _read_caption(path: Path, problems: list[str]) -> str | None:
    if not path.is_file():
        return ""
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        problems.append(f"{path.name}: caption is not UTF-8 text")
        return None


def _pairs_from_metadata(folder: Path, problems: list[str]) -> list[tuple[Path, str]]:
    pairs = []
    for number, line in enumerate((folder / "metadata.jsonl").read_bytes().split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            problems.append(f"metadata.jsonl line {number}: not JSON")
            continue
        name = entry.get("file_name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not (folder / name).is_file():
            problems.append(f"metadata.jsonl line {number}: file_name {name!r} is not a file in the folder")
            continue
        caption = next((entry[c] for c in CAPTION_COLUMNS if isinstance(entry.get(c), str)), None)
        if caption is None:  # an imagefolder without a caption column: the same-name .txt, or ""
            caption = _read_caption((folder / name).with_suffix(".txt"), problems)
            if caption is None:
                continue
        pairs.append((folder / name, caption.strip()))
    return pairs


@dataclass(frozen=True)
class Fingerprint:
    """What a resumed run must find as it was: the images (names in order, bytes, pixels) and the captions.

    Cheap: files are only stat'ed. An edit that keeps an image's name and its exact size in bytes
    goes unseen; a renamed, added, removed, reordered, resized or re-encoded image does not.
    """

    images: int
    names: str  # digests: of the file names in order (the batches are drawn by index) ...
    sizes: str  # ... of their sizes in bytes and in pixels ...
    captions: str  # ... and of the captions

    def changes_since(self, earlier: Fingerprint) -> list[str]:
        """What differs from an earlier fingerprint, in words; empty when nothing does."""
        changes = []
        if earlier.images != self.images:
            changes.append(f"{earlier.images} images then, {self.images} now")
        elif earlier.names != self.names:
            changes.append("other file names, or another order")
        elif earlier.sizes != self.sizes:
            changes.append("an image was replaced or edited (file sizes differ)")
        if earlier.captions != self.captions and earlier.images == self.images:
            changes.append("captions differ")
        return changes


def fingerprint(folder: Path, examples: list[Example]) -> Fingerprint:
    """The fingerprint of a training folder's examples, as `read_dataset` returned them."""
    folder = Path(folder)

    def digest(parts) -> str:
        return hashlib.sha256(json.dumps(list(parts), ensure_ascii=False).encode()).hexdigest()[:16]

    names = [e.image.relative_to(folder).as_posix() if e.image.is_relative_to(folder) else e.image.name
             for e in examples]
    return Fingerprint(len(examples), digest(names),
                       digest((e.image.stat().st_size, e.width, e.height) for e in examples),
                       digest(e.caption for e in examples))


class BatchOrder:
    """Which examples make micro-batch m: a pure function of (seed, m), so a resumed run sees the same.

    Examples are grouped by size (buckets); each epoch shuffles every bucket with a seed of
    its own, cuts it into batches (the last one may be short) and shuffles the batches.
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int):
        self.batch_size, self.seed = batch_size, seed
        buckets: dict[tuple[int, int], list[int]] = {}
        for index, example in enumerate(examples):
            buckets.setdefault((example.width, example.height), []).append(index)
        self.buckets = [buckets[key] for key in sorted(buckets)]
        self.per_epoch = sum(-(-len(indices) // batch_size) for indices in self.buckets)
        self._epoch, self._batches = -1, []

    def batch(self, micro_batch: int) -> list[int]:
        epoch, position = divmod(micro_batch, self.per_epoch)
        if epoch != self._epoch:
            rng = random.Random(f"{self.seed}/epoch-{epoch}")
            batches = []
            for indices in self.buckets:
                shuffled = list(indices)
                rng.shuffle(shuffled)
                batches += [shuffled[i : i + self.batch_size] for i in range(0, len(shuffled), self.batch_size)]
            rng.shuffle(batches)
            self._epoch, self._batches = epoch, batches
        return self._batches[position]
