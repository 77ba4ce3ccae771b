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
