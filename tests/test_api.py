"""The Python API: a DataFrame run is a manifest run; a Generator gives the CLI's pixels; the README example runs."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from conftest import FAST, REPO, cli, make_image, make_tiny_lora, pixels, read_metadata, write_jsonl

import batch
from batch import Generator, run
from batch.errors import ManifestError

ROWS = [
    {"id": "a", "prompt": "a red circle", "seed": 1, "num_images": 2},
    {"id": "b", "prompt": "a blue square", "seed": 2, "negative_prompt": "green", "scheduler": "euler"},
    {"id": "c", "prompt": "a yellow triangle", "seed": 3, "cfg": 3.0, "label": "kept"},
]
OPTIONS = {"model": "tiny", "device": "cpu", "steps": 3, "width": 64, "height": 64, "quiet": True}


def test_the_public_names_are_pinned():
    assert batch.__all__ == ["Generator", "Result", "__version__", "run"]


def test_a_dataframe_run_equals_the_cli_run_of_the_same_rows(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", ROWS)
    assert cli(manifest, *FAST, "--out", tmp_path / "cli", "--quiet") == 0
    result = run(pd.DataFrame(ROWS), out=tmp_path / "api", **OPTIONS)
    assert result.exit_code == 0 and result.counts.done == 4 and result.generated == 4
    cli_meta, api_meta = read_metadata(tmp_path / "cli"), read_metadata(tmp_path / "api")
    assert [m["file_name"] for m in cli_meta] == [m["file_name"] for m in api_meta]
    for a, b in zip(cli_meta, api_meta):
        assert {k: v for k, v in a.items()} == {k: v for k, v in b.items()}
        assert np.array_equal(pixels(tmp_path / "cli" / "images" / a["file_name"]),
                              pixels(tmp_path / "api" / "images" / b["file_name"]))
    assert (tmp_path / "api" / "manifest.jsonl").is_file(), "the rows are kept in OUT"
    assert result.report["totals"]["done"] == 4

    table = result.table()
    assert len(table) == 4 and list(table["id"]) == ["a", "a", "b", "c"]
    assert set(table["status"]) == {"done"} and all(p.endswith(".png") for p in table["path"])
    assert table.loc[table["id"] == "c", "label"].item() == "kept"

    again = run(pd.DataFrame(ROWS), out=tmp_path / "api", **OPTIONS)  # resume: nothing to make
    assert again.generated == 0 and again.skipped == 4
    assert cli("status", tmp_path / "api") == 0


def test_a_list_of_dicts_runs_and_relative_image_paths_resolve_from_the_caller(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_image(tmp_path / "init.png")
    result = run([{"id": "i", "prompt": "a red square", "init_image": "init.png", "strength": 0.5, "seed": 4}],
                 out="outputs/list", **OPTIONS)
    assert result.exit_code == 0 and (tmp_path / "outputs" / "list" / "images" / "i.png").is_file()


def test_invalid_rows_raise_one_error_naming_each_row_index_column_and_value(tmp_path):
    frame = pd.DataFrame([
        {"prompt": "fine", "steps": 3},
        {"prompt": "bad steps", "steps": -1},
        {"prompt": "", "steps": 3},
        {"prompt": "bad cfg", "steps": 3, "cfg": "lots"},
    ], index=["first", "second", "third", "fourth"])
    with pytest.raises(ManifestError) as caught:
        run(frame, out=tmp_path / "bad", **OPTIONS)
    text = str(caught.value)
    assert "3 errors" in text
    assert re.search(r"row 'second', column 'steps': -1", text)
    assert re.search(r"row 'third', column 'prompt'", text)
    assert re.search(r"row 'fourth', column 'cfg': 'lots'", text)
    assert not (tmp_path / "bad" / "images").exists(), "nothing generated"


@pytest.fixture(scope="module")
def generator():
    with Generator("tiny", device="cpu", steps=3, width=64, height=64) as gen:
        yield gen


def test_generator_modes_give_the_cli_pixels(generator, tmp_path):
    init = make_image(tmp_path / "init.png")
    reference = make_image(tmp_path / "ref.png", (30, 30, 200), size=(48, 48))
    rows = [
        {"id": "t", "prompt": "a red circle", "seed": 5, "num_images": 2},
        {"id": "i", "prompt": "a red square", "init_image": str(init), "strength": 0.6, "seed": 6},
        {"id": "p", "prompt_image": str(reference), "image_prompt_method": "clip_embed", "seed": 7},
        {"id": "q", "prompt_image": str(reference), "seed": 8},
    ]
    out = tmp_path / "cli"
    assert cli(write_jsonl(tmp_path / "m.jsonl", rows), *FAST, "--out", out, "--quiet") == 0
    made = {
        "t-0": generator.generate("a red circle", num_images=2, seed=5)[0],
        "i": generator.img2img("a red square", init_image=init, strength=0.6, seed=6)[0],
        "p": generator.image_prompt(reference, method="clip_embed", seed=7)[0],
        "q": generator.image_prompt(str(reference), seed=8)[0],
    }
    from PIL import Image

    with Image.open(init) as picture:  # a PIL image in, not a path: the same pixels
        made["i-pil"] = generator.img2img("a red square", init_image=picture.copy(), strength=0.6, seed=6)[0]
    for name, image in made.items():
        expected = pixels(out / "images" / f"{name.removesuffix('-pil')}.png")
        assert np.array_equal(np.asarray(image.convert("RGB"), dtype=np.int16), expected), name


def test_generator_lora_applies_and_unloads(generator, tmp_path):
    lora = make_tiny_lora(tmp_path, seed=3)
    base = generator.generate("a red circle", seed=9)[0]
    generator.load_lora(lora, scale=1.0)
    with_lora = generator.generate("a red circle", seed=9)[0]
    generator.unload()
    again = generator.generate("a red circle", seed=9)[0]
    assert np.abs(np.asarray(base, np.int16) - np.asarray(with_lora, np.int16)).max() > 5
    assert np.array_equal(np.asarray(base), np.asarray(again))
    out = tmp_path / "written"
    generator.generate("a blue square", seed=1, out=out)
    assert [m["prompt"] for m in read_metadata(out)] == ["a blue square"]


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "loras").mkdir()
    make_tiny_lora(tmp_path / "loras", name="ink.safetensors")
    namespace: dict = {}
    exec(compile(code, "README.md (Python)", "exec"), namespace)  # noqa: S102 -- the README's own example
    assert namespace["result"].exit_code == 0
    assert len(namespace["table"]) == 2 and len(namespace["images"]) == 2
    assert namespace["edited"] and namespace["liked"]


def test_progress_shows_unless_quiet(tmp_path, capfd):
    import logging

    logger, root = logging.getLogger("batch"), logging.getLogger()
    saved, saved_root, level = list(logger.handlers), list(root.handlers), logger.level
    logger.handlers, root.handlers = [], []  # as in a fresh notebook: nothing configured yet (pytest adds its own)
    try:
        run([{"id": "x", "prompt": "a red circle", "seed": 1}], out=tmp_path / "loud", **{**OPTIONS, "quiet": False})
        assert "1/1 images" in capfd.readouterr().err
        with Generator("tiny", device="cpu", steps=3, width=64, height=64, quiet=True) as gen:
            gen.generate("a red circle", seed=1)
        assert "it/s" not in capfd.readouterr().err
        with Generator("tiny", device="cpu", steps=3, width=64, height=64) as gen:
            gen.generate("a red circle", seed=1)
        err = capfd.readouterr().err
        assert "txt2img: 1 image(s) in" in err and "it/s" not in err, err  # one kind of progress, not diffusers' bars
    finally:
        logger.handlers, root.handlers = saved, saved_root
        logger.setLevel(level)
