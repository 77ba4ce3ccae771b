"""Memory over a run of many LoRAs: one adapter in the model at a time, no state dicts piling up (issue 19, item 7)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, cli, pixels, write_jsonl

COUNT = 40  # distinct LoRAs, one image each
RANK = 128  # large for the tiny UNet (2 MiB a LoRA), so 40 held at once would show in the RSS
# One thread: tiny matrices, and on a busy 2-core machine two torch threads wait on each other (10x slower).
SMALL = ["--model", "tiny", "--device", "cpu", "--steps", "2", "--width", "32", "--height", "32", "--threads", "1",
         "--quiet"]


def make_loras(folder: Path, count: int, rank: int) -> list[Path]:
    """`count` random LoRAs for the tiny UNet, as make_tiny_lora saves them, from one peft-wrapped UNet."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(REPO / "models" / "tiny", subfolder="unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    paths = []
    for i in range(count):
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, parameter in unet.named_parameters():
                if "lora_" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        name = f"lora_{i:02d}.safetensors"
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name=name,
                                                  safe_serialization=True)
        paths.append(folder / name)
    return paths


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _lora_numbers(family) -> dict:
    """What LoRA weights the process holds now: in the model (adapters, elements) and in the adapter store."""
    adapters = {name for names in family.txt2img.get_list_adapters().values() for name in names}
    in_model = sum(p.numel() for n, p in family.txt2img.unet.named_parameters() if "lora_" in n)
    held = family.adapters.loras  # state dicts read and not yet loaded into a model
    return {"adapters": len(adapters), "model_elements": in_model, "held": len(held), "rss": _rss()}


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> list[Path]:
    return make_loras(tmp_path_factory.mktemp("loras"), COUNT, RANK)


def test_forty_loras_hold_one_adapter_at_a_time(tmp_path, loras, monkeypatch):
    from batch.models import PipelineFamily

    real, seen = PipelineFamily.use_lora, []

    def watched(family, reference, scale):
        changed = real(family, reference, scale)
        if changed and reference:  # sampled as each group's LoRA goes in, after the groups before it ran
            seen.append((reference, _lora_numbers(family)))
        return changed

    monkeypatch.setattr(PipelineFamily, "use_lora", watched)
    rows = [{"id": f"r{i:02d}", "prompt": f"a picture {i % 3}", "seed": i, "lora": str(path)}
            for i, path in enumerate(loras)]
    # The first LoRA again, after all the others, in its own group (another size): it must load again.
    again = {"id": "again", "prompt": "a picture 0", "seed": 0, "lora": str(loras[0]), "width": 40}
    manifest = write_jsonl(tmp_path / "m.jsonl", rows + [again])
    out = tmp_path / "out"
    assert cli(manifest, *SMALL, "--out", out, "--batch-size", "1") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["done"] == COUNT + 1 and report["totals"]["failed"] == 0

    assert [reference for reference, _ in seen] == [str(p) for p in loras] + [str(loras[0])]
    one_lora = seen[0][1]["model_elements"]
    after_first, last = seen[1][1], seen[-1][1]  # RSS from the second sample: the first image's allocations are in
    print(f"after the first group: {after_first}; at the last: {last}; one LoRA = {one_lora} elements")
    most = {key: max(numbers[key] for _, numbers in seen) for key in ("adapters", "model_elements", "held")}
    assert most["adapters"] <= 1, f"adapters in the model: up to {most['adapters']} over {COUNT + 1} groups"
    assert most["model_elements"] <= one_lora, (
        f"LoRA elements in the UNet: up to {most['model_elements']} ({most['model_elements'] / one_lora:.0f} LoRAs)")
    assert most["held"] <= 1, f"state dicts held by the adapter store: up to {most['held']} of {COUNT}"
    lora_bytes = one_lora * 4  # float32
    growth = last["rss"] - after_first["rss"]
    assert growth < 10 * lora_bytes, (  # all kept: 39 more LoRAs in the model alone
        f"RSS grew {growth / 2**20:.1f} MiB from the first group to the last ({lora_bytes / 2**20:.1f} MiB a LoRA)")

    # The LoRA deleted after its group and loaded again draws what a run of that row alone draws.
    alone = write_jsonl(tmp_path / "alone.jsonl", [again])
    assert cli(alone, *SMALL, "--out", tmp_path / "alone", "--batch-size", "1") == 0
    difference = np.abs(pixels(out / "images/again.png") - pixels(tmp_path / "alone/images/again.png"))
    assert difference.max() == 0, f"LoRA loaded again: pixels differ by up to {difference.max()}"


def test_a_lora_file_changed_during_the_run_is_not_loaded_under_the_old_key(tmp_path, loras):
    """A LoRA read again (after its adapter was deleted) must have the content its image keys carry."""
    import shutil

    from batch.adapters import check_adapters
    from batch.config import Defaults
    from batch.errors import ModelError
    from batch.manifest import load_manifest
    from batch.models import LoadOptions

    path = Path(shutil.copy(loras[3], tmp_path / "changing.safetensors"))
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": "x", "lora": str(path)}])
    jobs = load_manifest(manifest, Defaults(model="tiny"), 0).jobs
    store = check_adapters(jobs, LoadOptions(device="cpu", dtype="fp32"))
    salt = store.salt(jobs[0])
    assert store.lora(str(path)).digest in salt  # the first load takes what the check read
    assert not store.loras, "the state dict is still held after it was handed over"
    assert store.lora(str(path)).digest in salt  # read again (its adapter was deleted): same content
    assert not store.loras, "a state dict read again for a load is kept after it"
    shutil.copy(loras[4], path)
    with pytest.raises(ModelError, match="changed"):
        store.lora(str(path))
    assert store.salt(jobs[0]) == salt
