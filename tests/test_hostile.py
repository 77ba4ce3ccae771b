"""Hostile input: garbage manifests, hostile text in image metadata, garbage on the command line.

The contract under test: `load_manifest` returns a Manifest or raises ManifestError (never
another exception); every job it returns has a file stem that stays inside the output
folder; the `parameters` an image carries read back exactly; and the CLI answers garbage
with exit 2 and a one-line "error:" message, never a traceback, writing no image.

The bugs this file found (huge numbers, deep nesting, NUL and over-long paths, `~nouser`,
lone surrogates, float num_images, long JPEG parameters) keep their minimal inputs as
regression cases. The property tests run twice: over plausible input (`_avoid_known_bugs`
keeps those triggers out, so other failures show plainly) and over the whole space, whose
explicit examples are those triggers.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import random
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from batch.errors import ManifestError, RowError
from batch.job import Job
from batch.manifest import COLUMNS, RESERVED, Manifest, load_manifest
from batch.schedulers import SCHEDULERS
from batch.writer import clean_text, infotext, save_image
from conftest import FAST, cli, make_image, write_jsonl


def fuzz(examples: int):
    """Hypothesis settings for this file: sized so the whole file runs well under a minute on 2 cores.

    HOSTILE_FUZZ_SCALE=20 multiplies the examples for a deeper (nightly) search.
    """
    scale = float(os.environ.get("HOSTILE_FUZZ_SCALE", "1"))
    return settings(max_examples=max(1, int(examples * scale)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One folder per module, reused by every example (function-scoped tmp_path and @given don't mix).

    It holds a real image, so rows that name `init.png` or `prompt.png` can validate.
    """
    folder = tmp_path_factory.mktemp("hostile")
    make_image(folder / "init.png")
    make_image(folder / "prompt.png", size=(48, 48))
    return folder


# --- the property ------------------------------------------------------------------------

NAME_MAX = 255  # bytes in one file name on ext4, APFS, NTFS
PID_MAX = 4194304  # Linux pid_max: the temp name is f".{name}.tmp-{pid}"


def check_load(path: Path, skip_invalid: bool = False) -> Manifest | None:
    """Load `path`; any exception but ManifestError propagates and fails the example."""
    try:
        manifest = load_manifest(path, skip_invalid=skip_invalid)
    except ManifestError as e:
        check_error(e)
        event("ManifestError")
        return None
    check_manifest(manifest, path.parent / "out")
    event("Manifest with jobs" if manifest.jobs else "Manifest, every row invalid")
    return manifest


def check_error(error: ManifestError) -> None:
    assert error.errors, "a ManifestError must carry at least one error"
    assert str(error).strip()
    for e in error.errors:
        assert isinstance(e, RowError)
        assert str(e).strip()
        assert e.line is None or (type(e.line) is int and e.line >= 1), e
        if e.column is not None:  # it names a column of some row: it must say which line
            assert type(e.line) is int and e.line >= 1, e


def check_manifest(manifest: Manifest, out: Path) -> None:
    out = out.resolve()
    seen: dict[str, str] = {}
    for job in manifest.jobs:
        assert job.line >= 1
        # everything a job carries is written somewhere (PNG chunk, sqlite, metadata.jsonl): UTF-8 only
        for text in (job.id, job.prompt, job.negative_prompt, job.row,
                     json.dumps(list(job.extra), ensure_ascii=False, default=str)):
            text.encode("utf-8")
        for stem in [job.stem] + [task.stem for task in job.images("")]:
            assert stem and not stem.startswith("."), stem
            assert stem != ".." and not {"/", "\\", "\x00"} & set(stem), stem
        for task in job.images(""):
            name = f"{task.stem}.png"
            target = (out / name).resolve()
            assert target.parent == out and target.name == name, (task.stem, target)
            assert len(f".{task.stem}.webp.tmp-{PID_MAX}".encode()) <= NAME_MAX, task.stem
            # two images with one file name (case-insensitively: macOS, Windows) overwrite each other
            key = task.stem.lower()
            assert key not in seen or seen[key] == job.id, (task.stem, job.id, seen[key])
            seen[key] = job.id
    for line, _raw, errors in manifest.invalid:
        assert errors and all(isinstance(e, RowError) and str(e) for e in errors)
        assert line >= 0


def write(scratch: Path, name: str, data: bytes) -> Path:
    path = scratch / name
    path.write_bytes(data)
    return path


# --- (a) (b) (c) arbitrary bytes ---------------------------------------------------------

# Arbitrary bytes are mostly invalid UTF-8; arbitrary text reaches the JSON and CSV parsers.
payloads = st.one_of(st.binary(max_size=2000), st.text(max_size=400).map(lambda s: s.encode("utf-8")))


@fuzz(250)
@given(data=payloads, skip_invalid=st.booleans())
def test_arbitrary_bytes_as_jsonl(scratch, data, skip_invalid):
    check_load(write(scratch, "bytes.jsonl", data), skip_invalid)


@fuzz(200)
@given(data=payloads, skip_invalid=st.booleans())
def test_arbitrary_bytes_as_csv(scratch, data, skip_invalid):
    check_load(write(scratch, "bytes.csv", data), skip_invalid)


@fuzz(200)
@given(data=payloads, compress=st.booleans(), name=st.sampled_from(["bytes.jsonl.gz", "bytes.csv.gz"]),
       cut=st.none() | st.integers(0, 64))
def test_arbitrary_bytes_as_gzip(scratch, data, compress, name, cut):
    if compress:
        data = gzip.compress(data)
        if cut is not None:
            data = data[:cut]  # truncated gzip
    check_load(write(scratch, name, data))


# --- (d) structured JSONL ----------------------------------------------------------------

FLOAT_COLUMNS = ("cfg", "strength", "ip_scale", "lora_scale")
PATH_COLUMNS = ("init_image", "prompt_image", "model", "lora")
KEYS = COLUMNS + RESERVED + ("stpes", "promt", "sedd", "cgf", "note", "label", "", " id", "ID", "Prompt")
# Values that mean something to the validator, so that some rows pass and reach the stem checks.
PLAUSIBLE = (
    "", " ", "0", "1", "2", "3", "8", "64", " 8 ", "-1", "1e3", "1_000", "0x10", "nan", "inf", "-0", "٣٢", "0.5",
    ".", "..", "/", "/dev/null", "init.png", "prompt.png", "missing.png", "bytes.jsonl", "rows.jsonl",
    "tiny", "org/model", "x.safetensors", "~", "~/x.png", "C:\\x.png",
    *("txt2img", "img2img", "image_prompt", "ip_adapter", "clip_embed", *SCHEDULERS),
)
IDS = ("..", ".", "...", "../../etc/passwd", "a/b", "a\\b", "/abs", ".hidden", "-", "_", "__", "a\x00b",
       "~", "CON", "é", "A", "a", "a-0", "a-1", "row-1", "row-2", "x" * 199, "x" * 250, " ", "\t", "\u2028")
SAFE_BIG_INTS = (2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**20, 10**308)
BIG_INTS = SAFE_BIG_INTS + (2**1024, 10**400, -(10**400))  # float(10**400) raises OverflowError
# Each one of these once crashed load_manifest (regression cases below).
HOSTILE_TEXT = ("\ud800", "a\udfffb", "~nosuchuser", "~nosuchuser/x.png", "x\x00y", "a" * 300, "/" + "b" * 256)


def json_values(hostile: bool):
    texts = st.text(max_size=12) | st.sampled_from(PLAUSIBLE) | st.sampled_from(IDS)
    if hostile:
        texts |= st.sampled_from(HOSTILE_TEXT)
    scalars = (st.none() | st.booleans() | st.integers() | st.sampled_from(BIG_INTS if hostile else SAFE_BIG_INTS)
               | st.floats() | texts)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)


def _avoid_known_bugs(row: dict) -> dict:
    """Drop the values that triggered the fixed bugs (each kept as a regression case below) from a row."""
    row = dict(row)
    for column in FLOAT_COLUMNS:
        if type(row.get(column)) is int and abs(row[column]) >= 2**1024:
            del row[column]
    for column in PATH_COLUMNS:
        value = row.get(column)
        if isinstance(value, str):
            stripped = value.strip()
            if ("\x00" in value or any(len(part.encode()) > NAME_MAX for part in value.split("/"))
                    or (stripped.startswith("~") and stripped != "~" and not stripped.startswith("~/"))):
                del row[column]
    if isinstance(row.get("num_images"), (str, float)):  # "2.0" escapes the file-name collision check
        del row["num_images"]
    return row


def json_rows(hostile: bool):
    values = json_values(hostile)
    keys = st.sampled_from(KEYS) | st.text(max_size=6)
    if hostile:
        keys |= st.sampled_from(["\ud800"])
    anything = st.dictionaries(keys, values, max_size=6)
    plausible = st.fixed_dictionaries(
        {"prompt": st.text(min_size=1, max_size=20) | st.sampled_from(PLAUSIBLE)},
        optional={"id": st.sampled_from(IDS) | st.text(max_size=8) | st.integers() | st.floats(),
                  "num_images": st.integers(-1, 3), "steps": st.sampled_from(PLAUSIBLE) | st.integers(0, 3),
                  "width": st.sampled_from(PLAUSIBLE) | st.integers(-8, 64), "cfg": values, "seed": values,
                  "mode": st.sampled_from(PLAUSIBLE), "scheduler": st.sampled_from(PLAUSIBLE),
                  "init_image": st.sampled_from(PLAUSIBLE), "prompt_image": st.sampled_from(PLAUSIBLE),
                  "strength": values, "model": st.sampled_from(PLAUSIBLE), "lora": st.sampled_from(PLAUSIBLE),
                  "label": values, "negative_prompt": values})
    # rows that mostly validate, so that jobs come back and their file stems get checked
    leaning = st.fixed_dictionaries(
        {"prompt": st.text(min_size=1, max_size=20).filter(str.strip)},
        optional={"id": st.sampled_from(IDS) | st.text(max_size=8) | st.integers() | st.floats(),
                  "num_images": st.integers(1, 3), "steps": st.integers(1, 3), "label": values})
    rows = st.one_of(anything, plausible, leaning, leaning)
    return rows if hostile else rows.map(_avoid_known_bugs)


def jsonl_lines(hostile: bool):
    """One line of a JSONL file: an object, any other JSON value, or arbitrary text."""
    def dump(value, ascii_only):
        return json.dumps(value, ensure_ascii=ascii_only)  # NaN and Infinity as Python writes them

    objects = st.builds(dump, json_rows(hostile), st.booleans())
    others = st.builds(dump, json_values(hostile), st.booleans())
    return st.one_of(objects, objects, others, st.text(max_size=30))


def write_jsonl_lines(scratch: Path, lines: list[str], newline: str) -> Path:
    text = newline.join(lines) + newline
    # surrogatepass: a lone surrogate written raw is invalid UTF-8, which the reader must reject
    return write(scratch, "rows.jsonl", text.encode("utf-8", "surrogatepass"))


@fuzz(300)
@given(lines=st.lists(jsonl_lines(hostile=False), max_size=5), newline=st.sampled_from(["\n", "\r\n"]),
       skip_invalid=st.sampled_from([True, True, False]))
@example(lines=['{"id": "../../x", "prompt": "p"}', '{"id": "..", "prompt": "p"}', '{"id": "a\\\\b", "prompt": "p"}'],
         newline="\n", skip_invalid=False)
@example(lines=['{"id": "a", "prompt": "p", "num_images": 2}', '{"id": "A-1", "prompt": "p"}'], newline="\n",
         skip_invalid=True)
@example(lines=['{"prompt": NaN, "cfg": Infinity, "steps": -Infinity, "id": NaN}', "[]", "null", '"x"'],
         newline="\r\n", skip_invalid=True)
def test_structured_jsonl_rows(scratch, lines, newline, skip_invalid):
    check_load(write_jsonl_lines(scratch, lines, newline), skip_invalid)


KNOWN_JSONL_TRIGGERS = [
    '{"prompt": "p", "cfg": 1%s}' % ("0" * 400),
    '{"prompt": "p", "seed": 1%s}' % ("0" * 5000),
    "[" * 100_000,
    '{"prompt": "p", "init_image": "x\\u0000y"}',
    '{"prompt": "p", "model": "%s"}' % ("a" * 300),
    '{"prompt": "p", "lora": "~nosuchuser"}',
    '{"prompt": "a \\ud800 b"}',
    '{"id": "a", "prompt": "p", "num_images": 2.0}\n{"id": "a-0", "prompt": "q"}',
]


def _with_known_triggers(test):
    for trigger in KNOWN_JSONL_TRIGGERS:
        test = example(lines=[trigger], newline="\n", skip_invalid=False)(test)
    return test


@fuzz(100)
@given(lines=st.lists(jsonl_lines(hostile=True), max_size=5), newline=st.sampled_from(["\n", "\r\n"]),
       skip_invalid=st.booleans())
@_with_known_triggers
def test_structured_jsonl_rows_whole_space(scratch, lines, newline, skip_invalid):
    check_load(write_jsonl_lines(scratch, lines, newline), skip_invalid)


# --- (e) structured CSV ------------------------------------------------------------------

HEADER_SPECIALS = ("", " ", '"', '""', ",", "a,b", "\n", "a\nb", "\r", "\ufeff", "\ufeffid", "id ", "Unnamed: 0",
                   "id.1", "prompt.1", "0", "nan")


def csv_cells(hostile: bool):
    alphabet = st.characters(exclude_categories=("Cs",), exclude_characters="\x00~" if not hostile else "")
    cells = st.text(alphabet, max_size=10) | st.sampled_from(PLAUSIBLE) | st.sampled_from(IDS)
    if hostile:
        cells |= st.sampled_from(HOSTILE_TEXT[2:])  # a CSV holds no surrogates: it is decoded UTF-8
    return cells.filter(lambda c: hostile or "\x00" not in c)


def csv_text(hostile: bool):
    """Random headers and cells; or the real columns in any order with cells that mostly validate."""
    header_cells = st.sampled_from(COLUMNS + RESERVED + ("stpes", "label")) | st.sampled_from(HEADER_SPECIALS) \
        | st.text(max_size=6)
    header = st.lists(header_cells, min_size=1, max_size=6)
    rows = st.lists(st.lists(csv_cells(hostile), max_size=7), max_size=5)
    style = st.sampled_from(["minimal", "all", "raw"])
    newline = st.sampled_from(["\n", "\r\n", "\r"])
    random_csv = st.builds(_join_csv, header, rows, style, newline, st.booleans())

    cells = csv_cells(hostile)
    record = st.fixed_dictionaries({
        "id": st.sampled_from(IDS) | cells, "prompt": cells.filter(str.strip), "label": cells,
        "num_images": st.sampled_from(["", "1", "2", "3"])})
    leaning_csv = st.builds(lambda columns, records, *rest: _join_csv(columns, [[r[c] for c in columns] for r in records], *rest),
                            st.permutations(["id", "prompt", "label", "num_images"]), st.lists(record, min_size=1, max_size=5),
                            style, newline, st.booleans())
    return random_csv | leaning_csv


def _join_csv(header: list[str], rows: list[list[str]], style: str, newline: str, bom: bool) -> str:
    if style == "raw":  # what a careless script writes: no quoting at all
        text = newline.join(",".join(cells) for cells in [header, *rows]) + newline
    else:
        buffer = io.StringIO(newline="")
        quoting = csv.QUOTE_ALL if style == "all" else csv.QUOTE_MINIMAL
        csv.writer(buffer, quoting=quoting, lineterminator=newline).writerows([header, *rows])
        text = buffer.getvalue()
    return ("\ufeff" if bom else "") + text


@fuzz(300)
@given(text=csv_text(hostile=False), skip_invalid=st.sampled_from([True, True, False]))
@example(text="id,prompt\n..,p\n../x,p\na/b,p\n", skip_invalid=True)
@example(text='\ufeff"id","id",,"prompt\nx"\n"a","b","c","d"\n', skip_invalid=False)
@example(text='prompt,"unterminated\nx,y\n', skip_invalid=False)
def test_structured_csv(scratch, text, skip_invalid):
    check_load(write(scratch, "rows.csv", text.encode("utf-8")), skip_invalid)


@fuzz(100)
@given(text=csv_text(hostile=True), skip_invalid=st.booleans())
@example(text="prompt,model\np,~nosuchuser\n", skip_invalid=False)
@example(text="prompt,lora\np,%s\n" % ("a" * 300), skip_invalid=False)
def test_structured_csv_whole_space(scratch, text, skip_invalid):
    check_load(write(scratch, "rows.csv", text.encode("utf-8")), skip_invalid)


# --- known manifest bugs, one minimal input each -----------------------------------------

def _bug(data: str, name: str, reason: str):
    return pytest.param(data, name, id=reason.split(":")[0])


KNOWN_MANIFEST_BUGS = [
    _bug('{"prompt": "p", "cfg": 1%s}\n' % ("0" * 400), "m.jsonl",
         "huge-int-float-column: manifest.py _Row.number `parsed = kind(parsed)` raises OverflowError "
         "(float of an int >= 2**1024; also strength, ip_scale, lora_scale)"),
    _bug('{"prompt": "p", "ip_scale": -1%s}\n' % ("0" * 400), "m.jsonl",
         "huge-int-ip-scale: OverflowError even on a txt2img row (ip_scale is parsed for every row)"),
    _bug('{"prompt": "p", "seed": 1%s}\n' % ("0" * 5000), "m.jsonl",
         "int-over-4300-digits: manifest.py _read_jsonl json.loads raises ValueError (int max str digits), "
         "only JSONDecodeError is caught"),
    _bug("[" * 100_000 + "\n", "m.jsonl",
         "deep-nesting: manifest.py _read_jsonl json.loads raises RecursionError"),
    _bug('{"prompt": "p", "init_image": "x\\u0000y.png"}\n', "m.jsonl",
         "nul-in-image-path: manifest.py ImageChecker._open path.read_bytes() raises ValueError (embedded null byte)"),
    _bug('{"prompt": "p", "model": "%s"}\n' % ("a" * 300), "m.jsonl",
         "long-model-name: manifest.py _reference candidate.exists() raises OSError ENAMETOOLONG"),
    _bug('{"prompt": "p", "lora": "/%s/x.safetensors"}\n' % ("b" * 256), "m.jsonl",
         "long-lora-path: manifest.py _reference candidate.exists() raises OSError ENAMETOOLONG"),
    _bug('{"prompt": "p", "model": "~nosuchuser"}\n', "m.jsonl",
         "tilde-unknown-user-model: manifest.py _reference Path.expanduser() raises RuntimeError"),
    _bug('{"prompt": "p", "init_image": "~nosuchuser/a.png"}\n', "m.jsonl",
         "tilde-unknown-user-image: manifest.py ImageChecker.check Path.expanduser() raises RuntimeError"),
    _bug("prompt,lora\np,~nosuchuser\n", "m.csv",
         "tilde-unknown-user-csv: the same RuntimeError from a CSV cell"),
]


@pytest.mark.parametrize("data, name", KNOWN_MANIFEST_BUGS)
def test_known_manifest_crashes(tmp_path, data, name):
    with pytest.raises(ManifestError) as info:
        load_manifest(write(tmp_path, name, data.encode()))
    check_error(info.value)


@pytest.mark.parametrize("row", ['{"prompt": "a \\ud800 b"}', '{"id": "\\udfff", "prompt": "p"}',
                                 '{"prompt": "p", "label": "\\ud800"}', '{"prompt": "p", "\\ud800": 1}'])
def test_lone_surrogate_is_a_manifest_error(tmp_path, row):
    path = write(tmp_path, "m.jsonl", (row + "\n").encode())
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    check_error(info.value)


@pytest.mark.parametrize("count", ["2.0", "2e0", '"2.0"', '"2."'])
def test_file_name_collision_with_float_num_images(tmp_path, count):
    path = write(tmp_path, "m.jsonl",
                 ('{"id": "a", "prompt": "p", "num_images": %s}\n{"id": "a-0", "prompt": "q"}\n' % count).encode())
    try:
        manifest = load_manifest(path)
    except ManifestError as e:
        assert {(x.line, x.column) for x in e.errors} == {(2, "id")}
        return
    stems = [t.stem for job in manifest.jobs for t in job.images("")]
    assert len(stems) == len(set(stems)), stems


# --- 2. the parameters an image carries read back ----------------------------------------

BASE_JOB = Job(id="a", line=1, stem="a", mode="txt2img", prompt="p", negative_prompt="", width=64, height=64,
               steps=3, cfg=7.5, seed=42, num_images=1, scheduler="euler")
# st.text() leaves out surrogates; add the characters that break line-based readers.
hostile_text = st.text(st.characters(exclude_categories=("Cs",)) | st.sampled_from("\x00\r\n\t\x0b\x0c\x1b\x7f\x85\u2028\u2029\ufeff"),
                       max_size=60)


def job_with(scratch: Path, prompt: str, negative: str) -> Job:
    """Through the manifest reader where the row is valid (a prompt that is not blank), else built directly."""
    if not prompt.strip():
        return replace(BASE_JOB, prompt=prompt, negative_prompt=negative)
    row = {"id": "a", "prompt": prompt, "negative_prompt": negative, "steps": 3, "width": 64, "height": 64,
           "seed": 42, "scheduler": "euler"}
    job = load_manifest(write_jsonl(scratch / "one.jsonl", [row])).jobs[0]
    assert (job.prompt, job.negative_prompt) == (prompt, negative)  # carried unchanged, cleaned only on output
    return job


def check_infotext(text: str, prompt: str, negative: str) -> None:
    """What an A1111-style reader relies on: prompt lines, optional negative lines, then the fields."""
    lines = text.split("\n")
    prompt_lines = clean_text(prompt).split("\n")
    # a multi-line negative stays multi-line, as in A1111 (its reader joins every line before the last)
    negative_lines = clean_text(negative).split("\n") if negative else []
    assert len(lines) == len(prompt_lines) + len(negative_lines) + 1
    assert lines[-1].startswith("Steps: 3, Sampler: ")
    assert "\n".join(lines[:len(prompt_lines)]) == clean_text(prompt)
    if negative:
        negative_part = "\n".join(lines[len(prompt_lines):-1])
        assert negative_part.startswith("Negative prompt: ")
        assert negative_part.removeprefix("Negative prompt: ") == clean_text(negative)
    assert "\r" not in text and not any(c < " " and c not in "\t\n" for c in text)


@fuzz(120)
@given(prompt=hostile_text, negative=hostile_text)
@example(prompt="a\r\nb\rc\x00d", negative="")
@example(prompt="", negative="x\ny")
@example(prompt="Steps: 1, Sampler: x\nNegative prompt: fake", negative="\u2028")
def test_png_parameters_read_back(scratch, prompt, negative):
    from PIL import Image

    task = job_with(scratch, prompt, negative).images("")[0]
    text = infotext(task, "tiny")
    path = scratch / "a.png"
    save_image(Image.new("RGB", (8, 8)), path, "png", text, key="k")
    with Image.open(path) as image:
        assert image.text["parameters"] == text
    check_infotext(text, prompt, negative)


@fuzz(60)
@given(prompt=hostile_text, negative=hostile_text, fmt=st.sampled_from(["webp", "jpg"]))
@example(prompt="\U0001f600 emoji, 日本\u2028", negative="\x00", fmt="jpg")
def test_exif_user_comment_reads_back(scratch, prompt, negative, fmt):
    from PIL import Image

    text = infotext(job_with(scratch, prompt, negative).images("")[0], "tiny")
    path = scratch / f"a.{fmt}"
    save_image(Image.new("RGB", (8, 8)), path, fmt, text)
    with Image.open(path) as image:
        comment = image.getexif().get_ifd(0x8769)[0x9286]
    assert comment[:8] == b"UNICODE\0"
    assert comment[8:].decode("utf-16-be") == text
    check_infotext(text, prompt, negative)


# --- 3. the CLI answers garbage with exit 2 ----------------------------------------------

def _png_bytes(tmp_path: Path) -> bytes:
    return make_image(tmp_path / "source.png").read_bytes()


def _random_bytes(size: int = 4096) -> bytes:
    return random.Random(1234).randbytes(size)


def _directory(tmp_path: Path) -> Path:
    path = tmp_path / "folder.jsonl"
    path.mkdir()
    return path


VALID_ROW = '{"id": "a", "prompt": "a red fox"}\n'
GARBAGE = {
    "random-bytes-jsonl": ("m.jsonl", lambda tmp: _random_bytes()),
    "random-bytes-csv": ("m.csv", lambda tmp: _random_bytes()),
    "json-array-line": ("m.jsonl", lambda tmp: b'["id", "prompt"]\n[1, 2]\n'),
    "json-string-line": ("m.jsonl", lambda tmp: b'"a red fox"\n'),
    "json-number-lines": ("m.jsonl", lambda tmp: b"42\n3.5\n-1e400\nNaN\n"),
    "json-null-and-bool-lines": ("m.jsonl", lambda tmp: b"null\ntrue\n"),
    "nested-values": ("m.jsonl", lambda tmp: b'{"prompt": {"text": ["fox"]}, "steps": {"n": 3}, "id": [1]}\n'),
    "wrong-scalar-types": ("m.jsonl", lambda tmp: b'{"prompt": true, "steps": "many", "cfg": false, "seed": -1}\n'),
    "empty-jsonl": ("m.jsonl", lambda tmp: b""),
    "empty-csv": ("m.csv", lambda tmp: b""),
    "whitespace-jsonl": ("m.jsonl", lambda tmp: b" \n\t\r\n  \n"),
    "whitespace-csv": ("m.csv", lambda tmp: b"\n \r\n\t\n"),
    "bom-only-jsonl": ("m.jsonl", lambda tmp: b"\xef\xbb\xbf"),
    "utf16-bom-csv": ("m.csv", lambda tmp: "id,prompt\na,a red fox\n".encode("utf-16")),
    "utf16-bom-jsonl": ("m.jsonl", lambda tmp: VALID_ROW.encode("utf-16")),
    "utf16le-no-bom-jsonl": ("m.jsonl", lambda tmp: VALID_ROW.encode("utf-16-le")),
    "utf32-bom-csv": ("m.csv", lambda tmp: "id,prompt\na,a red fox\n".encode("utf-32")),
    "latin1-csv": ("m.csv", lambda tmp: "id,prompt\na,caf\u00e9 cr\u00e8me\n".encode("latin-1")),
    "truncated-gzip": ("m.jsonl.gz", lambda tmp: gzip.compress(VALID_ROW.encode() * 50)[:40]),
    "gzip-of-garbage": ("m.jsonl.gz", lambda tmp: gzip.compress(_random_bytes())),
    "not-gzip": ("m.jsonl.gz", lambda tmp: VALID_ROW.encode()),
    "png-renamed-csv": ("m.csv", _png_bytes),
    "png-renamed-jsonl": ("m.jsonl", _png_bytes),
    "csv-header-only": ("m.csv", lambda tmp: b"id,prompt,steps\n"),
    "csv-unterminated-quote": ("m.csv", lambda tmp: b'id,prompt\na,"a red fox\nb,a cat\n'),
    "csv-nul-byte": ("m.csv", lambda tmp: b"id,prompt\na,a red\x00fox\n"),
    "csv-unquoted-commas": ("m.csv", lambda tmp: b"id,prompt\na,red, green, blue\n"),
    "csv-empty-header-names": ("m.csv", lambda tmp: b",,\na,b,c\n"),
    "csv-duplicate-columns": ("m.csv", lambda tmp: b"prompt,prompt\na,b\n"),
    "jsonl-5mb-garbage-line": ("m.jsonl", lambda tmp: b"{" + b"garbage, " * (5 * 2**20 // 9) + b"\n"),
    "jsonl-5mb-invalid-utf8": ("m.jsonl", lambda tmp: b'{"prompt": "' + b"\xff\xfe\xfd" * (5 * 2**20 // 3) + b'"}\n'),
    "misspelt-columns": ("m.jsonl", lambda tmp: b'{"promt": "a red fox", "stpes": 3}\n'),
    "unknown-extension": ("m.txt", lambda tmp: VALID_ROW.encode()),
    "no-extension": ("manifest", lambda tmp: VALID_ROW.encode()),
    "directory": (None, _directory),
    "missing-file": (None, lambda tmp: tmp / "missing.jsonl"),
}


def _garbage_case(name: str):
    return pytest.param(*GARBAGE[name], id=name)


def _known_cli_bug(file_name: str, data: str, reason: str):
    return pytest.param(file_name, lambda tmp: data.encode(), id=reason.split(":")[0],
                        )


KNOWN_CLI_BUGS = [
    _known_cli_bug("m.jsonl", '{"prompt": "p", "cfg": 1%s}\n' % ("0" * 400),
                   "huge-int-cfg: OverflowError traceback (manifest.py _Row.number)"),
    _known_cli_bug("m.jsonl", "[" * 100_000 + "\n", "deep-nesting: RecursionError traceback (manifest.py _read_jsonl)"),
    _known_cli_bug("m.jsonl", '{"prompt": "p", "init_image": "x\\u0000y.png"}\n',
                   "nul-in-image-path: ValueError traceback (manifest.py ImageChecker._open)"),
    _known_cli_bug("m.jsonl", '{"prompt": "p", "model": "%s"}\n' % ("a" * 300),
                   "long-model-name: OSError ENAMETOOLONG traceback (manifest.py _reference)"),
    _known_cli_bug("m.csv", "prompt,model\np,~nosuchuser\n",
                   "tilde-unknown-user: RuntimeError traceback (manifest.py _reference expanduser)"),
    _known_cli_bug("m.jsonl", '{"id": "s", "prompt": "a \\ud800 b"}\n',
                   "lone-surrogate: validate says valid (exit 0); run crashes in checkpoint.py sync "
                   "with UnicodeEncodeError after creating the output folder"),
]


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("file_name, build", [_garbage_case(name) for name in GARBAGE] + KNOWN_CLI_BUGS)
def test_garbage_manifest_exits_2(tmp_path, capsys, command, file_name, build):
    made = build(tmp_path)
    manifest = made if isinstance(made, Path) else write(tmp_path, file_name, made)
    out = tmp_path / "out"
    args = ["validate", manifest] if command == "validate" else ["run", manifest, *FAST, "--out", out]

    code = cli(*args)

    captured = capsys.readouterr()
    assert code == 2, captured
    assert "Traceback" not in captured.out + captured.err
    assert captured.err.startswith("error:"), captured.err[:300]
    assert len(captured.err.strip()) > len("error:")
    assert not [p for p in (out / "images").glob("*") if p.is_file()]


def test_jpg_with_a_very_long_prompt_does_not_crash_the_run(tmp_path, capsys):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "long", "prompt": "fox " * 10_000}])
    out = tmp_path / "out"

    code = cli("run", manifest, *FAST, "--format", "jpg", "--out", out)

    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert code in (0, 1)  # written (parameters cut to fit) or recorded as a failed job, not a crash
