"""Read a CSV or JSONL manifest and validate every row into a `Job`, reporting all errors at once."""
from __future__ import annotations

import csv
import difflib
import gzip
import hashlib
import io
import json
import math
import re
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

from .config import Defaults
from .errors import ManifestError, RowError
from .expand import DEFAULT_MAX_ROWS, EXPAND_COLUMNS, Expander, wants_expansion
from .job import FILE_COLUMNS, IMAGE_PROMPT_METHODS, MODES, Job
from .families import FAMILY_COLUMNS, describe
from .models import HUB_ID, PRESETS
from .schedulers import SCHEDULERS

COLUMNS = (
    "id", "mode", "prompt", "negative_prompt", "init_image", "strength", "prompt_image",
    "image_prompt_method", "ip_scale", "width", "height", "steps", "cfg", "seed",
    "num_images", "scheduler", "lora", "lora_scale", "model", *FAMILY_COLUMNS,
)
# Columns read here that the known-column checks must know too; `expand` and `sweep` are
# consumed by expansion (expand.py) before a row is validated.
KNOWN_COLUMNS = COLUMNS + EXPAND_COLUMNS
# Names the image metadata uses itself: an extra column may not shadow them.
RESERVED = ("file_name", "k", "sampler", "model_name")
# failed.jsonl's own columns: read back as a manifest, they are notes about the last attempt, not labels.
ANNOTATIONS = ("error", "attempts")
MAX_SIDE = 8192
MAX_STEPS = 1000
MAX_IMAGES_PER_ROW = 10_000
MAX_SEED = 2**63 - 1
MAX_STEM_BYTES = 200


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: the jobs in file order, plus rows rejected under --skip-invalid."""

    path: Path
    jobs: list[Job]
    invalid: list[tuple[int, dict, list[RowError]]]  # (line, raw row, its errors)
    sha256: str
    skipped_rows: int = 0  # rows not read again because the checkpoint holds them done (see `skip_lines`)
    expanded: tuple[tuple[int, str, int], ...] = ()  # (line, id, rows) of each row that expand or sweep multiplied


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(path, [RowError(None, None, None, "file not found")]) from None
    except OSError as e:
        raise ManifestError(path, [RowError(None, None, None, f"cannot read: {e.strerror}")]) from None


def read_rows(path: Path, data: bytes | None = None, skip_lines: frozenset = frozenset()) -> tuple[list[tuple[int, dict]], list[RowError], bytes]:
    """Raw rows as (line number, {column: value}) with empty cells as None; parse errors collected."""
    data = read_bytes(path) if data is None else data
    name = path.name.lower()
    if name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise ManifestError(path, [RowError(None, None, None, f"not a valid gzip file: {e}")]) from None
        name = name[:-3]
    if name.endswith(".jsonl") or name.endswith(".ndjson"):
        rows, errors = _read_jsonl(data, skip_lines)
    elif name.endswith(".csv"):
        rows, errors = _read_csv(data)
        rows = [(line, raw) for line, raw in rows if line not in skip_lines] if skip_lines else rows
    else:
        raise ManifestError(path, [RowError(None, None, path.suffix, "manifest must be .csv, .jsonl or .jsonl.gz")])
    if not rows and not errors and not skip_lines:
        errors = [RowError(None, None, None, "the manifest holds no rows")]
    return rows, errors, data


def _decode(data: bytes) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ManifestError("manifest", [RowError(None, None, None, "file is UTF-16; save it as UTF-8")])
    text = data.decode("utf-8-sig")  # a BOM from Excel is fine
    if "\x00" in text:
        raise ValueError("contains NUL bytes")
    return text


def _text_or_error(data: bytes) -> tuple[str | None, list[RowError]]:
    try:
        return _decode(data), []
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        return None, [RowError(line, None, None, f"not valid UTF-8 (byte {e.start}); save the file as UTF-8")]
    except ValueError as e:
        return None, [RowError(None, None, None, f"not a text file ({e})")]
    except ManifestError as e:
        return None, e.errors


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _valid_unicode(value) -> bool:
    """False if any text in a parsed JSON value cannot be encoded (lone surrogates from \\ud800 escapes)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_jsonl(data: bytes, skip_lines: frozenset = frozenset()) -> tuple[list[tuple[int, dict]], list[RowError]]:
    text, errors = _text_or_error(data)
    if text is None:
        return [], errors
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 may sit inside a string
        if number in skip_lines:
            continue
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(RowError(number, None, line.strip()[:60], f"invalid JSON: {e.msg} at column {e.colno}"))
            continue
        except (ValueError, RecursionError) as e:  # integers past Python's digit limit; absurd nesting
            errors.append(RowError(number, None, line.strip()[:60], f"invalid JSON: {str(e)[:80]}"))
            continue
        if _SURROGATE_ESCAPE.search(line) and not _valid_unicode(obj):
            errors.append(RowError(number, None, line.strip()[:60], "text holds a lone surrogate (\\ud800-\\udfff): not valid Unicode"))
            continue
        if not isinstance(obj, dict):
            errors.append(RowError(number, None, obj, "each line must be a JSON object"))
            continue
        rows.append((number, {str(k): v for k, v in obj.items()}))
    return rows, errors


def _read_csv(data: bytes) -> tuple[list[tuple[int, dict]], list[RowError]]:
    import pandas as pd

    text, errors = _text_or_error(data)
    if text is None:
        return [], errors
    if not text.strip():
        return [], [RowError(None, None, None, "the manifest is empty")]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", pd.errors.ParserWarning)
            # index_col=False: a first row with an extra (unquoted) comma must not become an index
            frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False, index_col=False)
    except (pd.errors.ParserError, csv.Error, ValueError) as e:
        match = re.search(r"line (\d+)", str(e))
        line = int(match.group(1)) if match else None
        return [], [RowError(line, None, None, f"malformed CSV: {str(e).strip()} (quote cells that contain commas)")]
    if any("Length of header" in str(w.message) for w in caught):
        return [], [_too_many_fields(text)]
    header = [str(c) for c in frame.columns]
    dupes = sorted({c for c in header if header.count(c) > 1} | {c for c in header if re.fullmatch(r".+\.\d+", c) and c.rsplit(".", 1)[0] in header})
    if dupes:
        errors.append(RowError(1, dupes[0], None, "column appears twice in the header"))
    unnamed = [c for c in header if c.startswith("Unnamed: ")]
    if unnamed:
        errors.append(RowError(1, None, None, f"{len(unnamed)} column(s) have no name in the header"))
    lines = _record_lines(text, len(frame))
    records = frame.to_dict("records")
    rows = [(line, {k: (v if v != "" else None) for k, v in rec.items()}) for line, rec in zip(lines, records)]
    return rows, errors


def _record_lines(text: str, count: int) -> list[int]:
    """The physical line each CSV record starts on (quoted newlines make it differ from the index).

    pandas skips blank lines; so do we. If our count disagrees with pandas', fall back to
    index + 2, which is right for every file without blank lines or quoted newlines.
    """
    starts = []
    if '"' not in text:
        starts = [n for n, line in enumerate(re.split(r"\r\n|\r|\n", text), start=1) if line != ""]
    else:
        reader = csv.reader(io.StringIO(text, newline=""))
        previous = 0
        try:
            for record in reader:
                if record:
                    starts.append(previous + 1)
                previous = reader.line_num
        except csv.Error:
            starts = []
    starts = starts[1:]  # the header
    return starts if len(starts) == count else list(range(2, count + 2))


def _too_many_fields(text: str) -> RowError:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = len(next(reader))
        previous = reader.line_num
        for record in reader:
            if len(record) > header:
                return RowError(previous + 1, None, None,
                                f"{len(record)} cells but the header has {header}: quote cells that contain commas")
            previous = reader.line_num
    except csv.Error:
        pass
    return RowError(None, None, None, "a row has more cells than the header: quote cells that contain commas")


def _near_miss(column: str) -> str | None:
    """The known column a misspelt name was meant to be, or None for a genuine extra column.

    Long names: difflib ratio >= 0.8 (`stpes`, `strenght`). Short names: one edit away with
    the same first letter (`sedd`), or two letters swapped (`cgf`); `note` stays a label.
    """
    lowered = column.strip().lower()
    if lowered in KNOWN_COLUMNS:
        return lowered if lowered != column else None
    match = difflib.get_close_matches(lowered, KNOWN_COLUMNS, n=1, cutoff=0.8)
    if match:
        return match[0]
    for known in KNOWN_COLUMNS:
        if _one_edit(lowered, known) and (lowered[:1] == known[:1] or sorted(lowered) == sorted(known)):
            return known
    return None


def _one_edit(a: str, b: str) -> bool:
    """True when a and b differ by one insertion, deletion, substitution or swap of neighbours."""
    if abs(len(a) - len(b)) > 1 or a == b:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    return any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))


class _Row:
    """Typed access to one raw row, collecting every error instead of stopping at the first."""

    def __init__(self, line: int, raw: dict):
        self.line, self.raw, self.errors = line, raw, []

    def error(self, column: str | None, value, allowed: str) -> None:
        self.errors.append(RowError(self.line, column, value, allowed))

    def text(self, column: str) -> str | None:
        value = self.raw.get(column)
        if value is None:
            return None
        if isinstance(value, (dict, list, bool)):
            self.error(column, value, "must be text")
            return None
        if isinstance(value, float) and not math.isfinite(value):
            self.error(column, value, "must be text")
            return None
        return str(value)

    def number(self, column: str, kind, low, high, default, low_open: bool = False, what: str = ""):
        value = self.raw.get(column)
        if value is None or (isinstance(value, str) and not value.strip()):
            return default
        allowed = what or f"{'an integer' if kind is int else 'a number'} in {'(' if low_open else '['}{low}, {high}]"
        if isinstance(value, bool) or isinstance(value, (dict, list)):
            self.error(column, value, allowed)
            return default
        try:
            parsed = float(value) if not isinstance(value, int) else value
            if kind is float:
                parsed = float(parsed)  # a 400-digit integer overflows here
        except (TypeError, ValueError, OverflowError):
            self.error(column, value, allowed)
            return default
        if isinstance(parsed, float):
            if not math.isfinite(parsed):
                self.error(column, value, allowed)
                return default
            if kind is int:
                if not parsed.is_integer():
                    self.error(column, value, allowed)
                    return default
                parsed = int(parsed)
        if kind is int and isinstance(value, str) and not re.fullmatch(r"\s*[+-]?\d+(\.0*)?\s*", value):
            self.error(column, value, allowed)
            return default
        parsed = kind(parsed)
        if parsed < low or parsed > high or (low_open and parsed == low):
            self.error(column, value, allowed)
            return default
        return parsed

    def choice(self, column: str, choices, default):
        value = self.text(column)
        if value is None:
            return default
        if value.strip() not in choices:
            hint = difflib.get_close_matches(value.strip(), choices, n=1, cutoff=0.6)
            self.error(column, value, f"one of {', '.join(choices)}" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
            return default
        return value.strip()


class ImageChecker:
    """Resolves image paths against the manifest folder; each distinct file is opened once.

    `where` names that folder in messages (the Python API resolves against the current directory).
    """

    def __init__(self, folder: Path, where: str = "the manifest's folder"):
        self.folder = folder
        self.where = where
        self.seen: dict[Path, tuple[str | None, str | None]] = {}

    def check(self, row: _Row, column: str) -> tuple[str | None, str | None]:
        value = row.text(column)
        if value is None:
            return None, None
        path = _expand(value.strip())
        if not path.is_absolute():
            path = self.folder / path
        path = Path(_normalise(path))
        if path not in self.seen:
            self.seen[path] = self._open(path)
        digest, problem = self.seen[path]
        if problem:
            row.error(column, value, problem)
            return None, None
        return str(path), digest

    @staticmethod
    def _open(path: Path) -> tuple[str | None, str | None]:
        from PIL import Image

        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None, f"file not found: {path}"
        except IsADirectoryError:
            return None, f"is a folder, not an image: {path}"
        except OSError as e:
            return None, f"cannot read {path}: {e.strerror}"
        except ValueError as e:  # a NUL byte in the name
            return None, f"not a usable file name ({e})"
        try:
            with Image.open(path) as image:
                image.load()
        except Exception as e:  # PIL raises many types for corrupt or truncated files
            return None, f"not a readable image ({type(e).__name__}: {e})"
        return hashlib.sha256(data).hexdigest(), None


_LOOKS_LOCAL = re.compile(r"^(\.|~|/|[A-Za-z]:\\)|\.(safetensors|ckpt|pt|bin)$")


def _reference(row: _Row, column: str, folder: Path, where: str = "the manifest's folder") -> str | None:
    """A model or LoRA reference: an existing path (relative to `folder`, described as `where`) or a hub id."""
    value = row.text(column)
    if value is None or not value.strip():
        return None
    value = value.strip()
    path = _expand(value)
    candidate = path if path.is_absolute() else folder / path
    if _exists(candidate):
        return _normalise(candidate.resolve())
    if _LOOKS_LOCAL.search(value):
        row.error(column, value, f"not found: {candidate} (relative paths resolve against {where})")
        return None
    if (column == "model" and value in PRESETS) or HUB_ID.fullmatch(value):
        return value  # resolved (and, offline, looked up in the cache) when the model loads
    row.error(column, value, f"neither an existing path (relative to {where}) nor a hub id like 'org/name'")
    return None


def _expand(text: str) -> Path:
    """`~` and `~user` expanded where they can be; `~nosuchuser` stays as written."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        return Path(text)


def _exists(path: Path) -> bool:
    """Path.exists() that answers False for names the OS refuses (NUL bytes, too long)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _normalise(path: Path) -> str:
    import os

    return os.path.normpath(str(path))


_UNSAFE = re.compile(r"[^\w.\-]+")
_LEADING_DOTS = re.compile(r"^\.+")


def file_stem(job_id: str) -> str:
    """A file name stem for an id: no path separators, no leading dots, nothing outside [word . -]."""
    return _LEADING_DOTS.sub("_", _UNSAFE.sub("_", job_id))


def derive_seed(run_seed: int, job_id: str) -> int:
    """A stable seed for a row without one: the same (run seed, id) always gives the same seed."""
    digest = hashlib.sha256(f"{run_seed}:{job_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def validate_row(line: int, raw: dict, defaults: Defaults, run_seed: int, images: ImageChecker) -> tuple[Job | None, list[RowError]]:
    """One raw row to a Job, or the list of everything wrong with it."""
    row = _Row(line, raw)
    row.text("id")  # an object or list as id is an error
    job_id = _row_id(line, raw)
    stem = file_stem(job_id)
    if not stem.strip("_") or len(stem.encode()) > MAX_STEM_BYTES:
        row.error("id", job_id, f"must give a file name: 1 to {MAX_STEM_BYTES} bytes of letters, digits, '.', '-', '_'")

    init_image, init_sha = images.check(row, "init_image")
    prompt_image, prompt_sha = images.check(row, "prompt_image")
    has_init = row.raw.get("init_image") not in (None, "")
    has_prompt_image = row.raw.get("prompt_image") not in (None, "")
    inferred = "img2img" if has_init else "image_prompt" if has_prompt_image else "txt2img"
    mode = row.choice("mode", MODES, inferred)
    model = _reference(row, "model", images.folder, images.where) or defaults.model
    info = describe(model)
    family = info.family
    if mode not in family.modes:
        row.error("mode", mode, f"the {family.name} family ({info.pipeline}) has no {mode} pipeline; "
                                f"it takes {', '.join(family.modes)}")
    if mode != "img2img" and has_init:
        row.error("init_image", raw.get("init_image"), f"only img2img rows take an init_image (mode is {mode})")
    if mode != "image_prompt" and has_prompt_image:
        row.error("prompt_image", raw.get("prompt_image"), f"only image_prompt rows take a prompt_image (mode is {mode})")
    if mode == "img2img" and not has_init:
        row.error("init_image", None, "img2img rows need an init_image")
    if mode == "image_prompt" and not has_prompt_image:
        row.error("prompt_image", None, "image_prompt rows need a prompt_image")

    prompt = row.text("prompt")
    if mode in ("txt2img", "img2img") and not (prompt and prompt.strip()):
        row.error("prompt", raw.get("prompt"), f"a prompt is required for {mode}")
    negative = row.text("negative_prompt")

    method = ip_scale = strength = None
    if mode == "image_prompt":
        method = row.choice("image_prompt_method", IMAGE_PROMPT_METHODS, defaults.image_prompt_method)
        if method and family.image_prompt_methods and method not in family.image_prompt_methods:
            row.error("image_prompt_method", method, f"the {family.name} family takes "
                                                     f"{', '.join(family.image_prompt_methods)} only")
    if mode == "img2img":
        strength = row.number("strength", float, 0.0, 1.0, defaults.strength, low_open=True)
    elif raw.get("strength") not in (None, ""):
        row.error("strength", raw["strength"], "only img2img rows take a strength")
    scale = row.number("ip_scale", float, 0.0, 100.0, defaults.ip_scale)
    if method == "ip_adapter":
        ip_scale = scale

    width = row.number("width", int, 8, MAX_SIDE, defaults.width or info.size)
    height = row.number("height", int, 8, MAX_SIDE, defaults.height or info.size)
    for column, value in (("width", width), ("height", height)):
        if value % info.multiple:
            why = "" if info.multiple == 8 else f" for the {family.name} family (its latents are {info.multiple} pixels a side)"
            row.error(column, value, f"must be a multiple of {info.multiple}{why}")
        elif info.max_side and value > info.max_side:
            row.error(column, value, f"at most {info.max_side} for this {family.name} model (its position "
                                     "embeddings cover no more)")
    steps = row.number("steps", int, 1, MAX_STEPS, defaults.steps or family.steps)
    cfg = row.number("cfg", float, 0.0, 100.0, family.cfg if defaults.cfg is None else defaults.cfg)
    num_images = row.number("num_images", int, 1, MAX_IMAGES_PER_ROW, defaults.num_images)
    seed = row.number("seed", int, 0, MAX_SEED - MAX_IMAGES_PER_ROW, None, what="an integer >= 0 (below 2**63)")
    if seed is None:
        seed = derive_seed(run_seed, job_id)
    scheduler = row.choice("scheduler", tuple(SCHEDULERS), defaults.scheduler or family.scheduler)
    if scheduler not in family.schedulers:
        row.error("scheduler", scheduler, f"the {family.name} family ({info.pipeline}) takes "
                                          f"{', '.join(family.schedulers)}")
    extras = _family_columns(row, family)
    default_negative = defaults.negative_prompt
    if family.negative_needs_true_cfg and not (extras["true_cfg"] and extras["true_cfg"] > 1):
        default_negative = ""  # the run's --negative-prompt means nothing to Flux without true CFG
    if strength is not None and int(steps * strength) < 1:  # diffusers runs int(steps * strength) steps
        row.error("strength", strength, f"strength x steps must give at least one step (steps is {steps})")

    lora = _reference(row, "lora", images.folder, images.where)
    lora_scale = row.number("lora_scale", float, -10.0, 10.0, 1.0 if lora else None)
    if lora is None and not row.text("lora") and raw.get("lora_scale") not in (None, ""):  # a bad lora: said once
        row.error("lora_scale", raw["lora_scale"], "lora_scale needs a lora on the same row")
    if lora and not family.lora:
        row.error("lora", raw.get("lora"), f"the {family.name} family ({info.pipeline}) takes no LoRA here")

    extra = tuple((k, v) for k, v in raw.items() if k not in KNOWN_COLUMNS and k not in ANNOTATIONS)
    for column, value in extra:
        if isinstance(value, float) and not math.isfinite(value):
            row.error(column, value, "NaN and Infinity cannot be written to metadata.jsonl (not JSON); use null or a string")
    if row.errors:
        return None, row.errors
    job = Job(
        id=job_id, line=line, stem=stem, mode=mode,
        prompt=prompt or "",
        negative_prompt=negative if negative is not None else default_negative,
        width=width, height=height, steps=steps, cfg=cfg, seed=seed, num_images=num_images,
        scheduler=scheduler, strength=strength,
        init_image=init_image, init_image_sha=init_sha,
        prompt_image=prompt_image, prompt_image_sha=prompt_sha,
        image_prompt_method=method, ip_scale=ip_scale, lora=lora, lora_scale=lora_scale, model=model,
        family=family.name, **extras, extra=extra, raw=raw,
    )
    return job, []


def _family_columns(row: _Row, family) -> dict:
    """prompt_2, negative_prompt_2, true_cfg and max_sequence_length, on the families that take them."""
    values = {}
    for column in FAMILY_COLUMNS:
        given = row.raw.get(column) not in (None, "")
        if given and not family.takes(column):
            row.error(column, row.raw[column], f"the {family.name} family takes no {column}")
        values[column] = None
    if family.takes("prompt_2"):
        values["prompt_2"] = row.text("prompt_2")
        values["negative_prompt_2"] = row.text("negative_prompt_2")
    if family.takes("true_cfg"):
        values["true_cfg"] = row.number("true_cfg", float, 1.0, 100.0, None)
    if family.takes("max_sequence_length"):
        values["max_sequence_length"] = row.number("max_sequence_length", int, 1, family.max_sequence_length, None)
    if family.negative_needs_true_cfg and not (values["true_cfg"] and values["true_cfg"] > 1):
        for column in ("negative_prompt", "negative_prompt_2"):
            if row.text(column):
                row.error(column, row.raw[column], f"the {family.name} family has no negative prompt without true "
                                                   "CFG: give true_cfg > 1 on the row (twice the compute)")
    return values


def _column_errors(rows: list[tuple[int, dict]]) -> list[RowError]:
    errors, first_seen = [], {}
    for line, raw in rows:
        for column in raw:
            first_seen.setdefault(column, line)
    for column, line in first_seen.items():
        if column in KNOWN_COLUMNS or column in ANNOTATIONS:
            continue
        if column in RESERVED:
            errors.append(RowError(line, column, None, f"'{column}' is a name the image metadata uses; rename the column"))
        elif (hint := _near_miss(column)) is not None:
            errors.append(RowError(line, column, None, f"unknown column; did you mean '{hint}'?"))
    return errors


def portable_row(raw: dict, folder: Path) -> dict:
    """The row with relative file paths made absolute, so that it means the same from any folder
    (failed.jsonl lives in OUT, not beside the manifest)."""
    row = dict(raw)
    for column in FILE_COLUMNS:
        value = row.get(column)
        if not isinstance(value, str) or not value.strip():
            continue
        path = _expand(value.strip())
        candidate = path if path.is_absolute() else folder / path
        # model and lora may be hub ids ("org/name"): only paths that exist there are rewritten
        if not path.is_absolute() and (column in ("init_image", "prompt_image") or _exists(candidate)):
            row[column] = _normalise(candidate)
    return row


def _row_id(line: int, raw: dict) -> str:
    value = raw.get("id")
    text = str(value).strip() if value is not None and not isinstance(value, (dict, list)) else ""
    return text or f"row-{line}"


def _image_count(raw: dict) -> int:
    """num_images as validate_row will read it (2, 2.0, "2.", "2e0"), or 1 if it is invalid."""
    value = raw.get("num_images")
    try:
        count = float(value) if value not in (None, "") and not isinstance(value, bool) else 1.0
    except (TypeError, ValueError, OverflowError):
        return 1
    if not math.isfinite(count) or not count.is_integer():
        return 1
    return int(count) if 1 <= count <= MAX_IMAGES_PER_ROW else 1


def _unique_ids(rows: list[tuple[int, dict]]) -> dict[int, list[RowError]]:
    """Errors per line for duplicate ids and ids whose file names would collide.

    Runs over every row, valid or not, so that all errors show up at once.
    """
    errors: dict[int, list[RowError]] = {}
    by_id: dict[str, int] = {}
    by_stem: dict[str, tuple[str, int]] = {}
    for line, raw in rows:
        job_id = _row_id(line, raw)
        if job_id in by_id:
            errors.setdefault(line, []).append(RowError(line, "id", job_id, f"duplicate id (first used on line {by_id[job_id]})"))
            continue
        by_id[job_id] = line
        stem, count = file_stem(job_id), _image_count(raw)
        if not stem.strip("_"):  # no usable file name: validate_row reports it
            continue
        for name in [stem] if count == 1 else (f"{stem}-{k}" for k in range(count)):
            key = name.lower()  # case-insensitive file systems (macOS, Windows) would merge them
            if key in by_stem and by_stem[key][0] != job_id:
                other_id, other_line = by_stem[key]
                errors.setdefault(line, []).append(RowError(
                    line, "id", job_id, f"its file name '{name}' collides with id '{other_id}' on line {other_line}"))
                break
            by_stem[key] = (job_id, line)
    return errors


def load_manifest(path: Path, defaults: Defaults = Defaults(), run_seed: int = 0, skip_invalid: bool = False,
                  data: bytes | None = None, skip_lines: frozenset = frozenset(), wildcards: Path | None = None,
                  max_rows: int = DEFAULT_MAX_ROWS) -> Manifest:
    """Read and validate the whole manifest; raise ManifestError listing every problem.

    With `skip_invalid`, bad rows (and unparseable JSONL lines) come back in
    `Manifest.invalid` instead; problems with the file as a whole (unreadable, no rows,
    a misspelt column) still raise. `skip_lines` are rows of this very file that an
    earlier run validated and finished: they are not parsed or validated again.
    Rows with `expand` or `sweep` become the rows they stand for (expand.py; `wildcards` is the
    folder of `__name__` files, `max_rows` the most one row may become), all on the row's line.
    """
    path = Path(path)
    rows, parse_errors, data = read_rows(path, data, skip_lines)
    read_any = bool(rows)
    rows, templates, expand_invalid, expanded = _expand_rows(rows, run_seed, Expander(wildcards, max_rows))
    column_errors = _column_errors(rows)
    jobs, invalid = _validate_rows(path, rows, defaults, run_seed, templates)
    invalid += expand_invalid
    row_errors = [e for _, _, errs in invalid for e in errs]
    if (not read_any and not skip_lines) or column_errors or (not skip_invalid and (parse_errors or invalid)):
        raise ManifestError(path, sorted(parse_errors + column_errors + row_errors, key=_order))
    invalid += [(e.line or 0, {}, [e]) for e in parse_errors]
    return Manifest(path=path, jobs=jobs, invalid=sorted(invalid, key=lambda item: item[0]),
                    sha256=hashlib.sha256(data).hexdigest(), skipped_rows=len(skip_lines), expanded=tuple(expanded))


def expand_manifest(path: Path, run_seed: int = 0, wildcards: Path | None = None,
                    max_rows: int = DEFAULT_MAX_ROWS) -> tuple[list[dict], list[tuple[int, str, int]]]:
    """The manifest's rows with templates and sweeps expanded as `run` expands them, each with its id
    and its file paths made absolute (a manifest that runs the same from any folder); raise
    ManifestError for rows that cannot be read or expanded. Also (line, id, rows) per expanded row."""
    path = Path(path)
    rows, parse_errors, _ = read_rows(path)
    rows, _, invalid, expanded = _expand_rows(rows, run_seed, Expander(wildcards, max_rows))
    errors = parse_errors + [e for _, _, errs in invalid for e in errs]
    if errors:
        raise ManifestError(path, sorted(errors, key=_order))
    folder = path.resolve().parent
    # An id on every row: a default `row-<line>` would change with the line it lands on.
    return [portable_row({"id": _row_id(line, raw), **{k: v for k, v in raw.items()
                                                        if k != "id" and k not in EXPAND_COLUMNS}}, folder)
            for line, raw in rows], expanded


def _expand_rows(rows: list[tuple[int, dict]], run_seed: int, expander: Expander):
    """Rows with `expand` or `sweep` replaced by the rows they stand for, each on its template row's line.

    Returns (rows, template rows by line, template rows that cannot be expanded with their errors,
    (line, id, rows) per expanded row). The seed expansion starts from is the row's own, else the one
    derived from (run seed, id) as for any row.
    """
    out, templates, invalid, expanded = [], {}, [], []
    for line, raw in rows:
        if not wants_expansion(raw):
            out.append((line, raw))
            continue
        row = _Row(line, raw)
        seed = row.number("seed", int, 0, MAX_SEED - MAX_IMAGES_PER_ROW, None, what="an integer >= 0 (below 2**63)")
        job_id = _row_id(line, raw)
        if row.errors:
            invalid.append((line, raw, row.errors))
            continue
        seed = derive_seed(run_seed, job_id) if seed is None else seed
        new, errors = expander.expand(line, raw, job_id, seed, _image_count(raw))
        if errors:
            invalid.append((line, raw, errors))
            continue
        templates[line] = raw
        out.extend((line, new_row) for new_row in new)
        expanded.append((line, job_id, len(new)))
    return out, templates, invalid, expanded


def _validate_rows(path: Path, rows, defaults: Defaults, run_seed: int, templates: dict | None = None):
    images = ImageChecker(path.resolve().parent)
    duplicates = _unique_ids(rows)
    jobs, invalid = [], []
    for line, raw in rows:
        job, errors = validate_row(line, raw, defaults, run_seed, images)
        errors = errors + duplicates.get(line, [])
        if errors:
            invalid.append((line, raw, errors))
        else:
            jobs.append(job)
    bad = {line for line, _, _ in invalid if line in (templates or {})}
    if bad:  # a template row is valid as a whole or not at all: reported once, as written, each error once
        jobs = [job for job in jobs if job.line not in bad]
        merged: dict[int, dict] = {}
        for line, _, errors in invalid:
            if line in bad:
                merged.setdefault(line, {}).update(((e.line, e.column, repr(e.value), e.allowed), e) for e in errors)
        invalid = [item for item in invalid if item[0] not in bad]
        invalid += [(line, templates[line], list(errors.values())) for line, errors in merged.items()]
    return jobs, invalid


def _order(error: RowError):
    return (error.line or 0, error.column or "")
