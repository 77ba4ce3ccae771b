"""The tiny per-family models of models/ (built by batch.toy.families): load offline, draw, rebuild identically."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from batch.models import MODELS_DIR  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXPECTED = {
    "tiny-sd2-v": "StableDiffusionPipeline",
    "tiny-sdxl": "StableDiffusionXLPipeline",
    "tiny-sd3": "StableDiffusion3Pipeline",
    "tiny-flux": "FluxPipeline",
    "tiny-flux-schnell": "FluxPipeline",
    "tiny-pixart": "PixArtSigmaPipeline",
}


def _load(name: str):
    from diffusers import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(MODELS_DIR / name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_family_model_loads_and_draws(name):
    import torch

    pipe = _load(name)
    assert type(pipe).__name__ == EXPECTED[name]
    image = pipe(prompt="a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator("cpu").manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()
    assert image.std() > 0.05  # random weights draw noise, not a flat grey


def test_family_tokenizers():
    flux, sdxl = _load("tiny-flux"), _load("tiny-sdxl")
    t5 = flux.tokenizer_2
    ids = t5("a red circle", padding="max_length", max_length=16).input_ids
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)  # as T5
    assert ids == [*t5.convert_tokens_to_ids(["▁a", "▁red", "▁circle"]), 1] + [0] * 12
    assert len(t5) <= flux.text_encoder_2.config.vocab_size
    assert sdxl.tokenizer_2.pad_token == "!" and len(sdxl.tokenizer_2) <= sdxl.text_encoder_2.config.vocab_size


def test_family_rebuild_is_byte_identical(tmp_path):
    name = "tiny-flux"  # CLIP (re-keyed after saving), T5, transformer and VAE: every kind of weight file
    subprocess.run([sys.executable, "-m", "batch.toy.families", "--out", str(tmp_path), "--only", name],
                   cwd=REPO, check=True, capture_output=True, timeout=120,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    committed = sorted(p.relative_to(MODELS_DIR / name) for p in (MODELS_DIR / name).rglob("*.safetensors"))
    rebuilt = sorted(p.relative_to(tmp_path / name) for p in (tmp_path / name).rglob("*.safetensors"))
    assert committed == rebuilt and len(committed) == 4
    for rel in committed:
        assert (MODELS_DIR / name / rel).read_bytes() == (tmp_path / name / rel).read_bytes(), rel
