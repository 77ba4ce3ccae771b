"""Manifest reading and validation: formats, every error class, seeds, extras, job keys."""
from __future__ import annotations

import gzip
import json
import random
import shutil
from pathlib import Path

import pytest

from batch.config import Defaults
from batch.errors import ManifestError
from batch.manifest import derive_seed, file_stem, load_manifest
from conftest import make_image, write_jsonl


def errors_of(path: Path, **kwargs) -> list:
    with pytest.raises(ManifestError) as info:
        load_manifest(path, **kwargs)
    return info.value.errors


def where(errors) -> set[tuple]:
    return {(e.line, e.column) for e in errors}


# --- CSV ---------------------------------------------------------------------------------

TRICKY = "Ünïcode 日本 — ok\nsecond line, with a comma"


def test_csv_bom_crlf_quotes_multiline_unicode_and_extra_column(tmp_path):
    body = (
        "id,prompt,label,steps\r\n"
        'a,"red, green and blue",cat,3\r\n'
        f'b,"{TRICKY}",dog,4\r\n'
        "c,plain,,5\r\n"
    )
    path = tmp_path / "m.csv"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))

    jobs = load_manifest(path).jobs

    assert [j.id for j in jobs] == ["a", "b", "c"]  # the BOM is not glued to the first column name
    assert jobs[0].prompt == "red, green and blue"
    assert jobs[1].prompt == TRICKY
    assert [j.steps for j in jobs] == [3, 4, 5]
    assert jobs[0].extra == (("label", "cat"),)
    assert jobs[1].extra == (("label", "dog"),)
    assert jobs[2].extra == (("label", None),)  # empty cell: no value
    assert [j.line for j in jobs] == [2, 3, 5]  # b spans lines 3-4


def test_csv_row_after_multiline_record_reports_its_physical_line(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('id,prompt,steps\na,"one\ntwo\nthree",3\nb,fine,many\n', encoding="utf-8")

    errors = errors_of(path)

    assert where(errors) == {(5, "steps")}
    assert errors[0].value == "many"
    assert "line 5" in str(errors[0])


def test_csv_values_stay_text(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,prompt,code\n007,x,0012\n", encoding="utf-8")
    job = load_manifest(path).jobs[0]
    assert job.id == "007"
    assert job.extra == (("code", "0012"),)


def test_csv_unquoted_comma_in_first_row_is_an_error(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,prompt\nr1,hello, world\n", encoding="utf-8")
    errors_of(path)  # today: one job with id 'hello' and prompt ' world'


def test_csv_cr_only_line_ends_with_quotes_give_manifest_error_or_jobs(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(b'id,prompt,steps\rr1,"a, b",3\rr2,x,4\r')
    try:
        jobs = load_manifest(path).jobs
    except ManifestError:
        return
    assert [j.prompt for j in jobs] == ["a, b", "x"]


def test_csv_blank_line_without_trailing_newline_keeps_line_numbers(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,prompt,steps\na,x,3\n\nb,y,bad", encoding="utf-8")
    assert where(errors_of(path)) == {(4, "steps")}


# --- JSONL -------------------------------------------------------------------------------


def test_jsonl_bad_lines_reported_and_blank_lines_skipped(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        '{"id": "a", "prompt": "x"}\n'
        "\n"
        "   \n"
        '{"id": "b", "prompt": \n'
        "[1, 2]\n"
        '"just text"\n'
        "42\n"
        '{"id": "c", "prompt": "y"}\n',
        encoding="utf-8",
    )

    errors = errors_of(path)

    assert where(errors) == {(4, None), (5, None), (6, None), (7, None)}
    assert "invalid JSON" in errors[0].allowed
    assert all("JSON object" in e.allowed for e in errors[1:])


def test_jsonl_blank_lines_keep_line_numbers(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('\n{"id": "a", "prompt": "x"}\n\n\n{"id": "b", "prompt": "y"}\n\n', encoding="utf-8")
    assert [(j.id, j.line) for j in load_manifest(path).jobs] == [("a", 2), ("b", 5)]


def test_jsonl_with_bom_and_crlf(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"id": "a", "prompt": "Ünïcode 日本"}\r\n{"id": "b", "prompt": "y"}\r\n'.encode())
    assert [(j.id, j.prompt, j.line) for j in load_manifest(path).jobs] == [("a", "Ünïcode 日本", 1), ("b", "y", 2)]


def test_jsonl_gz_is_read(tmp_path):
    path = tmp_path / "m.jsonl.gz"
    rows = [{"id": "a", "prompt": "日本"}, {"id": "b", "prompt": "y", "steps": 7}]
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    jobs = load_manifest(path).jobs
    assert [(j.id, j.prompt, j.steps) for j in jobs] == [("a", "日本", 25), ("b", "y", 7)]


@pytest.mark.parametrize("char", ["\u2028", "\u0085"])
def test_jsonl_unicode_line_separator_inside_a_string(tmp_path, char):
    path = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": f"before{char}after"}])
    assert load_manifest(path).jobs[0].prompt == f"before{char}after"


# --- files that are not manifests --------------------------------------------------------


def _random_bytes(n: int = 4096) -> bytes:
    rng = random.Random(1234)
    return bytes(rng.getrandbits(8) for _ in range(n))


@pytest.mark.parametrize("name, data", [
    ("utf16.csv", "id,prompt\na,hello\n".encode("utf-16")),
    ("utf16le.jsonl", '{"id": "a", "prompt": "x"}\n'.encode("utf-16-le")),
    ("empty.csv", b""),
    ("empty.jsonl", b""),
    ("blank.jsonl", b"\n\n  \n"),
    ("header-only.csv", b"id,prompt\n"),
    ("random.csv", _random_bytes()),
    ("random.jsonl", _random_bytes()),
    ("random.jsonl.gz", _random_bytes()),
    ("prompts.txt", b"id,prompt\na,hello\n"),
])
def test_unreadable_files_raise_manifest_error(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    assert errors_of(path)  # ManifestError with at least one error, nothing else


def test_missing_file_raises_manifest_error(tmp_path):
    assert "not found" in errors_of(tmp_path / "nope.csv")[0].allowed


def test_corrupt_gzip_body_raises_manifest_error(tmp_path):
    path = tmp_path / "m.jsonl.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00" + _random_bytes(200))
    errors_of(path)


# --- every error class at once -----------------------------------------------------------


def test_every_error_reported_at_once_with_line_and_column(images_dir):
    (images_dir / "garbage.png").write_bytes(_random_bytes(300))
    (images_dir / "adir").mkdir()
    rows = [
        {"id": "ok1", "prompt": "fine"},                                                     # 1
        {"id": "r2", "prompt": "x", "stpes": 5},                                             # 2
        {"id": "r3", "Prompt": "x"},                                                         # 3
        {"id": "r4", "prompt": "x", "steps": "ten", "cfg": "high", "width": 64.5},           # 4
        {"id": "r5", "prompt": "x", "init_image": "init.png", "strength": 0},                # 5
        {"id": "r6", "prompt": "x", "init_image": "init.png", "strength": 1.5},              # 6
        {"id": "r7", "prompt": "x", "width": 500},                                           # 7
        {"id": "r8", "prompt": "x", "scheduler": "eulr"},                                    # 8
        {"id": "r9", "prompt": "x", "mode": "text2img"},                                     # 9
        {"id": "r10"},                                                                       # 10
        {"id": "r11", "mode": "img2img", "init_image": "init.png"},                          # 11
        {"id": "r12", "mode": "img2img", "prompt": "x"},                                     # 12
        {"id": "r13", "prompt": "x", "init_image": "missing.png"},                           # 13
        {"id": "r14", "prompt": "x", "init_image": "garbage.png"},                           # 14
        {"id": "r15", "prompt": "x", "init_image": "adir"},                                  # 15
        {"id": "r16", "prompt_image": "garbage.png", "image_prompt_method": "clip_embed"},   # 16
        {"id": "r17", "prompt_image": "missing.png", "image_prompt_method": "clip_embed"},   # 17
        {"id": "r18", "mode": "image_prompt", "image_prompt_method": "clip_embed"},          # 18
        {"id": "ok1", "prompt": "again"},                                                    # 19
        {"id": "a/b", "prompt": "x"},                                                        # 20
        {"id": "a_b", "prompt": "x"},                                                        # 21
        {"id": "x", "prompt": "x", "num_images": 2},                                         # 22
        {"id": "x-1", "prompt": "x"},                                                        # 23
        {"id": "r24", "prompt": "x", "lora": "loras/missing.safetensors"},                   # 24
        {"id": "r25", "prompt": "x", "model": "./no-such-model"},                            # 25
        {"id": "r26", "prompt": "x", "lora_scale": 0.5},                                     # 26
        {"id": "r27", "prompt": "x", "seed": -1},                                            # 27
        {"id": "r28", "prompt": "x", "num_images": 0},                                       # 28
        {"id": "..", "prompt": "x"},                                                         # 29
        {"id": "r30", "prompt": "x", "init_image": "init.png", "mode": "txt2img"},           # 30
    ]
    path = write_jsonl(images_dir / "bad.jsonl", rows)

    errors = errors_of(path)

    expected = {
        (2, "stpes"), (3, "Prompt"), (3, "prompt"),
        (4, "steps"), (4, "cfg"), (4, "width"),
        (5, "strength"), (6, "strength"), (7, "width"), (8, "scheduler"), (9, "mode"),
        (10, "prompt"), (11, "prompt"), (12, "init_image"),
        (13, "init_image"), (14, "init_image"), (15, "init_image"),
        (16, "prompt_image"), (17, "prompt_image"), (18, "prompt_image"),
        (19, "id"), (21, "id"), (23, "id"),
        (24, "lora"), (25, "model"), (26, "lora_scale"),
        (27, "seed"), (28, "num_images"), (29, "id"), (30, "init_image"),
    }
    assert where(errors) == expected
    assert len(errors) == len(expected)
    assert [e.line for e in errors] == sorted(e.line for e in errors)  # file order

    by_place = {(e.line, e.column): e for e in errors}
    assert "did you mean 'steps'" in by_place[2, "stpes"].allowed
    assert "did you mean 'prompt'" in by_place[3, "Prompt"].allowed
    assert "did you mean 'euler'" in by_place[8, "scheduler"].allowed
    assert "multiple of 8" in by_place[7, "width"].allowed
    assert by_place[5, "strength"].value == 0 and by_place[6, "strength"].value == 1.5
    assert "not found" in by_place[13, "init_image"].allowed
    assert "not a readable image" in by_place[14, "init_image"].allowed
    assert "folder" in by_place[15, "init_image"].allowed
    assert "line 1" in by_place[19, "id"].allowed
    assert "a/b" in by_place[21, "id"].allowed and "line 20" in by_place[21, "id"].allowed
    assert "x-1" in by_place[23, "id"].allowed
    for place in ((24, "lora"), (25, "model")):
        assert "not found" in by_place[place].allowed
    assert "needs a lora" in by_place[26, "lora_scale"].allowed
    assert all(e.line == 1 or str(e).startswith(f"line {e.line}, column '{e.column}'") for e in errors)


def test_csv_errors_carry_line_column_and_value(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,prompt,stpes,width\na,x,3,64\nb,,3,63\n", encoding="utf-8")
    errors = errors_of(path)
    assert where(errors) == {(2, "stpes"), (3, "prompt"), (3, "width")}
    width = next(e for e in errors if e.column == "width")
    assert width.value == 63


def test_duplicate_of_an_invalid_row_is_reported_too(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "x", "prompt": "a", "steps": "bad"},
        {"id": "x", "prompt": "b"},
    ])
    assert where(errors_of(path)) == {(1, "steps"), (2, "id")}


def test_case_only_difference_in_ids_collides(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"id": "Cat", "prompt": "a"}, {"id": "cat", "prompt": "b"}])
    assert where(errors_of(path)) == {(2, "id")}


HOSTILE_IDS = ["../../etc/passwd", "/abs", "..", ".hidden", "a\\b\\c", "....", "./x", "~/x", "a/../../b"]


def test_hostile_ids_give_safe_file_stems_or_an_id_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    path = write_jsonl(tmp_path / "m.jsonl", [{"id": i, "prompt": "x"} for i in HOSTILE_IDS])

    manifest = load_manifest(path, skip_invalid=True)

    for job in manifest.jobs:
        assert "/" not in job.stem and "\\" not in job.stem, job.id
        assert not job.stem.startswith("."), job.id
        for task in job.images(""):
            target = (out / f"{task.stem}.png").resolve()
            assert target.parent == out.resolve(), job.id
    rejected = {raw["id"] for _, raw, errs in manifest.invalid if [e.column for e in errs] == ["id"]}
    assert {j.id for j in manifest.jobs} | rejected == set(HOSTILE_IDS)
    assert ".." in rejected  # nothing file-like is left of it


@pytest.mark.parametrize("job_id", HOSTILE_IDS)
def test_file_stem_never_escapes(tmp_path, job_id):
    stem = file_stem(job_id)
    assert "/" not in stem and "\\" not in stem and not stem.startswith(".")
    assert Path(tmp_path, stem).resolve().parent == tmp_path.resolve()


# --- paths, seeds, extras ------------------------------------------------------------------


def test_relative_image_paths_resolve_against_manifest_folder(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    (folder / "imgs").mkdir(parents=True)
    make_image(folder / "imgs" / "init.png")
    make_image(folder / "imgs" / "ref.png", (0, 0, 255))
    write_jsonl(folder / "m.jsonl", [
        {"id": "i", "prompt": "x", "init_image": "imgs/init.png"},
        {"id": "p", "prompt_image": "imgs/ref.png", "image_prompt_method": "clip_embed"},
    ])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    jobs = load_manifest(Path("..") / "data" / "m.jsonl").jobs

    assert Path(jobs[0].init_image) == (folder / "imgs" / "init.png").resolve()
    assert Path(jobs[1].prompt_image) == (folder / "imgs" / "ref.png").resolve()
    assert jobs[0].mode == "img2img" and jobs[1].mode == "image_prompt"


def test_absolute_image_path_is_kept(tmp_path):
    image = make_image(tmp_path / "abs.png")
    sub = tmp_path / "sub"
    sub.mkdir()
    path = write_jsonl(sub / "m.jsonl", [{"id": "i", "prompt": "x", "init_image": str(image)}])
    assert Path(load_manifest(path).jobs[0].init_image) == image.resolve()


def test_derived_seeds_are_stable_and_depend_on_id_and_run_seed(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "a", "prompt": "x"}, {"id": "b", "prompt": "x"}, {"id": "c", "prompt": "x", "seed": 42},
    ])
    first = load_manifest(path, run_seed=5).jobs
    again = load_manifest(path, run_seed=5).jobs
    other_run = load_manifest(path, run_seed=6).jobs

    assert first[0].seed == derive_seed(5, "a") == again[0].seed
    assert first[1].seed == derive_seed(5, "b")
    assert first[0].seed != first[1].seed
    assert other_run[0].seed == derive_seed(6, "a") != first[0].seed
    assert first[2].seed == other_run[2].seed == 42  # an explicit seed ignores the run seed


def test_row_without_id_gets_row_line_id(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "x"}, {"prompt": "y"}])
    jobs = load_manifest(path).jobs
    assert [j.id for j in jobs] == ["row-1", "row-2"]
    assert jobs[0].seed == derive_seed(0, "row-1")


def test_image_k_uses_seed_plus_k(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "a", "prompt": "x", "seed": 100, "num_images": 3},
        {"id": "b", "prompt": "x", "num_images": 2},
    ])
    a, b = load_manifest(path).jobs
    assert [(t.k, t.seed, t.stem) for t in a.images("")] == [(0, 100, "a-0"), (1, 101, "a-1"), (2, 102, "a-2")]
    assert [t.seed for t in b.images("")] == [b.seed, b.seed + 1]
    assert len({t.key for t in a.images("")}) == 3


def test_defaults_fill_empty_cells(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,prompt,steps,cfg,width,scheduler\na,x,,,,\n", encoding="utf-8")
    defaults = Defaults(steps=9, cfg=3.5, width=128, height=96, scheduler="ddim")
    job = load_manifest(path, defaults=defaults).jobs[0]
    assert (job.steps, job.cfg, job.width, job.height, job.scheduler) == (9, 3.5, 128, 96, "ddim")


def test_extra_columns_carried_unchanged_with_json_types(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{
        "id": "a", "prompt": "x", "label": "cat", "score": 0.25, "count": 3,
        "tags": ["a", "b"], "meta": {"k": [1, 2]}, "ok": True, "none": None,
    }])
    job = load_manifest(path).jobs[0]
    assert job.extra == (
        ("label", "cat"), ("score", 0.25), ("count", 3), ("tags", ["a", "b"]),
        ("meta", {"k": [1, 2]}), ("ok", True), ("none", None),
    )
    assert type(dict(job.extra)["count"]) is int


# --- skip_invalid --------------------------------------------------------------------------


def test_skip_invalid_returns_valid_jobs_and_invalid_rows(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        '{"id": "a", "prompt": "x"}\n'
        '{"id": "b", "prompt": "x", "steps": 0}\n'
        "not json\n"
        '{"id": "c", "prompt": "y"}\n'
        '{"id": "a", "prompt": "dup"}\n',
        encoding="utf-8",
    )

    manifest = load_manifest(path, skip_invalid=True)

    assert [j.id for j in manifest.jobs] == ["a", "c"]
    assert [line for line, _, _ in manifest.invalid] == [2, 3, 5]
    by_line = {line: (raw, errs) for line, raw, errs in manifest.invalid}
    assert by_line[2][0]["id"] == "b" and [e.column for e in by_line[2][1]] == ["steps"]
    assert "invalid JSON" in by_line[3][1][0].allowed
    assert by_line[5][0]["prompt"] == "dup" and by_line[5][1][0].column == "id"


def test_skip_invalid_still_raises_for_misspelt_column(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "x", "widht": 64}])
    errors = errors_of(path, skip_invalid=True)
    assert where(errors) == {(2, "widht")}
    assert "did you mean 'width'" in errors[0].allowed


@pytest.mark.parametrize("column", ["Steps", "STEPS", " steps", "negative prompt", "strenght", "num_image", "init_img"])
def test_near_miss_column_names_are_errors(tmp_path, column):
    path = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": "x", column: "1"}])
    assert where(errors_of(path)) == {(1, column)}


@pytest.mark.parametrize("column", ["sedd", "cgf"])
def test_one_typo_in_a_short_column_name_is_an_error(tmp_path, column):
    path = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": "x", column: 3}])
    assert where(errors_of(path)) == {(1, column)}


def test_skip_invalid_with_no_valid_rows_returns_no_jobs(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"id": "a"}, {"id": "b", "steps": -1, "prompt": "x"}])
    manifest = load_manifest(path, skip_invalid=True)
    assert manifest.jobs == [] and len(manifest.invalid) == 2


# --- job keys ------------------------------------------------------------------------------


def _key(folder: Path, row: dict, name: str = "m.jsonl") -> str:
    path = write_jsonl(folder / name, [{"id": "a", **row}])
    return load_manifest(path).jobs[0].images("")[0].key


BASE = {"prompt": "a fox", "seed": 1, "steps": 3, "label": "one"}


@pytest.mark.parametrize("change", [
    {"prompt": "a dog"}, {"seed": 2}, {"steps": 4}, {"cfg": 3.0}, {"width": 64},
    {"scheduler": "euler"}, {"negative_prompt": "blurry"},
])
def test_key_changes_with_pixel_parameters(tmp_path, change):
    assert _key(tmp_path, {**BASE, **change}) != _key(tmp_path, BASE)


def test_key_ignores_extra_columns_and_id_order(tmp_path):
    key = _key(tmp_path, BASE)
    assert _key(tmp_path, {**BASE, "label": "two"}) == key
    assert _key(tmp_path, {**BASE, "new_label": [1, 2]}) == key
    assert _key(tmp_path, BASE, "other.jsonl") == key  # same settings, same key across loads


def test_key_follows_init_image_contents_not_path(tmp_path):
    row = {"prompt": "x", "seed": 1, "init_image": "init.png"}
    make_image(tmp_path / "init.png", (200, 0, 0))
    red = _key(tmp_path, row)
    make_image(tmp_path / "init.png", (0, 0, 200))
    blue = _key(tmp_path, row)
    shutil.copy(tmp_path / "init.png", tmp_path / "copy.png")
    copy = _key(tmp_path, {**row, "init_image": "copy.png"})

    assert red != blue
    assert copy == blue


def test_key_depends_on_salt_and_k(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": "x", "num_images": 2}])
    job = load_manifest(path).jobs[0]
    plain, salted = job.images(""), job.images("|model=tiny")
    assert plain[0].key != plain[1].key
    assert plain[0].key != salted[0].key
