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

    import batch.interrupt as interrupt

    monkeypatch.setattr(interrupt, "GracefulStop", StopAfterTwoSteps)  # the CLI's, handed to train_lora
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


ATTENTION = "to_q,to_k,to_v,to_out.0"


@pytest.mark.parametrize("targets", [ATTENTION, "conv1,conv2", f"{ATTENTION},conv1,conv2"],
                         ids=["attention", "conv", "both"])
def test_load_lora_weights_applies_every_module_the_diffusers_file_holds(dataset, tmp_path, targets):
    """The README's recipe adapts attention and convolutions: `load_lora_weights` must apply all of them
    (a file with peft names for some modules and diffusers' older names for others loads only in part)."""
    from diffusers import StableDiffusionPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = tmp_path / "lora"
    assert cli("train-lora", dataset, "--out", out, *TRAIN, "--max-steps", "1", "--checkpoint-every", "1",
               "--target-modules", targets) == 0
    saved = load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))
    ups = {}  # module -> its trained up (B) matrix, whichever naming the file uses
    for key, tensor in saved.items():
        for up in (".lora_B.weight", ".lora.up.weight"):
            if key.endswith(up):
                ups[key.removeprefix("unet.").removesuffix(up)] = tensor
    assert len(ups) * 2 == len(saved), sorted(saved)[:4]
    wanted = targets.split(",")
    assert all(any(name.endswith(t) for t in wanted) for name in ups)
    assert {t for t in wanted if any(name.endswith(t) for name in ups)} == set(wanted), "every target is in the file"

    pipe = StableDiffusionPipeline.from_pretrained(REPO / "models" / "tiny", safety_checker=None)
    pipe.load_lora_weights(out / "final", weight_name="pytorch_lora_weights.safetensors", adapter_name="trained")
    applied = set()
    for name, module in pipe.unet.named_modules():
        if isinstance(module, BaseTunerLayer) and "trained" in module.active_adapters and "trained" in module.lora_B:
            weight = module.lora_B["trained"].weight.detach()
            if name in ups and weight.abs().max() > 0 and torch.equal(weight.reshape(ups[name].shape), ups[name]):
                applied.add(name)
    assert len(applied) == len(ups), f"load_lora_weights applied {len(applied)} of {len(ups)} saved modules"


def test_a_failed_adapter_write_leaves_the_previous_files_whole(tmp_path, monkeypatch):
    """final/ is written again when a finished run is resumed for more steps: a kill or a full disk
    halfway through must leave the previous adapter, not half a file."""
    import safetensors.torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from batch.train.export import DIFFUSERS_NAME, save_diffusers, save_kohya

    unet = UNet2DConditionModel.from_pretrained(REPO / "models" / "tiny", subfolder="unet")
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_q", "conv1"]))
    folder = tmp_path / "final"
    paths = [save_diffusers(unet, folder, {"ss_steps": "1"}), save_kohya(unet, folder / "mine.safetensors", {"ss_steps": "1"})]
    before = {path: load_file(str(path)) for path in paths}
    assert paths[0].name == DIFFUSERS_NAME

    real = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None):
        real(dict(list(tensors.items())[:1]), filename, metadata=metadata)  # a part of the file, then the error
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(1.0)
    for save in (lambda: save_diffusers(unet, folder, {"ss_steps": "2"}),
                 lambda: save_kohya(unet, folder / "mine.safetensors", {"ss_steps": "2"})):
        with pytest.raises(OSError):
            save()
    for path, tensors in before.items():
        now = load_file(str(path))
        assert now.keys() == tensors.keys(), f"{path.name}: {len(now)} of {len(tensors)} tensors left"
        assert all(torch.equal(now[k], tensors[k]) for k in tensors), path.name


def test_a_model_that_predicts_the_sample_is_refused(dataset, tmp_path, capsys):
    """Only epsilon and v-prediction targets are trained (diffusers' trainer: "Unknown prediction type")."""
    import shutil

    model = tmp_path / "tiny-sample"
    shutil.copytree(REPO / "models" / "tiny", model)
    config_path = model / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**scheduler, "prediction_type": "sample"}))
    args = [a if a != "tiny" else str(model) for a in TRAIN]
    capsys.readouterr()
    assert cli("train-lora", dataset, "--out", tmp_path / "out", *args, "--max-steps", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "prediction_type 'sample'" in err and "Traceback" not in err
    assert not list((tmp_path / "out").glob("checkpoint-*")) and not (tmp_path / "out" / "final").exists()


def _fake_gpus(monkeypatch, count: int) -> list:
    """torch.cuda with `count` devices that records what it is handed; nothing runs on them."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    return calls


def test_device_cuda_1_makes_gpu_1_the_one_the_accelerator_uses(dataset, tmp_path, monkeypatch):
    """One process: accelerate's device is then "cuda", the current device; GPU 1 must be made current first."""
    import accelerate
    from torch.cuda._utils import _get_device_index

    from batch.train.lora import LoraTrainConfig, train_lora

    calls = _fake_gpus(monkeypatch, 2)

    class Built(Exception):
        pass

    def accelerator(*args, **kwargs):
        calls.append(("Accelerator", kwargs.get("cpu")))
        raise Built  # the training itself would need the GPU

    monkeypatch.setattr(accelerate, "Accelerator", accelerator)
    with pytest.raises(Built):
        train_lora(LoraTrainConfig(dataset, tmp_path / "out", model="tiny", device="cuda:1", max_steps=1, quiet=True))
    assert [name for name, _ in calls] == ["set_device", "Accelerator"] and calls[1][1] is False, calls
    assert _get_device_index(calls[0][1]) == 1, f"set_device got {calls[0][1]!r}"


def test_device_cuda_n_under_a_launcher_is_refused(dataset, tmp_path, monkeypatch, capsys):
    """Under torchrun every rank takes cuda:LOCAL_RANK: one GPU named for all of them is an error, not GPU 0."""
    _fake_gpus(monkeypatch, 2)
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    args = [a if a != "cpu" else "cuda:1" for a in TRAIN]
    capsys.readouterr()
    assert cli("train-lora", dataset, "--out", tmp_path / "out", *args, "--max-steps", "1") == 2
    assert "--device cuda:1 under a launcher" in capsys.readouterr().err


def test_resume_on_a_changed_training_folder_is_refused_naming_the_change(dataset, tmp_path, capsys):
    """The batches of each step are drawn from the examples by index: a resumed run must see the same ones."""
    import shutil

    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    out = tmp_path / "out"
    options = [*TRAIN, "--max-steps", "1", "--checkpoint-every", "1"]
    assert cli("train-lora", data, "--out", out, *options) == 0
    assert json.loads((out / "train.json").read_text())["dataset_fingerprint"]["images"] == 6

    metadata = data / "metadata.jsonl"
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    image = data / rows[0]["file_name"]
    original = image.read_bytes()

    def recaption(rows_now):
        metadata.write_text("".join(json.dumps(r) + "\n" for r in rows_now))

    changes = {
        "captions differ": lambda: recaption([{**rows[0], "text": "a blue diamond, on grass"}, *rows[1:]]),
        "6 images then, 5 now": lambda: recaption(rows[1:]),
        "other file names, or another order": lambda: recaption([rows[1], rows[0], *rows[2:]]),
        "file sizes differ": lambda: Image.open(image).save(image, compress_level=0),  # same pixels, another file
    }
    for reason, change in changes.items():
        change()
        capsys.readouterr()
        assert cli("train-lora", data, "--out", out, *options, "--max-steps", "2", "--resume", "latest") == 2, reason
        err = capsys.readouterr().err
        assert "changed since that run began" in err and reason in err, err
        recaption(rows)
        image.write_bytes(original)
    assert not (out / "checkpoint-2").exists()
    moved = tmp_path / "moved"  # the same images elsewhere: the same training folder
    data.rename(moved)
    assert cli("train-lora", moved, "--out", out, *options, "--max-steps", "2", "--resume", "latest") == 0
    assert (out / "checkpoint-2").is_dir()


COLLECTIVES = ("wait_for_everyone", "reduce", "gather", "check_trigger", "save_state", "load_state")


@pytest.mark.parametrize("ending", ["finished", "interrupted"])
def test_every_rank_tears_down_together_after_final_is_written(dataset, tmp_path, monkeypatch, ending):
    """wait_for_everyone, the main process writes final/, then every rank waits, frees what accelerate
    prepared (the DDP wrapper holds the gloo group) and only then destroys the group. A rank tearing down
    after its peer had left sat in gloo's teardown for ever (CI, and 1 of 8 local torchrun runs)."""
    import accelerate

    import batch.train.lora as lora
    from batch.context import RunContext
    from batch.interrupt import Stop

    events = []
    for name in (*COLLECTIVES, "free_memory", "end_training"):
        real = getattr(accelerate.Accelerator, name)

        def spy(self, *args, _name=name, _real=real, **kwargs):
            if _name == "end_training":
                events.append(f"end_training (accelerate still holds {len(self._models)} model(s))")
            else:
                events.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(accelerate.Accelerator, name, spy)
    for name in ("save_diffusers", "save_kohya"):
        real = getattr(lora, name)

        def record(unet, path, *args, _name=name, _real=real, **kwargs):
            events.append(f"write {Path(path).relative_to(tmp_path / 'out').parts[0]}")
            return _real(unet, path, *args, **kwargs)

        monkeypatch.setattr(lora, name, record)

    class StopAfterOneStep(Stop):
        """An interrupt during step 2, as a Ctrl-C sets `requested`."""

        @property
        def requested(self):
            return ending == "interrupted" and events.count("check_trigger") >= 1

        @requested.setter
        def requested(self, value):
            pass

    config = lora.LoraTrainConfig(dataset, tmp_path / "out", model="tiny", device="cpu", batch_size=2, max_steps=3,
                                  checkpoint_every=5, quiet=True)
    result = lora.train_lora(config, RunContext.single("cpu", StopAfterOneStep()))
    assert result.interrupted == (ending == "interrupted")
    teardown = ["wait_for_everyone", "free_memory", "wait_for_everyone", "end_training (accelerate still holds 0 model(s))"]
    assert events[-4:] == teardown, events[-8:]
    if ending == "interrupted":  # the checkpoint of the step every rank stopped at, then the end
        last_check = len(events) - 1 - events[::-1].index("check_trigger")
        assert "save_state" in events[last_check:] and "write final" not in events, events[last_check:]
        return
    first_final = events.index("write final")
    assert events[first_final - 1] == "wait_for_everyone" and "check_trigger" in events[first_final - 3:first_final], \
        events[first_final - 6:]
    assert all(e.startswith("write ") for e in events[first_final:-4]), events[first_final:]
