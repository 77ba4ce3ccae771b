"""Every model family against diffusers itself: sdbatch's image for a row equals the image of the family's
AutoPipelineFor... called directly with the same parameters and a CPU generator seeded with the row's seed.

The models are the tiny random ones of `python -m batch.toy.families` (models/tiny-<family>), one per
family: SD 2.x v-prediction, SDXL, SD3, Flux-dev, Flux-schnell and PixArt-Sigma (a family only
AutoPipelineForText2Image maps).
"""
from __future__ import annotations

import functools
import inspect
import itertools
import json
import os
import signal

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
from conftest import cli, make_image, make_tiny_lora, pixels, read_metadata, start_run, wait_for_done, write_jsonl

from batch.models import MODELS_DIR

TOLERANCE = 2  # of 255: the bar; SD 1.5 matches exactly


def folder(model: str):
    return MODELS_DIR / model


@functools.lru_cache(maxsize=None)
def reference_pipeline(model: str):
    """The family's own text-to-image pipeline, loaded by diffusers from the same folder."""
    from diffusers import AutoPipelineForText2Image, DPMSolverMultistepScheduler

    pipe = AutoPipelineForText2Image.from_pretrained(folder(model))
    pipe.set_progress_bar_config(disable=True)
    if model in ("tiny", "tiny-sd2-v"):  # sdbatch's SD default, dpmpp_2m_karras, spelt out in diffusers' terms
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, use_karras_sigmas=True, algorithm_type="dpmsolver++", solver_order=2)
    return pipe


def reference_image(model: str, row: dict, init=None) -> np.ndarray:
    """diffusers' image for a row: only what the row says, everything else the pipeline's own default."""
    import torch
    from diffusers import AutoPipelineForImage2Image
    from PIL import Image

    pipe = reference_pipeline(model)
    kwargs = dict(prompt=row["prompt"], num_inference_steps=row["steps"], guidance_scale=row["cfg"],
                  generator=torch.Generator("cpu").manual_seed(row["seed"]))
    for column, argument in (("negative_prompt", "negative_prompt"), ("prompt_2", "prompt_2"),
                             ("negative_prompt_2", "negative_prompt_2"), ("true_cfg", "true_cfg_scale"),
                             ("max_sequence_length", "max_sequence_length")):
        if column in row:
            kwargs[argument] = row[column]
    if model == "tiny-pixart":
        kwargs["use_resolution_binning"] = False
    if init is not None:
        with Image.open(init) as picture:
            image = picture.convert("RGB").resize((row["width"], row["height"]), Image.Resampling.LANCZOS)
        pipe = AutoPipelineForImage2Image.from_pipe(pipe)
        pipe.set_progress_bar_config(disable=True)
        kwargs.update(image=image, strength=row["strength"])
    if init is None or "height" in inspect.signature(type(pipe).__call__).parameters:  # Flux's img2img takes a size
        kwargs.update(width=row["width"], height=row["height"])
    return np.asarray(pipe(**kwargs).images[0].convert("RGB"), dtype=np.int16)


def _row(id_: str, **values) -> dict:
    return {"id": id_, "prompt": "a red circle on a blue square", "steps": 3, "width": 64, "height": 64,
            "seed": 11 + len(id_), **values}


# What each family takes, row by row: plain, with its own columns, and img2img where it has one.
ROWS = {
    "tiny-sd2-v": [_row("t", cfg=7.5, negative_prompt="green"), _row("i", cfg=6.0, strength=0.6)],
    "tiny-sdxl": [_row("t", cfg=5.0), _row("neg", cfg=5.0, negative_prompt="green", prompt_2="a yellow star"),
                  _row("i", cfg=5.0, strength=0.6)],
    "tiny-sd3": [_row("t", cfg=4.5, negative_prompt="green", prompt_2="a star", max_sequence_length=32),
                 _row("i", cfg=4.5, strength=0.7)],
    "tiny-flux": [_row("t", cfg=3.5), _row("true", cfg=3.5, true_cfg=2.0, negative_prompt="green"),
                  _row("i", cfg=3.5, strength=0.6, max_sequence_length=64)],
    "tiny-flux-schnell": [_row("t", cfg=0.0, steps=2), _row("i", cfg=0.0, steps=4, strength=0.5)],
    "tiny-pixart": [_row("t", cfg=4.5, negative_prompt="green")],
}


def _manifest(tmp_path, model: str, rows: list[dict], init, with_model: bool = False) -> list[dict]:
    written = []
    for row in rows:
        row = dict(row, id=f"{model}-{row['id']}" if with_model else row["id"])
        if "strength" in row:
            row["init_image"] = str(init)
        if with_model:
            row["model"] = model
        written.append(row)
    return written


def _check_equal(out, model: str, rows: list[dict]) -> None:
    meta = {m["id"]: m for m in read_metadata(out)}
    assert {r["id"] for r in rows} <= set(meta)
    for row in rows:
        mine = pixels(out / "images" / meta[row["id"]]["file_name"])
        theirs = reference_image(model, row, row.get("init_image"))
        assert mine.shape == theirs.shape, row["id"]
        assert np.abs(mine - theirs).max() <= TOLERANCE, (model, row["id"], np.abs(mine - theirs).max())
        assert theirs.std() > 1, "the reference image is flat: the test would not see a difference"


@pytest.mark.parametrize("model", list(ROWS))
def test_every_family_and_mode_equals_diffusers(tmp_path, model):
    init = make_image(tmp_path / "init.png", (40, 160, 90), size=(80, 72))
    rows = _manifest(tmp_path, model, ROWS[model], init)
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out"
    assert cli(manifest, "--model", model, "--device", "cpu", "--batch-size", "4", "--out", out, "--quiet") == 0
    _check_equal(out, model, rows)
    family = json.loads((out / "report.json").read_text())["groups"][0]["family"]
    assert family == {"tiny-sd2-v": "sd", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3", "tiny-flux": "flux-dev",
                      "tiny-flux-schnell": "flux-schnell", "tiny-pixart": "auto"}[model]
    assert {m["family"] for m in read_metadata(out)} == {family}


def test_one_manifest_mixes_sd15_sdxl_and_flux_in_both_modes_at_batch_size_1(tmp_path):
    """The same rows as above, in one manifest with a model column, one image a call: equal to diffusers
    (so batch size 1 equals the batch size 4 of the test above)."""
    init = make_image(tmp_path / "init.png", (40, 160, 90), size=(80, 72))
    rows = {"tiny": [_row("t", cfg=7.5, negative_prompt="green"), _row("i", cfg=7.5, strength=0.6)],
            "tiny-sdxl": ROWS["tiny-sdxl"], "tiny-flux": ROWS["tiny-flux"]}
    written = {model: _manifest(tmp_path, model, model_rows, init, with_model=True) for model, model_rows in rows.items()}
    interleaved = [row for rows_ in itertools.zip_longest(*written.values()) for row in rows_ if row]
    manifest = write_jsonl(tmp_path / "m.jsonl", interleaved)
    out = tmp_path / "out"
    assert cli(manifest, "--device", "cpu", "--batch-size", "1", "--out", out, "--quiet") == 0
    assert len(read_metadata(out)) == sum(map(len, written.values())) == 8
    for model, model_rows in written.items():
        _check_equal(out, model, model_rows)
    report = json.loads((out / "report.json").read_text())
    assert {g["family"] for g in report["groups"]} == {"sd", "sdxl", "flux-dev"}
    assert "| tiny-flux | flux-dev | txt2img |" in (out / "report.md").read_text()


def test_sigkill_and_resume_across_families(tmp_path):
    """A mixed SDXL + Flux run killed mid-way and run again ends with the images of an uninterrupted run."""
    rows = [dict(_row(f"r{i:02d}", cfg=4.0, steps=10, seed=i), model=("tiny-sdxl" if i % 2 else "tiny-flux"))
            for i in range(12)]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    reference, out = tmp_path / "reference", tmp_path / "killed"
    options = ["--device", "cpu", "--batch-size", "2"]
    assert cli(manifest, *options, "--out", reference, "--quiet") == 0
    proc = start_run(manifest, out, *options)
    wait_for_done(proc, out, at_least=2)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert cli(manifest, *options, "--out", out, "--quiet") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["skipped_from_checkpoint"] >= 2
    for meta in read_metadata(reference):
        name = meta["file_name"]
        assert np.abs(pixels(out / "images" / name) - pixels(reference / "images" / name)).max() == 0, name


def test_img2img_shares_the_weights_of_sdxl_and_flux():
    """img2img is diffusers' from_pipe view: the same denoiser, VAE and text encoders, no second copy."""
    from batch.models import LoadOptions, load_family

    for model, denoiser in (("tiny-sdxl", "unet"), ("tiny-flux", "transformer")):
        family = load_family(model, LoadOptions("cpu", "fp32"))
        for name in (denoiser, "vae", "text_encoder", "text_encoder_2"):
            a, b = getattr(family.txt2img, name), getattr(family.img2img, name)
            assert a is b, (model, name)
            assert {p.data_ptr() for p in a.parameters()} == {p.data_ptr() for p in b.parameters()}
        assert type(family.img2img).__name__ == {"tiny-sdxl": "StableDiffusionXLImg2ImgPipeline",
                                                 "tiny-flux": "FluxImg2ImgPipeline"}[model]
        denoiser_of = getattr(family.image_prompt, denoiser)  # the IP-Adapter view: the same weights again
        assert denoiser_of is getattr(family.txt2img, denoiser) and family.image_prompt.vae is family.txt2img.vae


def _denoiser_lora(model: str, target: Path, seed: int = 0) -> Path:
    """A LoRA on the family's denoiser, made with peft and saved by the family's own save_lora_weights."""
    import torch
    from diffusers import AutoPipelineForText2Image
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = AutoPipelineForText2Image.from_pretrained(folder(model))
    denoiser_name = "unet" if hasattr(pipe, "unet") and pipe.unet is not None else "transformer"
    denoiser = getattr(pipe, denoiser_name)
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in denoiser.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.5)
    layers = get_peft_model_state_dict(denoiser)
    type(pipe).save_lora_weights(target, **{f"{denoiser_name}_lora_layers": layers})
    if denoiser_name == "unet":  # SDXL: the same LoRA in kohya's (A1111's) layout too
        from batch.train.export import save_kohya

        save_kohya(denoiser, target / "kohya.safetensors")
    return target / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd3", "tiny-flux"])
def test_lora_per_row_changes_the_image_and_scale_0_is_none(tmp_path, model):
    lora = _denoiser_lora(model, tmp_path / "lora")
    base = _row("x", cfg=4.0)
    rows = [dict(base, id="plain"), dict(base, id="on", lora=str(lora)),
            dict(base, id="zero", lora=str(lora), lora_scale=0.0), dict(base, id="plain-again")]
    out = tmp_path / "out"
    assert cli(write_jsonl(tmp_path / "m.jsonl", rows), "--model", model, "--device", "cpu", "--out", out,
               "--quiet") == 0
    image = {row["id"]: pixels(out / "images" / f"{row['id']}.png") for row in rows}
    assert np.abs(image["on"] - image["plain"]).max() > 20
    assert np.abs(image["zero"] - image["plain"]).max() <= TOLERANCE
    assert np.abs(image["plain-again"] - image["plain"]).max() == 0  # the LoRA is off again after its rows
    meta = {m["id"]: m for m in read_metadata(out)}
    assert meta["on"]["lora"] == str(lora)
    if model == "tiny-sdxl":  # diffusers converts kohya/A1111 files: the same adapter, the same image
        kohya = lora.parent / "kohya.safetensors"
        manifest = write_jsonl(tmp_path / "k.jsonl", [dict(base, id="kohya", lora=str(kohya))])
        assert cli(manifest, "--model", model, "--device", "cpu", "--out", tmp_path / "k", "--quiet") == 0
        assert np.abs(pixels(tmp_path / "k/images/kohya.png") - image["on"]).max() <= TOLERANCE


# --- refused up front: exit 2, one line naming the row, the column, the value and the family ---

REFUSALS = [
    ("tiny-pixart", {"mode": "img2img", "init_image": "INIT", "strength": 0.5}, "mode", "no img2img pipeline"),
    ("tiny-flux", {"prompt_image": "INIT", "image_prompt_method": "clip_embed"}, "image_prompt_method",
     "the flux-dev family takes ip_adapter only"),
    ("tiny-sd3", {"mode": "image_prompt", "prompt_image": "INIT"}, "mode", "the sd3 family (StableDiffusion3Pipeline) "
     "has no image_prompt pipeline"),
    ("tiny-sdxl", {"prompt_image": "INIT", "image_prompt_method": "clip_embed"}, "image_prompt_method",
     "the sdxl family takes ip_adapter only"),
    ("tiny-flux", {"negative_prompt": "blurry"}, "negative_prompt", "without true CFG"),
    ("flux-random", {"width": 1000, "height": 1024}, "width", "multiple of 16 for the flux-dev family"),
    ("tiny-flux", {"scheduler": "dpmpp_2m_karras"}, "scheduler", "flux-dev family (FluxPipeline) takes flow_euler"),
    ("tiny-sdxl", {"scheduler": "flow_euler"}, "scheduler", "sdxl family"),
    ("tiny", {"prompt_2": "a star"}, "prompt_2", "the sd family takes no prompt_2"),
    ("tiny-sdxl", {"true_cfg": 3}, "true_cfg", "the sdxl family takes no true_cfg"),
    ("tiny-flux-schnell", {"max_sequence_length": 300}, "max_sequence_length", "[1, 256]"),
    ("tiny-pixart", {"lora": "LORA"}, "lora", "takes no LoRA"),
    ("tiny-sd3", {"width": 256, "height": 64}, "width", "at most 128 for this sd3 model"),
]


@pytest.mark.parametrize("model,values,column,message", REFUSALS, ids=[f"{r[0]}-{r[2]}" for r in REFUSALS])
def test_what_a_family_cannot_take_is_refused_before_any_model_loads(tmp_path, capsys, monkeypatch, model, values,
                                                                     column, message):
    import batch.execute

    init = make_image(tmp_path / "init.png")
    lora = make_tiny_lora(tmp_path / "lora")
    values = {k: (str(init) if v == "INIT" else str(lora) if v == "LORA" else v) for k, v in values.items()}
    row = {"id": "bad", "prompt": "a red circle", "model": model, **values}
    manifest = write_jsonl(tmp_path / "m.jsonl", [row])
    monkeypatch.setattr(batch.execute, "load_family", lambda *a, **k: pytest.fail("a model was loaded"))
    for command in (["validate", manifest], [manifest, "--out", tmp_path / "out"]):
        assert cli(*command, "--device", "cpu") == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        lines = [line for line in err.splitlines() if f"column '{column}'" in line]
        assert lines and "line 1" in lines[0] and message in lines[0], err
    assert not (tmp_path / "out" / "images").exists()


def test_an_sd15_lora_on_an_sdxl_model_is_refused(tmp_path, capsys, monkeypatch):
    import batch.execute

    lora = make_tiny_lora(tmp_path / "lora")  # made for the tiny SD 1.5 model
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "x", "prompt": "a circle", "lora": str(lora)}])
    monkeypatch.setattr(batch.execute, "load_family", lambda *a, **k: pytest.fail("a model was loaded"))
    assert cli(manifest, "--model", "tiny-sdxl", "--device", "cpu", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "does not fit model 'tiny-sdxl'" in err and "row x" in err and "Traceback" not in err


def test_rows_without_steps_cfg_or_scheduler_get_their_familys_defaults(tmp_path):
    from batch.config import Defaults
    from batch.manifest import load_manifest

    rows = [{"id": m, "prompt": "a circle", "model": m} for m in ("tiny", "tiny-sdxl", "tiny-flux", "tiny-flux-schnell",
                                                                  "flux-random", "sdxl-random")]
    jobs = {j.id: j for j in load_manifest(write_jsonl(tmp_path / "m.jsonl", rows), Defaults()).jobs}
    got = {k: (j.family, j.steps, j.cfg, j.scheduler, j.width) for k, j in jobs.items()}
    assert got["tiny"] == ("sd", 25, 7.5, "dpmpp_2m_karras", 128)
    assert got["tiny-sdxl"][:4] == ("sdxl", 30, 5.0, "euler")
    assert got["tiny-flux"][:4] == ("flux-dev", 28, 3.5, "flow_euler")
    assert got["tiny-flux-schnell"][:4] == ("flux-schnell", 4, 0.0, "flow_euler")
    assert got["flux-random"] == ("flux-dev", 28, 3.5, "flow_euler", 1024)
    assert got["sdxl-random"] == ("sdxl", 30, 5.0, "euler", 1024)


def test_flux_infotext_writes_distilled_cfg_as_forge_does(tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    manifest = write_jsonl(tmp_path / "m.jsonl", [_row("a", cfg=3.5, steps=2)])
    assert cli(manifest, "--model", "tiny-flux", "--device", "cpu", "--out", out, "--quiet") == 0
    with Image.open(out / "images" / "a.png") as image:
        text = image.info["parameters"]
    assert "CFG scale: 1, Distilled CFG Scale: 3.5" in text and "Sampler: Euler" in text


def test_sdxl_single_file_runs_offline_and_names_its_hash(tmp_path):
    """An SDXL checkpoint in the original single-file layout (as model sites hand them out) loads offline
    from shipped configs, draws what the folder draws, and its images carry A1111's Model hash."""
    import hashlib

    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    from batch.single_file import save_single_file

    checkpoint = tmp_path / "tiny-sdxl.safetensors"
    save_single_file(StableDiffusionXLPipeline.from_pretrained(folder("tiny-sdxl")), checkpoint)
    manifest = write_jsonl(tmp_path / "m.jsonl", [_row("a", cfg=5.0)])
    for model, out in ((checkpoint, tmp_path / "file"), ("tiny-sdxl", tmp_path / "folder")):
        assert cli(manifest, "--model", model, "--device", "cpu", "--out", out, "--quiet") == 0
    assert np.abs(pixels(tmp_path / "file/images/a.png") - pixels(tmp_path / "folder/images/a.png")).max() <= TOLERANCE
    with Image.open(tmp_path / "file/images/a.png") as image:
        text = image.info["parameters"]
    assert f"Model hash: {hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:10]}" in text
    assert read_metadata(tmp_path / "file")[0]["family"] == "sdxl"


def test_quantize_hands_diffusers_the_denoiser_and_t5_and_needs_cuda(tmp_path, capsys):
    """--quantize nf4: what PipelineQuantizationConfig gets (checked here), the load itself on a GPU only."""
    import torch

    from batch.families import describe
    from batch.models import LoadOptions, quantization_arguments

    index = json.loads((folder("tiny-flux") / "model_index.json").read_text())
    options = LoadOptions("cuda:0", "bf16", quantize="nf4")
    arguments = quantization_arguments(options, describe("tiny-flux").family, index)
    assert arguments["quant_backend"] == "bitsandbytes_4bit"
    assert arguments["components_to_quantize"] == ["transformer", "text_encoder_2"]  # Flux's T5 is text_encoder_2
    assert arguments["quant_kwargs"]["bnb_4bit_quant_type"] == "nf4"
    assert arguments["quant_kwargs"]["bnb_4bit_compute_dtype"] is torch.bfloat16
    sdxl = json.loads((folder("tiny-sdxl") / "model_index.json").read_text())
    assert quantization_arguments(options, describe("tiny-sdxl").family, sdxl)["components_to_quantize"] == ["unet"]
    manifest = write_jsonl(tmp_path / "m.jsonl", [_row("a", cfg=3.5)])
    assert cli(manifest, "--model", "tiny-flux", "--device", "cpu", "--quantize", "nf4", "--out", tmp_path / "o") == 2
    assert "--quantize nf4 uses bitsandbytes' CUDA kernels" in capsys.readouterr().err


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="bitsandbytes quantisation needs CUDA")
def test_flux_quantized_nf4_generates_on_a_gpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "out"
    manifest = write_jsonl(tmp_path / "m.jsonl", [_row("a", cfg=3.5)])
    assert cli(manifest, "--model", "tiny-flux", "--quantize", "nf4", "--out", out, "--quiet") == 0
    assert pixels(out / "images" / "a.png").std() > 1


def test_sdxl_image_prompts_through_ip_adapter_equal_diffusers(tmp_path):
    """SDXL image_prompt rows (IP-Adapter; each row its own picture, batched) equal diffusers' load_ip_adapter +
    ip_adapter_image called row by row; the tiny SDXL model's adapter is the default for it."""
    import torch
    from diffusers import AutoPipelineForText2Image
    from PIL import Image

    pictures = [make_image(tmp_path / f"p{i}.png", color, size=(48, 40)) for i, color in
                enumerate([(200, 30, 30), (30, 200, 60), (20, 40, 220)])]
    rows = [dict(_row(f"ip{i}", cfg=5.0, seed=7 + i), prompt="a shape", prompt_image=str(p), ip_scale=0.8)
            for i, p in enumerate(pictures)] + [_row("plain", cfg=5.0)]
    out = tmp_path / "out"
    assert cli(write_jsonl(tmp_path / "m.jsonl", rows), "--model", "tiny-sdxl", "--device", "cpu", "--batch-size", "3",
               "--out", out, "--quiet") == 0
    adapter = folder("tiny-sdxl-ip-adapter")
    pipe = AutoPipelineForText2Image.from_pretrained(folder("tiny-sdxl"))
    plain = reference_image("tiny-sdxl", rows[-1])
    assert np.abs(pixels(out / "images/plain.png") - plain).max() <= TOLERANCE
    pipe.load_ip_adapter(str(adapter), subfolder="", weight_name="ip-adapter_tiny-sdxl.safetensors",
                         image_encoder_folder="image_encoder")
    pipe.set_ip_adapter_scale(0.8)
    pipe.set_progress_bar_config(disable=True)
    for row in rows[:-1]:
        with Image.open(row["prompt_image"]) as picture:
            image = picture.convert("RGB")
        theirs = np.asarray(pipe(prompt=row["prompt"], ip_adapter_image=image, num_inference_steps=row["steps"],
                                 guidance_scale=row["cfg"], width=64, height=64,
                                 generator=torch.Generator("cpu").manual_seed(row["seed"])).images[0], dtype=np.int16)
        mine = pixels(out / "images" / f"{row['id']}.png")
        assert np.abs(mine - theirs).max() <= TOLERANCE, (row["id"], np.abs(mine - theirs).max())
        assert np.abs(mine - plain).max() > 5  # the picture changed the image


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd3", "tiny-flux"])
def test_vae_slicing_and_tiling_serve_every_family(tmp_path, monkeypatch, model):
    """The memory switches are the pipelines' own (vae.enable_slicing / enable_tiling) for every family: with
    them, a batch of two 128 px images (over the tiny VAEs' 64 px tile) is decoded in tiles, image by image."""
    from diffusers import AutoencoderKL

    tiled_calls = []
    real = AutoencoderKL.tiled_decode
    monkeypatch.setattr(AutoencoderKL, "tiled_decode", lambda self, z, *a, **k: tiled_calls.append(len(z)) or real(self, z, *a, **k))
    rows = [_row("a", cfg=4.0, width=128, height=128, steps=2), _row("b", cfg=4.0, width=128, height=128, steps=2)]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    for out, options in ((tmp_path / "plain", []), (tmp_path / "tiled", ["--vae-slicing", "--vae-tiling"])):
        tiled_calls.clear()
        assert cli(manifest, "--model", model, "--device", "cpu", "--batch-size", "2", "--out", out, "--quiet",
                   *options) == 0
        assert tiled_calls == ([1, 1] if options else []), tiled_calls  # sliced: one image a call; tiled
    for row in rows:
        tiled = pixels(tmp_path / "tiled/images" / f"{row['id']}.png")
        assert tiled.shape == (128, 128, 3) and tiled.std() > 1


def test_flux_image_prompts_through_ip_adapter_equal_diffusers(tmp_path):
    """Flux image_prompt rows (an XLabs-layout IP-Adapter, each row its own picture, batched; one with true CFG)
    equal diffusers' FluxPipeline.load_ip_adapter + ip_adapter_image called row by row."""
    import torch
    from diffusers import AutoPipelineForText2Image
    from PIL import Image

    pictures = [make_image(tmp_path / f"p{i}.png", color, size=(48, 40)) for i, color in
                enumerate([(200, 30, 30), (30, 200, 60)])]
    rows = [dict(_row(f"ip{i}", cfg=3.5, seed=5 + i), prompt="a shape", prompt_image=str(p), ip_scale=0.9)
            for i, p in enumerate(pictures)]
    rows.append(dict(_row("ip-true", cfg=3.5, seed=9), prompt="a shape", prompt_image=str(pictures[0]), ip_scale=0.9,
                     true_cfg=2.0, negative_prompt="green"))
    out = tmp_path / "out"
    assert cli(write_jsonl(tmp_path / "m.jsonl", rows + [_row("plain", cfg=3.5)]), "--model", "tiny-flux",
               "--device", "cpu", "--batch-size", "2", "--out", out, "--quiet") == 0
    adapter = folder("tiny-flux-ip-adapter")
    pipe = AutoPipelineForText2Image.from_pretrained(folder("tiny-flux"))
    plain = reference_image("tiny-flux", _row("plain", cfg=3.5))
    assert np.abs(pixels(out / "images/plain.png") - plain).max() <= TOLERANCE
    pipe.load_ip_adapter(str(adapter), weight_name="ip_adapter.safetensors",
                         image_encoder_pretrained_model_name_or_path=str(adapter / "image_encoder"),
                         image_encoder_dtype=torch.float32)
    pipe.set_ip_adapter_scale(0.9)
    pipe.set_progress_bar_config(disable=True)
    for row in rows:
        with Image.open(row["prompt_image"]) as picture:
            image = picture.convert("RGB")
        extra = {"true_cfg_scale": row["true_cfg"], "negative_prompt": row["negative_prompt"]} if "true_cfg" in row else {}
        theirs = np.asarray(pipe(prompt=row["prompt"], ip_adapter_image=image, num_inference_steps=row["steps"],
                                 guidance_scale=row["cfg"], width=64, height=64, **extra,
                                 generator=torch.Generator("cpu").manual_seed(row["seed"])).images[0], dtype=np.int16)
        mine = pixels(out / "images" / f"{row['id']}.png")
        assert np.abs(mine - theirs).max() <= TOLERANCE, (row["id"], np.abs(mine - theirs).max())
        without = {k: v for k, v in row.items() if k not in ("prompt_image", "ip_scale")}
        assert np.abs(mine - reference_image("tiny-flux", without)).max() > 5  # the picture changed the image
    assert np.abs(pixels(out / "images/ip0.png") - pixels(out / "images/ip1.png")).max() > 5  # each row its own picture


@pytest.mark.parametrize("model,regional", [("tiny-sdxl", True), ("tiny-flux", True), ("tiny-sd3", False),
                                            ("tiny-pixart", False)])
def test_compile_asks_each_denoiser_for_what_it_supports(monkeypatch, model, regional):
    """--compile: regional compilation where diffusers declares the denoiser's repeated blocks (UNet, Flux),
    the whole denoiser where it declares none (SD3, PixArt would raise on compile_repeated_blocks)."""
    from batch.families import describe
    from batch.models import LoadOptions, _load_pipeline, _place, resolve_model

    spec = describe(model).family
    pipe = _load_pipeline(resolve_model(model), LoadOptions("cpu", "fp32"), spec)
    calls = []
    denoiser = getattr(pipe, spec.denoiser)
    monkeypatch.setattr(denoiser, "compile_repeated_blocks", lambda **k: calls.append("regional"), raising=False)
    monkeypatch.setattr(denoiser, "compile", lambda *a, **k: calls.append("whole"))
    _place(pipe, LoadOptions("cpu", "fp32", compile=True), spec)
    assert calls == ["regional" if regional else "whole"]


@pytest.mark.parametrize("model,auto,expected", [("tiny-flux", True, "bf16"), ("tiny-sd3", True, "bf16"),
                                                 ("tiny-sdxl", True, "fp16"), ("tiny", True, "fp16"),
                                                 ("tiny-flux", False, "fp16")])
def test_dtype_auto_on_cuda_hands_each_family_its_precision(monkeypatch, model, auto, expected):
    """What a CUDA load hands torch (no GPU here): --dtype auto gives SD3/Flux bf16 and SD/SDXL fp16, an explicit
    --dtype is kept; the image keys name the dtype the family loads in."""
    import batch.models as models
    from batch.families import describe
    from batch.runner import pixel_salt

    seen = {}

    class Loaded(Exception):
        pass

    def capture(source, options, spec):
        seen["dtype"] = options.dtype
        raise Loaded

    monkeypatch.setattr(models, "_load_pipeline", capture)
    options = models.LoadOptions("cuda:0", "fp16", dtype_auto=auto)
    with pytest.raises(Loaded):
        models.load_family(model, options)
    assert seen["dtype"] == expected
    assert f"|dtype={expected}" in pixel_salt(options, describe(model).family)
