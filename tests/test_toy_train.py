"""The embedded model's training recipe (`batch.toy.train`): its captions, and a short run that saves a loadable model."""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import replace

import pytest

from batch.toy import train
from batch.toy.world import COLOURS, SHAPES, sample_scene


@pytest.mark.parametrize("attributes", [("shape",), ("colour", "shape")])
def test_label_noise_names_another_drawing_as_often_as_configured(attributes):
    config = replace(train.TrainConfig(), label_noise=0.3, label_noise_attributes=attributes)
    rng = random.Random(0)
    scene = sample_scene(rng, colour="red", shape="circle")
    captions = Counter(train.noisy_caption(scene, rng, config) for _ in range(20000))
    true, colour, shape, empty = train.caption_choices(scene)
    full = {f"a {c} {s}" for c in COLOURS for s in SHAPES}
    wrong = {caption: n for caption, n in captions.items() if caption in full and caption != true}
    assert abs(sum(wrong.values()) / (sum(wrong.values()) + captions[true]) - 0.3) < 0.02, captions
    # every drawing that differs only in the noisy attributes is named, none more than its share
    expected = {f"a {c} {s}" for c in (COLOURS if "colour" in attributes else ["red"])
                for s in (SHAPES if "shape" in attributes else ["circle"])} - {true}
    assert set(wrong) == expected and max(wrong.values()) < 2 * min(wrong.values())
    # the one-word and empty captions (negative prompts, guidance's unconditional half) stay true
    assert set(captions) - full == {colour, shape, empty}


def test_no_label_noise_keeps_every_caption_true():
    config = replace(train.TrainConfig(), label_noise=0.0)
    rng = random.Random(1)
    scene = sample_scene(rng, colour="blue", shape="triangle")
    assert {train.noisy_caption(scene, rng, config) for _ in range(2000)} == set(train.caption_choices(scene))


@pytest.mark.slow
def test_a_short_training_run_saves_a_model_that_diffusers_loads(tmp_path):
    """The documented command's stages end to end, at a few steps each (not a quality check)."""
    from diffusers import StableDiffusionPipeline

    config = replace(train.TrainConfig(), images=24, vae_steps=2, steps=2, ip_steps=2, batch=4, vae_batch=4)
    summary = train.train(config, tmp_path / "tiny", tmp_path / "tiny-ip-adapter")
    written = json.loads((tmp_path / "tiny" / "training.json").read_text())
    assert written["config"]["label_noise"] == config.label_noise and written["model_bytes"] == summary["model_bytes"]
    assert (tmp_path / "tiny-ip-adapter" / "ip-adapter_tiny.safetensors").stat().st_size > 0
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "tiny", safety_checker=None)
    assert pipe.image_encoder is not None and pipe.unet.config.cross_attention_dim == config.width


SHORT = dict(images=24, vae_steps=2, steps=2, ip_steps=2, batch=4, vae_batch=4)


def test_out_that_is_not_an_earlier_model_is_refused_before_any_stage(tmp_path, monkeypatch, capsys):
    """`--out X` replaces X whole: a folder of anything else is refused, and nothing in it is touched."""
    def must_not_train(*args, **kwargs):
        raise AssertionError("a stage ran")

    monkeypatch.setattr(train, "make_data", must_not_train)
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"a photo")
    with pytest.raises(SystemExit) as exited:
        train.main(["--out", str(out), "--scale", "0.001"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and str(out) in err, err
    assert [p.name for p in out.iterdir()] == ["holiday.jpg"] and (out / "holiday.jpg").read_bytes() == b"a photo"
    # an earlier model with a file of the user's beside it: refused too, naming the file
    (out / "training.json").write_text(json.dumps({"config": {}, "seconds": {}, "model_bytes": 1}))
    with pytest.raises(train.BatchError, match="holiday.jpg"):
        train.train(train.TrainConfig(), out, tmp_path / "ip")


def _earlier_output(tmp_path):
    """An earlier model and adapter, as the recipe leaves them (stand-in contents)."""
    out, ip_out = tmp_path / "tiny", tmp_path / "tiny-ip-adapter"
    (out / "unet").mkdir(parents=True)
    (out / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"earlier unet")
    (out / "model_index.json").write_text("{}")
    (out / "training.json").write_text(json.dumps({"config": {}, "seconds": {}, "model_bytes": 12}))
    ip_out.mkdir()
    (ip_out / "ip-adapter_tiny.safetensors").write_bytes(b"earlier adapter")
    return out, ip_out


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_failed_ip_adapter_stage_leaves_the_earlier_model_and_adapter(tmp_path, monkeypatch):
    """The model is saved beside its adapter only once the IP-Adapter stage succeeded; then both are replaced."""
    out, ip_out = _earlier_output(tmp_path)
    before = {folder: _files(folder) for folder in (out, ip_out)}
    real = train.train_ip_adapter

    def fails(*args, **kwargs):
        raise RuntimeError("the IP-Adapter stage failed")

    monkeypatch.setattr(train, "train_ip_adapter", fails)
    config = replace(train.TrainConfig(), **SHORT)
    with pytest.raises(RuntimeError, match="IP-Adapter stage failed"):
        train.train(config, out, ip_out)
    assert {folder: _files(folder) for folder in (out, ip_out)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny", "tiny-ip-adapter"], "no temp folder is left"

    monkeypatch.setattr(train, "train_ip_adapter", real)
    summary = train.train(config, out, ip_out)  # an earlier output of the recipe: replaced
    assert json.loads((out / "training.json").read_text())["model_bytes"] == summary["model_bytes"]
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() != b"earlier unet"
    assert (ip_out / "ip-adapter_tiny.safetensors").stat().st_size == summary["ip_adapter_bytes"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny", "tiny-ip-adapter"]
    assert sorted(p.name for p in ip_out.iterdir()) == ["ip-adapter_tiny.safetensors"]
