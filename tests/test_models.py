"""Real-model features on the tiny model: sources, schedulers, LoRA, memory switches, the NaN guard."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import FAST, REPO, cli, make_tiny_lora, pixels, read_metadata, write_jsonl

from batch.families import SD

TINY = REPO / "models" / "tiny"


def test_every_scheduler_generates(tmp_path):
    rows = [{"id": name, "prompt": "a lighthouse", "scheduler": name, "seed": 5} for name in SD.schedulers]
    out = tmp_path / "out"
    assert cli(write_jsonl(tmp_path / "m.jsonl", rows), *FAST, "--out", out, "--quiet") == 0
    meta = read_metadata(out)
    assert [m["scheduler"] for m in meta] == list(SD.schedulers)
    images = {m["id"]: pixels(out / "images" / m["file_name"]) for m in meta}
    assert all(image.std() > 1 for image in images.values())
    assert np.abs(images["euler_a"] - images["ddim"]).max() > 10  # really another sampler
    from PIL import Image

    with Image.open(out / "images" / "euler_a.png") as image:
        assert "Sampler: Euler a," in image.text["parameters"]


def test_local_folder_with_spaces_loads_by_path(tmp_path):
    folder = tmp_path / "my models" / "tiny copy"
    shutil.copytree(TINY, folder)
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": "a boat", "seed": 1}])
    fast = [a for a in FAST if a != "tiny"]
    fast.remove("--model")
    assert cli(manifest, *fast, "--model", folder, "--out", tmp_path / "by-path", "--quiet") == 0
    assert cli(manifest, *FAST, "--out", tmp_path / "preset", "--quiet") == 0
    a, b = pixels(tmp_path / "by-path/images/a.png"), pixels(tmp_path / "preset/images/a.png")
    assert np.abs(a - b).max() <= 2
    assert read_metadata(tmp_path / "by-path")[0]["model"] == str(folder)


def test_model_column_groups_rows_by_model(tmp_path):
    other = tmp_path / "other model"
    shutil.copytree(TINY, other)
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "a", "prompt": "x", "seed": 1},
        {"id": "b", "prompt": "x", "seed": 1, "model": "other model"},  # relative to the manifest's folder
        {"id": "c", "prompt": "y", "seed": 2},
    ])
    out = tmp_path / "out"
    assert cli(manifest, *FAST, "--out", out, "--quiet") == 0
    report = json.loads((out / "report.json").read_text())
    assert [(g["model"], g["images"]) for g in report["groups"]] == [("tiny", 2), (str(other), 1)]
    assert report["groups"][0]["load_s"] > 0 and report["groups"][1]["load_s"] > 0
    models = {m["id"]: m["model"] for m in read_metadata(out)}
    assert models == {"a": "tiny", "b": str(other), "c": "tiny"}
    assert np.abs(pixels(out / "images/a.png") - pixels(out / "images/b.png")).max() <= 2  # same weights


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory):
    return make_tiny_lora(tmp_path_factory.mktemp("lora"))


def test_lora_rows_change_the_image_scale_0_equals_none_and_later_rows_are_clean(tmp_path, tiny_lora):
    row = {"prompt": "a knight", "seed": 9}
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "before", **row},
        {"id": "styled", **row, "lora": str(tiny_lora)},
        {"id": "half", **row, "lora": str(tiny_lora), "lora_scale": 0.5},
        {"id": "zero", **row, "lora": str(tiny_lora), "lora_scale": 0},
        {"id": "after", **row, "scheduler": "dpmpp_2m_karras"},
    ])
    out = tmp_path / "out"
    assert cli(manifest, *FAST, "--out", out, "--quiet", "--batch-size", "1") == 0
    image = {name: pixels(out / "images" / f"{name}.png") for name in ("before", "styled", "half", "zero", "after")}
    assert np.abs(image["styled"] - image["before"]).max() > 20
    assert 0 < np.abs(image["half"] - image["before"]).mean() < np.abs(image["styled"] - image["before"]).mean()
    assert np.abs(image["zero"] - image["before"]).max() <= 2
    assert np.abs(image["after"] - image["before"]).max() <= 2
    groups = json.loads((out / "report.json").read_text())["groups"]
    assert [g["lora"] for g in groups] == [None, str(tiny_lora)]  # rows grouped by adapter
    log = (out / "run.log").read_text()
    assert log.count("loaded LoRA") == 1  # the file is read once per run


def test_memory_switches_leave_pixels_unchanged(tmp_path, mixed_manifest):
    plain, lean = tmp_path / "plain", tmp_path / "lean"
    fast = ["--model", "tiny", "--device", "cpu", "--steps", "3", "--width", "128", "--height", "128", "--quiet"]
    assert cli(mixed_manifest, *fast, "--out", plain) == 0
    assert cli(mixed_manifest, *fast, "--out", lean, "--attention-slicing", "--vae-slicing", "--vae-tiling") == 0
    for meta in read_metadata(plain):
        a, b = pixels(plain / "images" / meta["file_name"]), pixels(lean / "images" / meta["file_name"])
        assert np.abs(a - b).max() <= 3, meta["file_name"]


def test_options_that_need_a_gpu_say_so(tmp_path, capsys):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": "x"}])
    assert cli(manifest, *FAST, "--out", tmp_path / "o", "--offload", "model") == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    assert cli(manifest, *FAST, "--out", tmp_path / "o", "--dtype", "fp16") == 2
    assert "fp16 on the CPU" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_nan_guard_redecodes_in_fp32(tmp_path, monkeypatch):
    import batch.generate as generate

    real = generate._vae_decode
    calls = []

    def overflowing(vae, latents):  # the first decode of the run overflows, as fp16 VAEs do
        out = real(vae, latents)
        calls.append(len(latents))
        if len(calls) == 1:
            out = out.clone()
            out[0, 0, 0, 0] = float("inf")
        return out

    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": "x", "seed": 1}, {"id": "b", "prompt": "y"}])
    assert cli(manifest, *FAST, "--out", tmp_path / "clean", "--quiet") == 0
    monkeypatch.setattr(generate, "_vae_decode", overflowing)
    out = tmp_path / "guarded"
    assert cli(manifest, *FAST, "--out", out, "--quiet") == 0
    assert calls == [2, 1]  # the batch, then image a alone in fp32
    meta = {m["id"]: m for m in read_metadata(out)}
    assert meta["a"].get("vae_fp32_redecode") is True and "vae_fp32_redecode" not in meta["b"]
    assert np.abs(pixels(out / "images/a.png") - pixels(tmp_path / "clean/images/a.png")).max() <= 2


def test_non_finite_latents_fail_only_that_job(tmp_path, monkeypatch):
    import batch.generate as generate

    real = generate._vae_decode

    def poisoned(vae, latents):
        out = real(vae, latents).clone()
        out[0] = float("nan")  # whatever precision: image 0 never comes out finite
        return out

    monkeypatch.setattr(generate, "_vae_decode", poisoned)
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}])
    out = tmp_path / "out"
    assert cli(manifest, *FAST, "--out", out, "--quiet", "--batch-size", "1") == 1
    failed = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert [f["id"] for f in failed] == ["a", "b"] and all("non-finite" in f["error"] for f in failed)
    assert not list((out / "images").glob("*.png"))


def test_single_prompt_with_num_writes_two_images(tmp_path):
    out = tmp_path / "single"
    assert cli("--prompt", "a red fox in snow", "--num", "2", "--seed", "42", *FAST, "--out", out, "--quiet") == 0
    meta = read_metadata(out)
    assert len(meta) == 2 and [m["seed"] for m in meta] == [42, 43]
    assert all((out / "images" / m["file_name"]).exists() for m in meta)
    assert meta[0]["prompt"] == "a red fox in snow"
    # The same command again resumes: nothing is made twice.
    assert cli("--prompt", "a red fox in snow", "--num", "2", "--seed", "42", *FAST, "--out", out, "--quiet") == 0
    assert json.loads((out / "report.json").read_text())["runs"][-1]["skipped_from_checkpoint"] == 2


def test_single_img2img_job(tmp_path, images_dir):
    out = tmp_path / "single"
    assert cli("--prompt", "oil painting", "--init-image", images_dir / "init.png", "--strength", "0.7",
               *FAST, "--out", out, "--quiet") == 0
    (meta,) = read_metadata(out)
    assert meta["mode"] == "img2img" and meta["strength"] == 0.7


def test_ip_adapter_rows_follow_the_prompt_image(tmp_path, images_dir, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from conftest import make_image

    make_image(images_dir / "green.png", (20, 220, 40), size=(40, 40))
    calls = []
    real = StableDiffusionPipeline.encode_image
    monkeypatch.setattr(StableDiffusionPipeline, "encode_image",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    common = {"seed": 3, "prompt": "a vase"}
    manifest = write_jsonl(images_dir / "ip.jsonl", [
        {"id": "plain-before", **common},
        {"id": "red", **common, "prompt_image": "init.png"},  # ip_adapter is the default method
        {"id": "green", **common, "prompt_image": "green.png"},
        {"id": "red-again", **common, "prompt_image": "init.png", "ip_scale": 0.6},
        {"id": "red-off", **common, "prompt_image": "init.png", "ip_scale": 0},
        {"id": "clip", "prompt_image": "green.png", "image_prompt_method": "clip_embed", "seed": 3},
        {"id": "plain-after", **common, "num_images": 1, "negative_prompt": ""},
    ])
    out = tmp_path / "out"
    assert cli(manifest, *FAST, "--out", out, "--quiet", "--batch-size", "2") == 0
    image = {m["id"]: pixels(out / "images" / m["file_name"]) for m in read_metadata(out)}
    assert np.abs(image["red"] - image["green"]).max() > 10  # the image is the prompt
    assert np.abs(image["red"] - image["red-again"]).max() <= 2
    assert np.abs(image["red-off"] - image["plain-before"]).max() <= 2  # scale 0: the adapter does nothing
    assert np.abs(image["plain-after"] - image["plain-before"]).max() <= 2  # detached again for plain rows
    assert np.abs(image["clip"] - image["green"]).max() > 10  # both methods in one manifest
    assert len(calls) == 2  # one embedding per distinct prompt image, however many rows use it
    meta = {m["id"]: m for m in read_metadata(out)}
    assert meta["red"]["image_prompt_method"] == "ip_adapter" and meta["red"]["ip_scale"] == 0.6


def test_single_file_checkpoint_loads(tmp_path):
    from diffusers import StableDiffusionPipeline

    from batch.single_file import save_single_file

    checkpoint = tmp_path / "tiny model.safetensors"
    save_single_file(StableDiffusionPipeline.from_pretrained(TINY), checkpoint)
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": "a boat", "seed": 1}])
    fast = [a for a in FAST if a not in ("--model", "tiny")]
    assert cli(manifest, *fast, "--model", checkpoint, "--out", tmp_path / "single", "--quiet") == 0
    assert cli(manifest, *FAST, "--out", tmp_path / "folder", "--quiet") == 0
    assert np.abs(pixels(tmp_path / "single/images/a.png") - pixels(tmp_path / "folder/images/a.png")).max() <= 2
    report = json.loads((tmp_path / "single" / "report.json").read_text())
    assert report["run"]["model"] == str(checkpoint)


def test_sd15_random_builds_offline_and_generates(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": "a photo of a cat", "seed": 1}])
    out = tmp_path / "out"
    assert cli(manifest, "--model", "sd15-random", "--device", "cpu", "--steps", "1", "--width", "64", "--height", "64",
               "--out", out, "--quiet") == 0
    assert pixels(out / "images" / "a.png").shape == (64, 64, 3)
    group = json.loads((out / "report.json").read_text())["groups"][0]
    assert group["model"] == "sd15-random" and group["images"] == 1


def test_hub_model_not_in_cache_names_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": "x"}])
    fast = [a for a in FAST if a not in ("--model", "tiny")]
    assert cli(manifest, *fast, "--model", "someone/not-downloaded", "--out", tmp_path / "o", "--quiet") == 2
    err = capsys.readouterr().err
    assert "someone/not-downloaded" in err and "HF_HUB_OFFLINE" in err and "Traceback" not in err
    assert not list((tmp_path / "o").glob("images/*.png"))
