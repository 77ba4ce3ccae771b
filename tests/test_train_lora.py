"""train-lora on the embedded model, on a CPU: outputs, both adapter formats, resume equality, failures."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, cli, pixels, read_metadata, write_jsonl
from safetensors.torch import load_file

from batch.toy.world import write_folder

TRAIN = ["--model", "tiny", "--device", "cpu", "--batch-size", "2", "--lr", "1e-3", "--quiet"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Six drawings of the new shape, prepared at the model's native 128 px."""
    root = tmp_path_factory.mktemp("diamonds")
    write_folder(root / "raw", 6, seed=1, shapes=("diamond",))
    assert cli("prepare-dataset", root / "raw", root / "data", "--size", "128", "--quiet") == 0
    return root / "data"


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "diamond-lora"
    code = cli("train-lora", dataset, "--out", out, *TRAIN, "--max-steps", "4", "--checkpoint-every", "2",
               "--rank", "4", "--alpha", "8", "--validation-prompt", "a red diamond", "--validation-images", "1")
    assert code == 0
    return out


def test_a_run_writes_checkpoints_both_formats_the_loss_log_and_validation(trained):
    assert sorted(p.name for p in trained.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    for checkpoint in trained.glob("checkpoint-*"):
        names = {p.name for p in checkpoint.iterdir()}
        assert {"pytorch_lora_weights.safetensors", "optimizer.bin", "scheduler.bin", "trainer_state.json"} <= names
        assert not [n for n in names if n.startswith("model")], "the frozen model must not be copied into checkpoints"
    rows = list(csv.DictReader((trained / "loss.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(float(r["loss"])) and float(r["lr"]) == pytest.approx(1e-3) for r in rows)
    run = json.loads((trained / "train.json").read_text())
    assert run["finished"] is True and run["step"] == 4 and run["images"] == 6 and run["settings"]["alpha"] == 8

    diffusers_file = trained / "final" / "pytorch_lora_weights.safetensors"
    kohya_file = trained / "final" / "diamond-lora.safetensors"
    diffusers_keys = load_file(str(diffusers_file))
    assert diffusers_keys and all(k.startswith("unet.") for k in diffusers_keys)
    kohya = load_file(str(kohya_file))
    alphas = {k: v for k, v in kohya.items() if k.endswith(".alpha")}
    assert alphas and all(float(v) == 8.0 for v in alphas.values())
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert len(kohya) == len(diffusers_keys) + len(alphas)

    from batch.train.export import read_metadata as adapter_metadata

    meta = adapter_metadata(kohya_file)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8" and meta["ss_steps"] == "4"
    assert json.loads(meta["sdbatch_training"])["rank"] == 4
    assert json.loads(adapter_metadata(diffusers_file)["sdbatch_training"])["lr"] == 1e-3

    steps = sorted(p.name for p in (trained / "validation").iterdir())
    assert steps == ["step-000000", "step-000002", "step-000004"]
    for step in steps:
        assert len(read_metadata(trained / "validation" / step)) == 1
    page = (trained / "validation.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 3 and "step 4" in page and "base" in page


def _generate(pipe, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = pipe("a red diamond", num_inference_steps=8, generator=generator, height=128, width=128,
                 output_type="np").images[0]
    return image


def test_both_formats_load_through_load_lora_weights_change_images_and_agree(trained):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(REPO / "models" / "tiny", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    base = _generate(pipe)
    pipe.load_lora_weights(trained / "final", weight_name="pytorch_lora_weights.safetensors")
    with_diffusers = _generate(pipe)
    pipe.unload_lora_weights()
    assert np.abs(_generate(pipe) - base).max() < 1e-5, "unloading restores the base model"
    pipe.load_lora_weights(str(trained / "final" / "diamond-lora.safetensors"))  # kohya keys, alpha 8 / rank 4
    with_kohya = _generate(pipe)
    assert np.abs(with_diffusers - base).max() > 0.02, "the adapter must change the image"
    # the same weights through both converters (alpha scale included): the same image
    assert np.abs(with_kohya - with_diffusers).max() < 1e-3


def test_a_manifest_row_with_the_trained_lora_runs(trained, tmp_path):
    adapter = trained / "final" / "pytorch_lora_weights.safetensors"
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "plain", "prompt": "a red diamond", "seed": 5},
        {"id": "lora", "prompt": "a red diamond", "seed": 5, "lora": str(adapter)},
        {"id": "kohya", "prompt": "a red diamond", "seed": 5, "lora": str(trained / "final" / "diamond-lora.safetensors")},
    ])
    out = tmp_path / "out"
    assert cli(manifest, "--model", "tiny", "--device", "cpu", "--steps", "8", "--width", "128", "--height", "128",
               "--out", out, "--quiet") == 0
    plain, lora, kohya = (pixels(out / "images" / f"{name}.png") for name in ("plain", "lora", "kohya"))
    assert np.abs(plain - lora).max() > 5
    assert np.abs(lora - kohya).max() <= 2


def _adapter(folder: Path) -> dict:
    return load_file(str(folder / "final" / "pytorch_lora_weights.safetensors"))


def test_ten_steps_kill_resume_equals_twenty_straight(dataset, tmp_path):
    options = [*TRAIN, "--max-steps", "12", "--checkpoint-every", "4", "--random-flip", "--caption-dropout", "0.2",
               "--snr-gamma", "5", "--noise-offset", "0.05", "--lr-scheduler", "cosine", "--grad-accum", "2"]
    straight = tmp_path / "straight"
    assert cli("train-lora", dataset, "--out", straight, *options) == 0

    killed = tmp_path / "killed"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(REPO / "run_batch.py"), "train-lora", str(dataset), "--out", str(killed),
                             *options], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not (killed / "checkpoint-4" / "trainer_state.json").exists():
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists()
    resumed_from = max(int(p.name.split("-")[1]) for p in killed.glob("checkpoint-*"))
    assert resumed_from in (4, 8)

    assert cli("train-lora", dataset, "--out", killed, *options) == 2  # without --resume: refused, nothing lost
    assert cli("train-lora", dataset, "--out", killed, *options, "--resume", "latest") == 0
    a, b = _adapter(straight), _adapter(killed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    steps = [int(r["step"]) for r in csv.DictReader((killed / "loss.csv").open())]
    assert steps == list(range(1, 13)), "loss.csv continues from the checkpoint without gaps or repeats"
    straight_loss = [float(r["loss"]) for r in csv.DictReader((straight / "loss.csv").open())]
    killed_loss = [float(r["loss"]) for r in csv.DictReader((killed / "loss.csv").open())]
    assert np.allclose(straight_loss, killed_loss, rtol=1e-5)


def test_cached_latents_change_speed_only(dataset, tmp_path):
    options = [*TRAIN, "--max-steps", "3", "--checkpoint-every", "3", "--random-flip"]
    assert cli("train-lora", dataset, "--out", tmp_path / "plain", *options) == 0
    assert cli("train-lora", dataset, "--out", tmp_path / "cached", *options, "--cache-latents") == 0
    a, b = _adapter(tmp_path / "plain"), _adapter(tmp_path / "cached")
    # the VAE encodes all images in one batch when caching, one batch per step otherwise: float32 rounding
    # differs by ~1e-6, while any real difference in the latents moves Adam's steps by ~lr (1e-3)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)
    moved = max(a[key].abs().max().item() for key in a if any(up in key for up in ("lora_B", "lora.up", "lora_up")))
    assert moved > 1e-4, "the adapter trained: the comparison is not between two zero tensors"


def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(dataset, tmp_path, monkeypatch, capsys):
    import batch.train.lora as lora

    real = lora._loss
    calls = []

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)
        calls.append(1)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(lora, "_loss", poisoned)
    out = tmp_path / "nan"
    assert cli("train-lora", dataset, "--out", out, *TRAIN, "--max-steps", "6", "--checkpoint-every", "2") == 1
    err = capsys.readouterr().err
    assert "loss is nan at step 3" in err and "checkpoint-2" in err and "Traceback" not in err
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    assert not (out / "final").exists()


def test_an_interrupt_saves_a_checkpoint_and_exits_130(dataset, tmp_path, monkeypatch):
    import batch.train.lora as lora

    class StopAfterTwoSteps(lora.GracefulStop):
        checks = 0

        @property
        def requested(self):
            StopAfterTwoSteps.checks += 1
            return StopAfterTwoSteps.checks >= 2

        @requested.setter
        def requested(self, value):
            pass

    monkeypatch.setattr(lora, "GracefulStop", StopAfterTwoSteps)
    out = tmp_path / "stopped"
    assert cli("train-lora", dataset, "--out", out, *TRAIN, "--max-steps", "6", "--checkpoint-every", "5") == 130
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    monkeypatch.undo()
    assert cli("train-lora", dataset, "--out", out, *TRAIN, "--max-steps", "6", "--checkpoint-every", "5",
               "--resume", "latest") == 0
    assert json.loads((out / "train.json").read_text())["step"] == 6


@pytest.mark.parametrize("problem", ["missing", "no-images", "caption", "size", "fp16-cpu", "model", "resume-dir"])
def test_a_bad_dataset_or_option_exits_2_before_any_model_loads(tmp_path, monkeypatch, capsys, problem):
    import batch.train.lora as lora

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(lora, "_load", must_not_load)
    data = tmp_path / "data"
    write_folder(data, 2, seed=0)
    args = ["train-lora", data, "--out", tmp_path / "out", *TRAIN]
    if problem == "missing":
        args[1] = tmp_path / "nowhere"
    elif problem == "no-images":
        for p in data.glob("*.png"):
            p.unlink()
    elif problem == "caption":
        (data / "0001.txt").write_bytes(b"\xff\xfe bad \x80")
    elif problem == "size":
        from PIL import Image

        Image.new("RGB", (100, 100), (200, 30, 30)).save(data / "0002.png")
    elif problem == "fp16-cpu":
        args += ["--mixed-precision", "fp16"]
    elif problem == "model":
        args[args.index("tiny")] = str(tmp_path / "no-model")
    else:
        args += ["--resume", str(tmp_path / "no-checkpoint")]
    capsys.readouterr()
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    assert {"caption": "0001.txt", "size": "100x100", "fp16-cpu": "fp16"}.get(problem, "") in err
    assert not (tmp_path / "out" / "checkpoint-1").exists()
