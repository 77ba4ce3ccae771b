"""IP-Adapter weight kinds on the tiny model: Plus and full-face run, FaceID is refused by name.

Each adapter is written at test time: the tiny adapter's own cross-attention weights
(`ip_adapter.*`) under a seeded random image projection (`image_proj.*`) in the original
h94/IP-Adapter layout of that kind, which diffusers' `_convert_ip_adapter_image_proj_to_diffusers`
recognises by its keys.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FAST, REPO, cli, make_image, pixels, read_metadata, write_jsonl

TINY = REPO / "models" / "tiny"
TINY_ADAPTER = REPO / "models" / "tiny-ip-adapter" / "ip-adapter_tiny.safetensors"


def _sizes() -> tuple[int, int]:
    """(image encoder hidden size, UNet cross-attention width) of the tiny model."""
    encoder = json.loads((TINY / "image_encoder" / "config.json").read_text())
    unet = json.loads((TINY / "unet" / "config.json").read_text())
    return encoder["hidden_size"], unet["cross_attention_dim"]


def _plus_projection(normal, embed: int, cross: int) -> dict:
    """IP-Adapter Plus's Resampler: 8 learned queries, 4 blocks (diffusers builds depth 4), 1 head of 64."""
    hidden, inner, queries = 32, 64, 8
    proj = {
        "latents": normal(1, queries, hidden, std=hidden ** -0.5),
        "proj_in.weight": normal(hidden, embed, std=embed ** -0.5), "proj_in.bias": normal(hidden, std=0.02),
        "proj_out.weight": normal(cross, hidden, std=hidden ** -0.5), "proj_out.bias": normal(cross, std=0.02),
        "norm_out.weight": 1.0 + normal(cross, std=0.02), "norm_out.bias": normal(cross, std=0.02),
    }
    for n in range(4):
        for norm in ("0.norm1", "0.norm2", "1.0"):  # the attention's two LayerNorms, the feed-forward's one
            proj[f"layers.{n}.{norm}.weight"] = 1.0 + normal(hidden, std=0.02)
            proj[f"layers.{n}.{norm}.bias"] = normal(hidden, std=0.02)
        proj[f"layers.{n}.0.to_q.weight"] = normal(inner, hidden, std=hidden ** -0.5)
        proj[f"layers.{n}.0.to_kv.weight"] = normal(2 * inner, hidden, std=hidden ** -0.5)
        proj[f"layers.{n}.0.to_out.weight"] = normal(hidden, inner, std=inner ** -0.5)
        proj[f"layers.{n}.1.1.weight"] = normal(4 * hidden, hidden, std=hidden ** -0.5)
        proj[f"layers.{n}.1.3.weight"] = normal(hidden, 4 * hidden, std=(4 * hidden) ** -0.5)
    return proj


def _full_face_projection(normal, embed: int, cross: int) -> dict:
    """IP-Adapter full-face's MLP over every image token: Linear(embed, embed), GELU, Linear(embed, cross), LayerNorm."""
    return {
        "proj.0.weight": normal(embed, embed, std=embed ** -0.5), "proj.0.bias": normal(embed, std=0.02),
        "proj.2.weight": normal(cross, embed, std=embed ** -0.5), "proj.2.bias": normal(cross, std=0.02),
        "proj.3.weight": 1.0 + normal(cross, std=0.02), "proj.3.bias": normal(cross, std=0.02),
    }


def _face_id_projection(normal, embed: int, cross: int) -> dict:
    """IP-Adapter FaceID's MLP from a 512-d InsightFace identity embedding to 4 tokens."""
    return {
        "proj.0.weight": normal(1024, 512, std=0.02), "proj.0.bias": normal(1024, std=0.02),
        "proj.2.weight": normal(4 * cross, 1024, std=0.02), "proj.2.bias": normal(4 * cross, std=0.02),
        "norm.weight": 1.0 + normal(cross, std=0.02), "norm.bias": normal(cross, std=0.02),
    }


def _face_id_plus_projection(normal, embed: int, cross: int) -> dict:
    """IP-Adapter FaceID Plus: FaceID's MLP and a perceiver resampler (only the keys that tell it apart)."""
    return {
        **_face_id_projection(normal, embed, cross),
        "perceiver_resampler.latents": normal(1, 4, 64, std=0.125),
        "perceiver_resampler.proj_in.weight": normal(64, embed, std=embed ** -0.5),
        "perceiver_resampler.proj_out.weight": normal(cross, 64, std=0.125),
    }


PROJECTIONS = {"plus": _plus_projection, "full-face": _full_face_projection, "faceid": _face_id_projection,
               "faceid-plus": _face_id_plus_projection}


def write_adapter(folder, kind: str):
    """A tiny IP-Adapter of `kind` as a flat .safetensors (`image_proj.*`, `ip_adapter.*`); returns its path."""
    import torch
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(0)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).contiguous()

    tensors = {k: v for k, v in load_file(str(TINY_ADAPTER)).items() if k.startswith("ip_adapter.")}
    tensors.update({f"image_proj.{k}": v for k, v in PROJECTIONS[kind](normal, *_sizes()).items()})
    path = folder / f"ip-adapter-{kind}_tiny.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize(("kind", "hidden"), [("plain", False), ("plus", True), ("full-face", True)])
def test_adapter_kinds_generate_from_the_embeddings_diffusers_would_use(tmp_path, images_dir, monkeypatch, kind, hidden):
    """Plus and full-face read the image encoder's hidden states, plain its pooled embedding.

    The tiny encoder's hidden size equals its projection width, so a full-face adapter fed
    the pooled embedding would run without a shape error: what was asked for is checked too.
    """
    from diffusers import StableDiffusionPipeline

    asked = []
    real = StableDiffusionPipeline.encode_image

    def encode_image(self, image, device, num_images_per_prompt, output_hidden_states=None):
        asked.append(bool(output_hidden_states))
        return real(self, image, device, num_images_per_prompt, output_hidden_states)

    monkeypatch.setattr(StableDiffusionPipeline, "encode_image", encode_image)
    make_image(images_dir / "green.png", (20, 220, 40), size=(40, 40))
    adapter = TINY_ADAPTER if kind == "plain" else write_adapter(tmp_path, kind)
    common = {"seed": 3, "prompt": "a vase", "prompt_image": "init.png"}
    manifest = write_jsonl(images_dir / "ip.jsonl", [
        {"id": "on", **common, "ip_scale": 1.0},
        {"id": "green", **common, "prompt_image": "green.png", "ip_scale": 1.0},  # same batch, its own image
        {"id": "off", **common, "ip_scale": 0},
        {"id": "no-cfg", **common, "ip_scale": 1.0, "cfg": 1.0},  # no unconditional half
    ])
    out = tmp_path / "out"
    assert cli(manifest, *FAST, "--ip-adapter", adapter, "--batch-size", "2", "--out", out, "--quiet") == 0
    assert asked == [hidden, hidden]  # once per distinct prompt image
    meta = {m["id"]: m for m in read_metadata(out)}
    assert sorted(meta) == ["green", "no-cfg", "off", "on"]
    image = {name: pixels(out / "images" / m["file_name"]) for name, m in meta.items()}
    assert all(im.shape == (64, 64, 3) for im in image.values())
    change = np.abs(image["on"] - image["off"]).max()
    assert change > 10, f"{kind} adapter changes the image by at most {change} levels at ip_scale 1 vs 0"


@pytest.mark.parametrize(("kind", "name"), [("faceid", "IP-Adapter FaceID,"), ("faceid-plus", "IP-Adapter FaceID Plus,")])
def test_face_id_adapters_are_refused_by_name(tmp_path, images_dir, capsys, kind, name):
    """FaceID needs InsightFace identity embeddings: refused before anything loads (exit 2), by
    `validate` as by `run`, naming the kind, the file and the rows that need it."""
    adapter = write_adapter(tmp_path, kind)
    manifest = write_jsonl(images_dir / "ip.jsonl", [{"id": "face", "prompt": "a portrait", "prompt_image": "init.png"},
                                                    {"id": "plain", "prompt": "a portrait", "seed": 1}])
    out = tmp_path / "out"
    for command in (["validate"], []):
        code = cli(*command, manifest, *FAST, "--ip-adapter", adapter, *([] if command else ["--out", out]))
        err = capsys.readouterr().err
        assert code == 2, err[-2000:]
        assert name in err and str(adapter) in err and "InsightFace" in err and "row face" in err, err[-2000:]
        assert "Traceback" not in err
    assert not out.exists()  # nothing generated, nothing written
