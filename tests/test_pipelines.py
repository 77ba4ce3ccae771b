"""One set of weights per model: the txt2img, img2img and image-prompt views share every module."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def family():
    from batch.models import LoadOptions, load_family

    return load_family("tiny", LoadOptions(device="cpu", dtype="fp32"))


def _storages(module) -> dict[int, int]:
    return {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in module.parameters()}


def test_views_share_unet_vae_and_text_encoder(family):
    base = family.txt2img
    for view in (family.img2img, family.image_prompt):
        for name in ("unet", "vae", "text_encoder", "tokenizer", "image_encoder", "scheduler"):
            assert getattr(view, name) is getattr(base, name), name
    assert type(family.img2img).__name__ == "StableDiffusionImg2ImgPipeline"


def test_views_add_no_parameter_memory(family):
    import torch

    one = {}
    for name, component in family.txt2img.components.items():
        if isinstance(component, torch.nn.Module):
            one.update(_storages(component))
    every = {}
    for view in family.views():
        for component in view.components.values():
            if isinstance(component, torch.nn.Module):
                every.update(_storages(component))
    assert one and every == one  # same storages, same bytes: building the views copied nothing
    assert sum(every.values()) == sum(one.values())


def test_scheduler_switch_reaches_every_view(family):
    family.use_scheduler("euler_a")
    assert {type(v.scheduler).__name__ for v in family.views()} == {"EulerAncestralDiscreteScheduler"}
    family.use_scheduler("dpmpp_2m_karras")
    scheduler = family.txt2img.scheduler
    assert scheduler.config.use_karras_sigmas and all(v.scheduler is scheduler for v in family.views())
