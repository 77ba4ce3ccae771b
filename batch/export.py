"""Export an output folder as training shards: webdataset tars, parquet or an imagefolder.

Filtered (`clip_score`), deduplicated (perceptual hashes), atomic per shard and incremental:
DIR/export.json is the commit record, rewritten after every shard, so a kill leaves complete
shards plus at most a temp file or an unrecorded shard, both removed by the next export, which
then adds shards for the images not yet exported.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BatchError, OutputError
from .lock import LOCK_NAME, FolderLock
from .writer import TEMP_MARK, remove_temp_files, write_atomic, write_text_atomic

log = logging.getLogger(__name__)

FORMATS = ("webdataset", "parquet", "imagefolder")
STATE_FILE = "export.json"
HASH_CACHE = ".sdbatch-phash.sqlite"  # hidden: datasets' loaders and the Hub upload skip it
SPLIT = "train"  # parquet shards live in DIR/train/: datasets reads that folder name as the split
PHASH_BITS = 64  # imagehash.phash with hash_size 8
PARQUET_ROW_GROUP = 100  # images per row group: the Hub's advice for image datasets (bounded memory per read)
CARD_MARK = "<!-- written by sdbatch export -->"

# Columns sdbatch writes (batch/writer.py's image_metadata, the generator's notes, `sdbatch score`), typed up
# front: a column that is empty in the first export (no negative prompts yet) keeps its type for the next.
_STRING = ("file_name", "id", "mode", "prompt", "negative_prompt", "scheduler", "model", "family", "init_image",
           "prompt_image", "image_prompt_method", "lora", "prompt_2", "negative_prompt_2")
_INT = ("k", "seed", "steps", "width", "height", "max_sequence_length")
_FLOAT = ("cfg", "strength", "ip_scale", "lora_scale", "true_cfg", "clip_score")
_BOOL = ("nsfw", "vae_fp32_redecode")
_HF_DTYPES = {"string": "string", "int64": "int64", "double": "float64", "bool": "bool"}


@dataclass(frozen=True)
class ExportOptions:
    """What `sdbatch export` takes; format and the filters are recorded in export.json and must not change."""

    format: str
    shard_size: int = 1000  # images per shard: 1000 PNGs of 512 px are about 400 MB, webdataset's usual size
    min_clip_score: float | None = None  # drop images whose clip_score is below this
    dedup: int | None = None  # drop an image whose pHash is within this Hamming distance of a kept one
    fresh: bool = False  # remove an earlier export in DIR first
    quiet: bool = False
    workers: int = 4  # threads hashing images (PIL decodes outside the GIL)

    def recorded(self) -> dict:
        return {"shard_size": self.shard_size, "min_clip_score": self.min_clip_score, "dedup": self.dedup}


@dataclass(frozen=True)
class SourceImage:
    """One metadata.jsonl line of OUT and the image file it names."""

    file_name: str
    path: Path
    meta: dict


@dataclass
class ExportResult:
    to: Path
    added: int  # images exported by this call
    kept: int  # images in the export, earlier calls included
    new_shards: list[str]
    shards: int
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> images of OUT not exported


def check_options(options: ExportOptions) -> None:
    if options.format not in FORMATS:
        raise BatchError(f"--format must be one of {', '.join(FORMATS)}, got {options.format!r}")
    if options.shard_size < 1:
        raise BatchError(f"--shard-size must be >= 1, got {options.shard_size}")
    if options.dedup is not None and not 0 <= options.dedup <= PHASH_BITS:
        raise BatchError(f"--dedup is a Hamming distance between 64-bit perceptual hashes: 0 to 64 "
                         f"(4 to 8 is usual), got {options.dedup}")


def export(out: Path, to: Path, options: ExportOptions) -> ExportResult:
    """Add OUT's images that DIR does not hold yet as new shards; returns what was done."""
    out, to = Path(out), Path(to)
    # 1. Check inputs, before anything is written
    check_options(options)
    images = read_source(out)
    check_scores(out, images, options)
    if to.exists() and not to.is_dir():
        raise BatchError(f"--to {to} is a file: give a folder")
    if to.resolve() in (out.resolve(), (out / "images").resolve()):
        raise BatchError(f"--to {to} is the output folder itself: give another folder")
    to.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        try:  # two exports into one DIR would write the same shard names
            stack.enter_context(FolderLock(to))
        except OutputError:
            raise BatchError(f"{to} is in use by another sdbatch export: wait for it to finish, or choose another "
                             "--to") from None
        return _export_locked(images, out, to, options)


def _export_locked(images: list[SourceImage], out: Path, to: Path, options: ExportOptions) -> ExportResult:
    from .progress import Progress

    state = prepare_destination(out, to, options)
    # 2. Select: what is new, and what the filters drop
    keep, dropped = select(images, state, options, to)
    # 3. Shards, each committed to export.json once complete
    writer = _SHARD_WRITERS[options.format](to, state)
    writer.check(keep)
    history = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "added": 0, "shards": []}
    state.update(dropped={reason: len(files) for reason, files in dropped.items()}, dropped_files=dropped)
    state.setdefault("exports", []).append(history)
    _commit(to, state)  # the drop counts, also when nothing is new
    new_shards = []
    with Progress(len(keep), options.quiet) as progress:
        for start in range(0, len(keep), options.shard_size):
            chunk = keep[start:start + options.shard_size]
            name = writer.name(len(state["shards"]))
            progress.set_group(name)
            entry = writer.write(name, chunk, progress)
            state["shards"].append({"name": name, "count": len(chunk), **entry})
            state["files"][name] = [image.file_name for image in chunk]
            state["kept"] += len(chunk)
            history["added"] += len(chunk)
            history["shards"].append(name)
            _commit(to, state)
            new_shards.append(name)
    log.info("exported %d images in %d new shards to %s", len(keep), len(new_shards), to)
    return ExportResult(to, len(keep), state["kept"], new_shards, len(state["shards"]), state["dropped"])


# --- the source: OUT/images/metadata.jsonl ------------------------------------------------------------


def read_source(out: Path) -> list[SourceImage]:
    """OUT's images in metadata order; an output folder is one with a checkpoint (as `status` asks)."""
    from .checkpoint import FILE_NAME, Checkpoint

    if not (out / FILE_NAME).exists():
        raise BatchError(f"no checkpoint at {out / FILE_NAME}: is {out} an sdbatch output folder?")
    metadata = out / "images" / "metadata.jsonl"
    if not metadata.exists():
        raise BatchError(f"{metadata} does not exist yet: it is written when a run ends "
                         f"(or rebuild it with `sdbatch report {out}`)")
    images, seen = [], set()
    with open(metadata, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                meta = json.loads(line)
            except json.JSONDecodeError as e:
                raise BatchError(f"{metadata}, line {line_no}: not JSON ({e.msg})") from None
            name = meta.get("file_name") if isinstance(meta, dict) else None
            if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
                raise BatchError(f"{metadata}, line {line_no}: file_name {name!r} -- a file name inside "
                                 f"{out / 'images'} is required")
            if name in seen:
                log.warning("%s, line %d: %s is listed twice; exported once", metadata, line_no, name)
                continue
            seen.add(name)
            images.append(SourceImage(name, out / "images" / name, meta))
    checkpoint = Checkpoint.merged(out)
    done = checkpoint.counts().done
    checkpoint.close()
    if done > len(images):
        log.warning("%s lists %d images but the checkpoint holds %d done: a run is under way or was killed; "
                    "the others are exported next time (or now, after `sdbatch report %s`)",
                    metadata, len(images), done, out)
    return images


# --- the destination: DIR, its export.json, and what a killed export left ----------------------------


def _shard_pattern(fmt: str) -> re.Pattern:
    return re.compile({"webdataset": r"shard-\d{6}\.tar", "parquet": r"shard-\d{6}\.parquet",
                       "imagefolder": r"shard-\d{6}"}[fmt] + r"\Z")


def _ours(entry: str) -> bool:
    """A name in DIR that an export writes (so an unfinished first export may be resumed into DIR)."""
    return (entry in (STATE_FILE, SPLIT, "images", "metadata.jsonl", "README.md", LOCK_NAME)
            or entry.startswith(HASH_CACHE)
            or bool(re.fullmatch(r"shard-\d{6}\.tar", entry)) or (entry.startswith(".") and TEMP_MARK in entry))


def prepare_destination(out: Path, to: Path, options: ExportOptions) -> dict:
    """export.json's state for DIR (a new one if none), refusing other options or another source;
    removes temp files and shards a killed export wrote but did not record."""
    state = _read_state(to)
    if options.fresh:
        _remove_export(to)
        state = None
    if state is None:
        others = sorted(entry for entry in os.listdir(to) if not _ours(entry))
        if others:
            raise BatchError(f"--to {to} holds files that are not an export ({', '.join(others[:3])}): "
                             "give an empty or new folder")
        state = {"format": options.format, "source": str(out.resolve()), "options": options.recorded(),
                 "kept": 0, "dropped": {}, "shards": [], "files": {}}
    else:
        _check_same_export(state, out, to, options)
    _remove_unrecorded(to, state)
    return state


def _read_state(to: Path) -> dict | None:
    path = to / STATE_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not {"format", "source", "options", "shards", "files"} <= state.keys():
            raise ValueError("keys missing")
    except (ValueError, OSError) as e:
        raise BatchError(f"{path} cannot be read ({e}): export again with --fresh") from None
    return state


def _check_same_export(state: dict, out: Path, to: Path, options: ExportOptions) -> None:
    wanted = {"format": options.format, "source": str(out.resolve()), **options.recorded()}
    had = {"format": state["format"], "source": state["source"], **state["options"]}
    changed = [f"{name} {had.get(name)!r} -> {value!r}" for name, value in wanted.items() if had.get(name) != value]
    if changed:
        raise BatchError(f"{to} holds an export made with other settings ({'; '.join(changed)}): add --fresh to "
                         "replace it, or export to another folder")


def _remove_export(to: Path) -> None:
    """--fresh: remove what an export wrote (the hash cache stays: it is keyed by file content)."""
    for entry in os.listdir(to):
        path = to / entry
        if re.fullmatch(r"shard-\d{6}\.tar", entry) or entry in (STATE_FILE, "metadata.jsonl"):
            path.unlink()
        elif entry == "README.md" and CARD_MARK in path.read_text(encoding="utf-8", errors="replace"):
            path.unlink()
        elif entry in (SPLIT, "images") and path.is_dir():
            shutil.rmtree(path)
    remove_temp_files(to)


def _remove_unrecorded(to: Path, state: dict) -> None:
    """Temp files and shards a killed export left: complete shards it did not commit are written again."""
    fmt = state["format"]
    shards = {"webdataset": to, "parquet": to / SPLIT, "imagefolder": to / "images"}[fmt]
    recorded = {entry["name"] for entry in state["shards"]}
    pattern = _shard_pattern(fmt)
    removed = 0
    for folder in dict.fromkeys([to, shards]):
        if not folder.is_dir():
            continue
        for entry in os.listdir(folder):
            path = folder / entry
            temp = entry.startswith(".") and TEMP_MARK in entry
            unrecorded = folder == shards and pattern.fullmatch(entry) and _shard_name(fmt, entry) not in recorded
            if temp or unrecorded:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                removed += 1
    if fmt == "imagefolder":
        _truncate(to / "metadata.jsonl", state.get("metadata_bytes", 0))
    if removed:
        log.info("removed %d unfinished file(s) of an interrupted export in %s", removed, to)


def _shard_name(fmt: str, entry: str) -> str:
    return {"webdataset": entry, "parquet": f"{SPLIT}/{entry}", "imagefolder": f"images/{entry}"}[fmt]


def _truncate(path: Path, size: int) -> None:
    """metadata.jsonl back to its committed length: lines of a shard an export did not commit go."""
    if not path.exists():
        if size:
            raise BatchError(f"{path} is missing but export.json records {size} bytes of it: export again with --fresh")
        return
    if path.stat().st_size != size:
        with open(path, "r+b") as f:
            f.truncate(size)
            os.fsync(f.fileno())


def _commit(to: Path, state: dict) -> None:
    """export.json, atomically: summary first, then one line of file names per shard."""
    files = state["files"]
    head = {k: v for k, v in state.items() if k not in ("files", "dropped_files")}
    text = json.dumps(head, indent=2, ensure_ascii=False)[:-2]
    text += ',\n  "dropped_files": ' + json.dumps(state.get("dropped_files", {}), ensure_ascii=False)
    text += ',\n  "files": {' + ",".join(f"\n    {json.dumps(name)}: {json.dumps(names, ensure_ascii=False)}"
                                         for name, names in files.items())
    text += "\n  }\n}\n"
    write_text_atomic(to / STATE_FILE, text)


# --- selection: new images, the clip_score filter, near-duplicates -------------------------------------


def check_scores(out: Path, images: list[SourceImage], options: ExportOptions) -> None:
    """--min-clip-score needs every image scored: an unscored one is an error, not a silent keep or drop."""
    if options.min_clip_score is None:
        return
    unscored = [image.file_name for image in images if not _is_number(image.meta.get("clip_score"))]
    if unscored:
        raise BatchError(f"{len(unscored)} image(s) in {out} have no clip_score (first: {unscored[0]}): compute "
                         f"them with `sdbatch score {out} --clip MODEL`, or export without --min-clip-score")


def select(images: list[SourceImage], state: dict, options: ExportOptions, to: Path
           ) -> tuple[list[SourceImage], dict[str, list]]:
    """The images to add, in metadata order, and the rest of OUT's new images by reason dropped."""
    exported = {name for names in state["files"].values() for name in names}
    new = [image for image in images if image.file_name not in exported]
    dropped: dict[str, list] = {}
    candidates = []
    for image in new:
        if not image.path.is_file():
            dropped.setdefault("missing", []).append(image.file_name)
        elif options.min_clip_score is not None and image.meta["clip_score"] < options.min_clip_score:
            dropped.setdefault("clip_score", []).append(image.file_name)
        else:
            candidates.append(image)
    if dropped.get("missing"):
        log.warning("%d image(s) listed in metadata.jsonl are not in %s (first: %s): left out",
                    len(dropped["missing"]), new[0].path.parent, dropped["missing"][0])
    if options.dedup is None or not candidates:
        return candidates, dropped
    # Images exported earlier come first: they are in the shards already, whatever their place in OUT.
    earlier = [image for image in images if image.file_name in exported and image.path.is_file()]
    hashes = perceptual_hashes(earlier + candidates, to / HASH_CACHE, options)
    index = NearDuplicateIndex(options.dedup)
    for image in earlier:
        index.add(hashes[image.file_name], image.file_name)
    keep = []
    for image in candidates:
        match = index.find(hashes[image.file_name])
        if match is None:
            index.add(hashes[image.file_name], image.file_name)
            keep.append(image)
        else:
            dropped.setdefault("duplicate", []).append({"file_name": image.file_name, "of": match})
    return keep, dropped


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


class NearDuplicateIndex:
    """64-bit hashes within `max_distance` bits of each other, found by multi-index hashing.

    The hash is cut into max_distance + 1 bands: two hashes that differ in at most that many bits
    agree exactly on at least one band (pigeonhole), so a query compares only with the hashes
    sharing one of its bands. With n hashes a query costs about (d + 1) * n / 2**(64 / (d + 1))
    comparisons: at d = 4 and a million images about 700, instead of a million; it grows quickly
    past d = 10 (at d = 64 it compares with everything, O(n) a query).
    """

    def __init__(self, max_distance: int, bits: int = PHASH_BITS):
        self.max_distance = max_distance
        bands = min(max_distance + 1, bits)
        edges = [round(i * bits / bands) for i in range(bands + 1)]
        self.bands = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]
        self.tables: list[dict[int, list[int]]] = [{} for _ in self.bands]
        self.hashes: list[int] = []
        self.names: list[str] = []

    def add(self, value: int, name: str) -> None:
        position = len(self.hashes)
        self.hashes.append(value)
        self.names.append(name)
        for table, (shift, mask) in zip(self.tables, self.bands):
            table.setdefault(value >> shift & mask, []).append(position)

    def find(self, value: int) -> str | None:
        """The earliest added name within max_distance bits of `value`, or None."""
        best = None
        for table, (shift, mask) in zip(self.tables, self.bands):
            for position in table.get(value >> shift & mask, ()):
                if (best is None or position < best) and (value ^ self.hashes[position]).bit_count() <= self.max_distance:
                    best = position
        return None if best is None else self.names[best]


def perceptual_hashes(images: list[SourceImage], cache_path: Path, options: ExportOptions) -> dict[str, int]:
    """imagehash.phash of each image as an int, cached in DIR by (file name, size, mtime)."""
    from .progress import Progress

    db = sqlite3.connect(cache_path)
    try:
        db.execute("CREATE TABLE IF NOT EXISTS phash (file TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                   "hash TEXT)")
        cached = {file: (size, mtime, value) for file, size, mtime, value in db.execute("SELECT * FROM phash")}
        hashes, todo = {}, []
        for image in images:
            stat = image.path.stat()
            known = cached.get(image.file_name)
            if known and known[:2] == (stat.st_size, stat.st_mtime_ns):
                hashes[image.file_name] = int(known[2], 16)
            else:
                todo.append((image, stat))
        if todo:
            log.info("perceptual hashes: %d to compute, %d cached", len(todo), len(hashes))
        with Progress(len(todo), options.quiet) as progress, ThreadPoolExecutor(options.workers) as pool:
            progress.set_group("hashing")
            rows = []
            for (image, stat), value in zip(todo, pool.map(lambda item: _phash(item[0].path), todo)):
                hashes[image.file_name] = value
                rows.append((image.file_name, stat.st_size, stat.st_mtime_ns, f"{value:016x}"))
                progress.advance(1)
                if len(rows) >= 1000:  # a kill while hashing a million images keeps most of the work
                    _save_hashes(db, rows)
            _save_hashes(db, rows)
    finally:
        db.close()
    return hashes


def _save_hashes(db: sqlite3.Connection, rows: list) -> None:
    with db:
        db.executemany("INSERT OR REPLACE INTO phash VALUES (?, ?, ?, ?)", rows)
    rows.clear()


def _phash(path: Path) -> int:
    import imagehash
    from PIL import Image

    try:
        with Image.open(path) as image:
            return int(str(imagehash.phash(image)), 16)
    except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for a damaged or foreign file
        raise BatchError(f"{path} cannot be read as an image ({e}): remove it or its metadata.jsonl line") from None


# --- shard writers ---------------------------------------------------------------------------------------


def read_bytes(image: SourceImage) -> bytes:
    """The image file as it is: no decoding, no re-encoding."""
    return image.path.read_bytes()


def sample_key(file_name: str) -> str:
    """A webdataset key from a file name: its stem, with no dots (webdataset splits key and
    extension at the first dot); a stem that had to change gets a short hash, so keys stay unique."""
    stem = Path(file_name).stem
    key = re.sub(r"[^\w-]", "_", stem)
    return key if key == stem else f"{key}-{hashlib.sha1(stem.encode()).hexdigest()[:8]}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _WebDatasetShards:
    """DIR/shard-000000.tar: <key>.png (the file as written), <key>.json (its metadata line), <key>.txt (prompt)."""

    def __init__(self, to: Path, state: dict):
        self.to = to

    def check(self, images: list[SourceImage]) -> None:
        pass

    def name(self, index: int) -> str:
        return f"shard-{index:06d}.tar"

    def write(self, name: str, images: list[SourceImage], progress) -> dict:
        from webdataset import TarWriter

        def write(f):
            with TarWriter(f, encoder=True) as sink:
                for image in images:
                    extension = image.path.suffix.lstrip(".").lower() or "png"
                    sink.write({"__key__": sample_key(image.file_name), extension: read_bytes(image),
                                "json": json.dumps(image.meta, ensure_ascii=False).encode("utf-8"),
                                "txt": image.meta.get("prompt") or ""})
                    progress.advance(1)

        size = write_atomic(self.to / name, write)
        return {"bytes": size, "sha256": _sha256(self.to / name)}


class _ParquetShards:
    """DIR/train/shard-000000.parquet: `image` ({bytes, path}, datasets' Image feature) and every parameter.

    Every shard has the first shard's schema (datasets needs one schema across files), with the
    features in the schema's `huggingface` metadata, which is how datasets reads an Image column.
    """

    def __init__(self, to: Path, state: dict):
        import pyarrow.parquet as pq

        self.folder = to / SPLIT
        self.folder.mkdir(exist_ok=True)
        self.schema = None
        if state["shards"]:
            first = to / state["shards"][0]["name"]
            try:
                self.schema = pq.read_schema(first)
            except OSError as e:
                raise BatchError(f"{first} cannot be read ({e}): export again with --fresh") from None

    def check(self, images: list[SourceImage]) -> None:
        if self.schema is None:
            self.schema = parquet_schema([image.meta for image in images])
            return
        columns = {name for image in images for name in image.meta}
        new = sorted(columns - set(self.schema.names))
        if new:
            raise BatchError(f"new column(s) {', '.join(new)} are not in the parquet shards already written "
                             "(one schema for every shard): export again with --fresh")

    def name(self, index: int) -> str:
        return f"{SPLIT}/shard-{index:06d}.parquet"

    def write(self, name: str, images: list[SourceImage], progress) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq

        as_json = {f.name for f in self.schema if (f.metadata or {}).get(b"sdbatch") == b"json"}

        def write(f):
            writer = pq.ParquetWriter(f, self.schema)
            try:
                for start in range(0, len(images), PARQUET_ROW_GROUP):
                    rows = []
                    for image in images[start:start + PARQUET_ROW_GROUP]:
                        row = {k: (json.dumps(v, ensure_ascii=False) if k in as_json and v is not None else v)
                               for k, v in image.meta.items()}
                        row["image"] = {"bytes": read_bytes(image), "path": image.file_name}
                        rows.append(row)
                        progress.advance(1)
                    try:
                        writer.write_table(pa.Table.from_pylist(rows, schema=self.schema))
                    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                        raise BatchError(f"{name}: a value does not fit the parquet shards' column types ({e}): "
                                         "export again with --fresh") from None
            finally:
                writer.close()

        path = self.folder.parent / name
        size = write_atomic(path, write)
        return {"bytes": size, "sha256": _sha256(path)}


def parquet_schema(rows: list[dict]):
    """The shards' schema: `image`, then every column in order of first appearance, with HF features."""
    import pyarrow as pa

    known = {**{c: pa.string() for c in _STRING}, **{c: pa.int64() for c in _INT},
             **{c: pa.float64() for c in _FLOAT}, **{c: pa.bool_() for c in _BOOL}}
    names = list(dict.fromkeys(name for row in rows for name in row if name != "image"))
    fields = [pa.field("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))]
    features = {"image": {"_type": "Image"}}
    for name in names:
        if name in known:
            kind = known[name]
        else:
            kind = _column_type([row.get(name) for row in rows])
        if kind is None:  # mixed or nested values (a manifest's free-form column): JSON text
            fields.append(pa.field(name, pa.string(), metadata={"sdbatch": "json"}))
            features[name] = {"dtype": "string", "_type": "Value"}
            continue
        fields.append(pa.field(name, kind))
        features[name] = {"dtype": _HF_DTYPES[str(kind)], "_type": "Value"}
    return pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": features}})})


def _column_type(values: list):
    """An extra column's type: string, int64, float64 or bool when every value agrees; None otherwise."""
    import pyarrow as pa

    kinds = {type(v) for v in values if v is not None}
    if kinds <= {str}:
        return pa.string()
    if kinds == {bool}:
        return pa.bool_()
    if kinds == {int}:
        return pa.int64()
    if kinds <= {int, float}:
        return pa.float64()
    return None


class _ImageFolderShards:
    """DIR/images/shard-000000/<file> and DIR/metadata.jsonl (file_name relative to DIR): datasets' imagefolder.

    A shard folder is filled under a temp name and renamed; its metadata lines are appended after,
    and export.json records metadata.jsonl's length, so the next export cuts off uncommitted lines.
    """

    def __init__(self, to: Path, state: dict):
        self.to, self.state = to, state
        (to / "images").mkdir(exist_ok=True)

    def check(self, images: list[SourceImage]) -> None:
        pass

    def name(self, index: int) -> str:
        return f"images/shard-{index:06d}"

    def write(self, name: str, images: list[SourceImage], progress) -> dict:
        final = self.to / name
        temp = final.with_name(f".{final.name}{TEMP_MARK}{os.getpid()}")
        lines = []
        try:
            temp.mkdir()
            for image in images:
                data = read_bytes(image)
                with open(temp / image.file_name, "wb") as f:
                    f.write(data)
                    os.fsync(f.fileno())
                lines.append(json.dumps({**image.meta, "file_name": f"{name}/{image.file_name}"}, ensure_ascii=False))
                progress.advance(1)
            os.replace(temp, final)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        with open(self.to / "metadata.jsonl", "ab") as f:
            f.write("".join(line + "\n" for line in lines).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
            self.state["metadata_bytes"] = f.tell()
        return {"bytes": sum((final / image.file_name).stat().st_size for image in images)}


_SHARD_WRITERS = {"webdataset": _WebDatasetShards, "parquet": _ParquetShards, "imagefolder": _ImageFolderShards}


# --- the Hub ---------------------------------------------------------------------------------------------


def check_hub_reachable() -> None:
    """--push-to-hub offline is an error before anything is exported."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise BatchError("--push-to-hub: HF_HUB_OFFLINE is set, so the Hub cannot be reached: export without "
                         "--push-to-hub, then upload DIR where there is a network "
                         "(`hf upload REPO DIR --repo-type dataset`)")


def push_to_hub(to: Path, repo: str) -> str:
    """Upload DIR as a dataset repository (created if needed); returns the commit's URL."""
    from huggingface_hub import HfApi

    check_hub_reachable()
    state = _read_state(to)
    _write_card(to, state["format"] if state else None)
    errors: tuple = (OSError,)  # HfHubHTTPError, OfflineModeIsEnabled and a missing token are OSErrors
    for module in ("httpx2", "httpx", "requests"):  # the transport's own errors (which one: hub's version)
        try:
            errors += (__import__(module).HTTPError,)
        except (ImportError, AttributeError):
            pass
    try:
        api = HfApi()
        api.create_repo(repo, repo_type="dataset", exist_ok=True)
        commit = api.upload_folder(folder_path=to, repo_id=repo, repo_type="dataset",
                                   ignore_patterns=[".*", "**/.*"], commit_message="sdbatch export")
    except errors as e:
        raise BatchError(f"--push-to-hub {repo} failed ({type(e).__name__}: {e}); the export in {to} is complete: "
                         f"run the same command again, or `hf upload {repo} {to} --repo-type dataset`") from None
    return str(getattr(commit, "commit_url", commit))


def _write_card(to: Path, fmt: str | None) -> None:
    """A dataset card naming the data files, so the Hub does not take export.json for data."""
    card = to / "README.md"
    if card.exists() and CARD_MARK not in card.read_text(encoding="utf-8", errors="replace"):
        return  # the user's own card
    files = {"webdataset": "shard-*.tar", "parquet": f"{SPLIT}/shard-*.parquet",
             "imagefolder": None}.get(fmt)
    header = ("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
              f"    path: \"{files}\"\n---\n" if files else "")
    write_text_atomic(card, f"{header}{CARD_MARK}\n\nImages made with sdbatch, exported as {fmt}; "
                            "`export.json` lists the shards, the source and the filters.\n")
