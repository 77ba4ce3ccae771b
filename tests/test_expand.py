"""Prompt templates (`expand`, dynamicprompts) and sweeps (`sweep`, grids): counts, determinism, refusals, runs."""
from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import FAST, REPO, SLOW, cli, pixels, read_metadata, start_run, wait_for_done, write_jsonl

from batch.expand import DEFAULT_MAX_ROWS
from batch.grids import INFO_KEY, read_layout
from batch.manifest import derive_seed, expand_manifest, load_manifest


@pytest.fixture
def wildcards(tmp_path):
    """`__shape__` at the top, `__sub/colour__` in a sub-folder (which itself uses a wildcard)."""
    folder = tmp_path / "wildcards"
    (folder / "sub").mkdir(parents=True)
    (folder / "shape.txt").write_text("circle\nsquare\n\ntriangle\n", encoding="utf-8")
    (folder / "sub" / "colour.txt").write_text("red\n__warm__\n", encoding="utf-8")
    (folder / "warm.txt").write_text("yellow\norange\n", encoding="utf-8")
    return folder


def _jobs(tmp_path, rows, **kwargs):
    return load_manifest(write_jsonl(tmp_path / "m.jsonl", rows), **kwargs).jobs


def _expand_cli(manifest, out, *options, hash_seed="0"):
    """`sdbatch expand` in its own process (another hash seed: nothing may depend on it)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), PYTHONHASHSEED=hash_seed)
    return subprocess.run([sys.executable, "-m", "batch.cli", "expand", str(manifest), "-o", str(out), *options],
                          env=env, capture_output=True, text=True, timeout=60)


# --- what a template yields ------------------------------------------------------------------------

@pytest.mark.parametrize("template, prompts", [
    ("a {red|green} {circle|square}", ["a red circle", "a red square", "a green circle", "a green square"]),
    ("{2$$a|b|c}", ["a,b", "a,c", "b,a", "b,c", "c,a", "c,b"]),  # ordered picks of 2 distinct options
    ("{2$$ and $$a|b|c}", ["a and b", "a and c", "b and a", "b and c", "c and a", "c and b"]),
    ("{1-2$$a|b|c}", ["a", "b", "c", "a,b", "a,c", "b,a", "b,c", "c,a", "c,b"]),  # a range of counts
    ("{a|a|b}", ["a", "b"]),  # equal options: once
    ("no template at all", ["no template at all"]),
])
def test_expand_all_yields_every_combination(tmp_path, template, prompts):
    jobs = _jobs(tmp_path, [{"id": "t", "prompt": template, "expand": "all", "seed": 40}])
    assert [j.prompt for j in jobs] == prompts
    assert [j.id for j in jobs] == [f"t-{k}" for k in range(len(prompts))]
    assert [j.seed for j in jobs] == [40 + k for k in range(len(prompts))]
    assert all(dict(j.extra)["template"] == template for j in jobs)


def test_prompt_and_negative_templates_combine_and_seeds_never_collide(tmp_path):
    rows = [{"id": "p", "prompt": "{red|blue} circle", "negative_prompt": "{dark|blurry|noisy}", "expand": "all",
             "num_images": 2, "seed": 10},
            {"id": "n", "prompt": "a {red|blue} square", "expand": 5},  # no seed: derived from (run seed, id)
            {"id": "plain", "prompt": "{not|expanded}"}]
    jobs = _jobs(tmp_path, rows, run_seed=3)
    combos = [(j.prompt, j.negative_prompt) for j in jobs if j.id.startswith("p-")]
    assert combos == [(c, n) for c in ("red circle", "blue circle") for n in ("dark", "blurry", "noisy")]
    assert dict(jobs[0].extra) == {"template": "{red|blue} circle", "negative_template": "{dark|blurry|noisy}"}
    seeds = [t.seed for j in jobs if j.id.startswith("p-") for t in j.images("")]
    assert seeds == list(range(10, 22))  # row e, image j: seed + e * num_images + j
    draws = [j for j in jobs if j.id.startswith("n-")]
    assert len(draws) == 5 and {j.prompt for j in draws} <= {"a red square", "a blue square"}
    assert [j.seed for j in draws] == [derive_seed(3, "n") + k for k in range(5)]
    assert jobs[-1].id == "plain" and jobs[-1].prompt == "{not|expanded}"  # no `expand`: the text as written


def test_wildcards_from_a_folder_and_a_sub_folder(tmp_path, wildcards):
    rows = [{"id": "w", "prompt": "a __sub/colour__ __shape__", "expand": "all", "seed": 1}]
    jobs = _jobs(tmp_path, rows, wildcards=wildcards)
    # dynamicprompts sorts each file's entries; `__warm__` inside sub/colour.txt expands in place
    assert [j.prompt for j in jobs] == [f"a {c} {s}" for c in ("orange", "yellow", "red")
                                        for s in ("circle", "square", "triangle")]


def test_csv_cells_expand_and_sweep(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('id,prompt,expand,sweep,seed,label\n'
                    'a,"a {red|green} circle",all,,5,x\n'
                    'b,a blue square,,"{""steps"": [2, 3], ""cfg"": [1, 7.5]}",9,y\n'
                    'c,"a {red|green} circle",,,,z\n', encoding="utf-8")
    jobs = load_manifest(path).jobs
    assert [(j.id, j.prompt, j.seed, j.line) for j in jobs[:2]] == [("a-0", "a red circle", 5, 2),
                                                                    ("a-1", "a green circle", 6, 2)]
    cells = [(j.id, j.steps, j.cfg, j.seed, j.line) for j in jobs[2:6]]
    assert cells == [("b-0", 2, 1.0, 9, 3), ("b-1", 3, 1.0, 9, 3), ("b-2", 2, 7.5, 9, 3), ("b-3", 3, 7.5, 9, 3)]
    assert dict(jobs[2].extra)["grid"] == {"id": "b", "axes": ["steps", "cfg"], "shape": [2, 2], "cell": [0, 0]}
    assert jobs[-1].id == "c" and "expand" not in dict(jobs[-1].extra) and dict(jobs[-1].extra) == {"label": "z"}


def test_expand_is_the_same_in_other_processes(tmp_path, wildcards):
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "all", "prompt": "a {red|green|__sub/colour__} __shape__", "negative_prompt": "{dark|}", "expand": "all"},
        {"id": "draw", "prompt": "a {~red|green} {2$$__shape__|star|{big|small} dot}", "expand": 6},
        {"id": "sw", "prompt": "a __shape__", "expand": 2, "seed": 4, "sweep": {"cfg": [1, 7.5], "steps": [2, 3, 4]}},
    ])
    outputs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"rows{hash_seed}.jsonl"
        done = _expand_cli(manifest, out, "--wildcards", wildcards, "--seed", "7", hash_seed=hash_seed)
        assert done.returncode == 0, done.stderr
        assert "line 1 (all): 24 rows" in done.stdout and "42 rows (3 expanded)" in done.stdout
        outputs.append(out.read_text(encoding="utf-8"))
    assert outputs[0] == outputs[1]
    rows, _ = expand_manifest(manifest, 7, wildcards)
    assert [json.loads(line) for line in outputs[0].splitlines()] == rows
    assert len({(r["prompt"], r.get("negative_prompt"), r["seed"]) for r in rows if r["id"].startswith("all")}) == 24
    # an expanded row that is swept: <id>-<e>-<s>, one grid per expanded row, every cell on its row's seed
    swept = [r for r in rows if r["id"].startswith("sw-")]
    assert [r["id"] for r in swept[:7]] == ["sw-0-0", "sw-0-1", "sw-0-2", "sw-0-3", "sw-0-4", "sw-0-5", "sw-1-0"]
    assert {r["seed"] for r in swept[:6]} == {4} and {r["seed"] for r in swept[6:]} == {5}
    assert swept[1]["grid"] == {"id": "sw-0", "axes": ["cfg", "steps"], "shape": [2, 3], "cell": [1, 0]}


# --- refusals ----------------------------------------------------------------------------------------

def _refused(capsys, *args) -> str:
    capsys.readouterr()
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ")
    return err


def test_missing_wildcard_file_is_refused_with_line_and_column(tmp_path, wildcards, capsys):
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "ok", "prompt": "a __shape__", "expand": "all"},
        {"id": "bad", "prompt": "a red circle", "negative_prompt": "__nothing/here__", "expand": 2},
    ])
    err = _refused(capsys, "validate", manifest, "--model", "tiny", "--device", "cpu", "--wildcards", wildcards)
    assert "line 2, column 'negative_prompt'" in err and "__nothing/here__" in err and "not found" in err
    assert "line 1" not in err
    err = _refused(capsys, "validate", manifest, "--model", "tiny", "--device", "cpu")  # no folder at all
    assert "line 1, column 'prompt'" in err and "--wildcards" in err
    out = tmp_path / "rows.jsonl"
    assert "line 2, column 'negative_prompt'" in _refused(capsys, "expand", manifest, "-o", out, "--wildcards", wildcards)
    assert not out.exists()
    assert "not a folder" in _refused(capsys, "expand", manifest, "-o", out, "--wildcards", tmp_path / "nope")


def test_too_many_rows_are_refused_quickly_without_enumerating(tmp_path, capsys):
    ten = "{" + "|".join("abcdefghij") + "}"
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "fine", "prompt": "{2$$a|b|c} {x|y}", "expand": "all"},  # 12 rows
        {"id": "huge", "prompt": ten * 12, "expand": "all"},  # 10^12 rows: counted, never listed
    ])
    started = time.perf_counter()
    err = _refused(capsys, "validate", manifest, "--model", "tiny", "--device", "cpu")
    assert time.perf_counter() - started < 10
    assert "line 2, column 'expand'" in err and "1,000,000,000,000 rows" in err
    assert f"--max-rows {DEFAULT_MAX_ROWS:,}" in err and "line 1" not in err
    # the count is exact: 12 rows pass --max-rows 12 and fail --max-rows 11, naming the count
    small = write_jsonl(tmp_path / "small.jsonl", [{"id": "fine", "prompt": "{2$$a|b|c} {x|y}", "expand": "all"}])
    assert cli("validate", small, "--model", "tiny", "--device", "cpu", "--max-rows", "12") == 0
    assert "12 rows (12 prompts x 1 sweep cell)" in _refused(capsys, "validate", small, "--model", "tiny",
                                                              "--device", "cpu", "--max-rows", "11")
    sweep = write_jsonl(tmp_path / "sweep.jsonl", [
        {"id": "s", "prompt": "x", "sweep": {"cfg": [1, 2, 3], "steps": [1, 2], "width": [64, 128]}},  # 12 cells
        {"id": "t", "prompt": "x", "sweep": {"cfg": [1], "steps": [2], "seed": [1], "width": [64]}},  # 4 axes
        {"id": "u", "prompt": "x", "sweep": {"cfg": ["lots"], "steps": [2, 3]}},  # a value its column refuses
        {"id": "v", "prompt": "x", "expand": "many"},
    ])
    err = _refused(capsys, "validate", sweep, "--model", "tiny", "--device", "cpu", "--max-rows", "10")
    assert "line 1, column 'sweep'" in err and "12 cells, over --max-rows 10" in err
    assert "line 2, column 'sweep'" in err and "at most 3" in err
    assert "line 3, column 'cfg': 'lots'" in err and err.count("'lots'") == 1  # the row once, not once per cell
    assert "line 4, column 'expand': 'many'" in err


def test_validate_reports_the_rows_each_row_expands_to(tmp_path, wildcards, capsys):
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "a", "prompt": "a __sub/colour__ __shape__", "expand": "all"},
        {"id": "b", "prompt": "a red circle"},
        {"id": "c", "prompt": "a red circle", "sweep": {"cfg": [1, 4]}},
    ])
    capsys.readouterr()
    assert cli("validate", manifest, "--model", "tiny", "--device", "cpu", "--wildcards", wildcards, "--json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["jobs"] == 12 and plan["expanded"] == [{"line": 1, "id": "a", "rows": 9}, {"line": 3, "id": "c", "rows": 2}]
    assert cli("validate", manifest, "--model", "tiny", "--device", "cpu", "--wildcards", wildcards) == 0
    text = capsys.readouterr().out
    assert "line 1 (a): expands to 9 rows" in text and "line 3 (c): expands to 2 rows" in text


# --- runs ---------------------------------------------------------------------------------------------

def _cell_pixels(grid_path, box):
    from PIL import Image

    with Image.open(grid_path) as image:
        return np.asarray(image.convert("RGB").crop(tuple(box)), dtype=np.int16)


def test_sweep_grid_has_a_labelled_cell_per_image_and_the_expansion_runs_as_a_manifest(tmp_path, monkeypatch):
    import batch.writer as writer

    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "sw", "prompt": "a red circle", "seed": 3, "sweep": {"cfg": [1, 7.5], "steps": [2, 3, 4]}},
        {"id": "t", "prompt": "a {blue|yellow} square", "expand": "all", "seed": 8},
    ])
    real = writer.save_image

    def full_disk(image, path, *args, **kwargs):  # one cell's image cannot be written
        if path.name == "sw-4.png":
            raise OSError(28, "No space left on device")
        return real(image, path, *args, **kwargs)

    monkeypatch.setattr(writer, "save_image", full_disk)
    out = tmp_path / "out"
    assert cli(manifest, *FAST, "--out", out, "--quiet") == 1
    grid_path = out / "grids" / "sw.png"
    layout = read_layout(grid_path)
    from PIL import Image

    with Image.open(grid_path) as image:
        width, height = image.size
    left, top = layout["margin"]["left"], layout["margin"]["top"]
    assert layout["cell_size"] == [64, 64] and layout["shape"] == [2, 3]
    assert (width, height) == (left + 2 * 64, top + 3 * 64), "2 x 3 cells of 64 px plus the label margins"
    assert left > 20 and top > 8  # room for "steps: 4" on the left and "cfg: 7.5" on top
    cells = {tuple(c["cell"]): c for c in layout["cells"]}
    assert len(cells) == 6 and cells[(0, 2)]["status"] == "failed" and cells[(0, 2)]["id"] == "sw-4"
    for index, cell in cells.items():
        if index == (0, 2):
            empty = _cell_pixels(grid_path, cell["box"])
            assert (empty == 232).all(axis=-1).mean() > 0.8, "a failed cell is drawn empty (and labelled)"
            continue
        image = pixels(out / "images" / f"{cell['id']}.png")
        assert np.array_equal(_cell_pixels(grid_path, cell["box"]), image), cell
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<section id=grids>" in html and 'href="grids/sw.png"' in html

    monkeypatch.setattr(writer, "save_image", real)
    assert cli(manifest, *FAST, "--out", out, "--quiet", "--retry-failed") == 0
    cells = {tuple(c["cell"]): c for c in read_layout(grid_path)["cells"]}
    assert cells[(0, 2)]["status"] == "done"  # the grid is drawn again once its cell is made
    assert np.array_equal(_cell_pixels(grid_path, cells[(0, 2)]["box"]), pixels(out / "images" / "sw-4.png"))

    # `sdbatch expand -o` writes a manifest that makes the same images (and the same grid)
    rows = tmp_path / "rows.jsonl"
    assert cli("expand", manifest, "-o", rows) == 0
    again = tmp_path / "again"
    assert cli(rows, *FAST, "--out", again, "--quiet") == 0
    first, second = read_metadata(out), read_metadata(again)
    assert [m["file_name"] for m in first] == [m["file_name"] for m in second] and len(first) == 8
    assert [(m["prompt"], m["seed"], m["cfg"], m["steps"]) for m in first] == \
           [(m["prompt"], m["seed"], m["cfg"], m["steps"]) for m in second]
    for meta in first:
        assert np.abs(pixels(out / "images" / meta["file_name"]) - pixels(again / "images" / meta["file_name"])).max() <= 2
    with Image.open(again / "grids" / "sw.png") as image:
        assert image.size == (width, height) and INFO_KEY in image.text


def test_a_killed_expanded_run_resumes_exactly(tmp_path, wildcards, capsys):
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "shapes", "prompt": "a __shape__, {red|blue|yellow}", "expand": "all"},  # 9 rows on line 1
        {"id": "one", "prompt": "a green circle"},
    ])
    expected, _ = expand_manifest(manifest, 0, wildcards)
    out = tmp_path / "out"
    proc = start_run(manifest, out, *SLOW, "--batch-size", "2", "--wildcards", str(wildcards))
    seen = wait_for_done(proc, out, at_least=3)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 <= seen
    db = sqlite3.connect(out / "checkpoint.sqlite")
    done_at_kill = db.execute("SELECT COUNT(*) FROM images WHERE status = 'done' AND id LIKE 'shapes-%'").fetchone()[0]
    db.close()
    assert done_at_kill < 9, "line 1 must still be unfinished at the kill"

    def rerun() -> tuple[int, int]:
        """(made now, from checkpoint), as the run prints them."""
        capsys.readouterr()
        assert cli(manifest, *SLOW, "--out", out, "--quiet", "--wildcards", wildcards) == 0
        match = re.search(r"\((\d+) made now, (\d+) from checkpoint\)", capsys.readouterr().out)
        return int(match[1]), int(match[2])

    made, skipped = rerun()
    assert made + skipped == 10 and made >= 10 - done_at_kill - 2  # the writer holds at most one batch (2)
    meta = read_metadata(out)
    assert sorted((m["id"], m["prompt"], m["seed"]) for m in meta) == \
           sorted((r["id"], r["prompt"], r.get("seed", derive_seed(0, r["id"]))) for r in expected)
    assert len({m["seed"] for m in meta}) == 10

    assert rerun() == (0, 10)  # finished: a rerun reads no row again (the whole line is done), makes nothing
    # new wildcard entries are new rows: the fast path does not trust the old expansion; "zebra" sorts
    # last, so rows 0-8 keep their ids, prompts and seeds, and only its 3 rows are made
    (wildcards / "shape.txt").write_text("circle\nsquare\ntriangle\nzebra\n", encoding="utf-8")
    assert rerun() == (3, 10)
    expected, _ = expand_manifest(manifest, 0, wildcards)
    assert sorted((m["id"], m["prompt"], m["seed"]) for m in read_metadata(out)) == \
           sorted((r["id"], r["prompt"], r.get("seed", derive_seed(0, r["id"]))) for r in expected)
