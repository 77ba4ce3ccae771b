"""Bad usage is answered before the first image (exit 2), not hours into a night: LoRAs that do not
load, IP-Adapter and image-encoder weights missing offline, options the rows cannot use."""
from __future__ import annotations

import json
import shutil

import pytest
from conftest import FAST, REPO, cli, make_image, make_tiny_lora, write_jsonl

TINY = REPO / "models" / "tiny"


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """Nothing downloaded, whatever this machine's own cache holds."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _refused(tmp_path, capsys, rows, *options, expect: tuple[str, ...]):
    """`validate` and `run` both exit 2 with every expected phrase, and `run` writes nothing."""
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out"
    for command in (["validate", manifest, *FAST, *options], [manifest, *FAST, *options, "--out", out]):
        assert cli(*command) == 2
        err = capsys.readouterr().err
        assert all(phrase in err for phrase in expect), err
        assert "Traceback" not in err
    assert not out.exists()


def test_attention_slicing_with_ip_adapter_rows_is_refused_up_front(tmp_path, images_dir, capsys):
    rows = [{"id": "ip", "prompt_image": str(images_dir / "prompt.png")}, {"id": "t", "prompt": "x"}]
    _refused(tmp_path, capsys, rows, "--attention-slicing", expect=("--attention-slicing", "row ip"))


def test_a_file_that_is_not_a_lora_is_refused(tmp_path, capsys):
    from safetensors.torch import save_file
    import torch

    save_file({"conv_in.weight": torch.zeros(4, 4)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 100)
    rows = [{"id": "a", "prompt": "x", "lora": "model.safetensors"}, {"id": "b", "prompt": "x", "lora": "garbage.safetensors"}]
    _refused(tmp_path, capsys, rows, expect=("2 problems", "not a LoRA", "model.safetensors", "cannot read LoRA",
                                            "garbage.safetensors", "row a", "row b"))


def test_a_lora_for_another_architecture_is_refused_before_any_model_loads(tmp_path, capsys, monkeypatch):
    """Shapes are checked on the model's UNet built on the meta device: no weights load."""
    from safetensors.torch import load_file, save_file

    import batch.execute as execute

    lora = make_tiny_lora(tmp_path)
    tensors = load_file(str(lora))
    wide = {k: (v.new_zeros(v.shape[0], v.shape[1] * 10) if "down" in k or "lora_A" in k else v) for k, v in tensors.items()}
    save_file(wide, str(tmp_path / "wide.safetensors"))
    monkeypatch.setattr(execute, "load_family", lambda *a: pytest.fail("a model loaded"))
    rows = [{"id": "w", "prompt": "x", "lora": "wide.safetensors"}]
    _refused(tmp_path, capsys, rows, expect=("does not fit model 'tiny'", "size mismatch", "row w"))


def test_a_lora_is_read_once_per_run(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    lora = make_tiny_lora(tmp_path)
    real, reads = StableDiffusionPipeline.lora_state_dict.__func__, []

    def counting(cls, reference, **kwargs):
        reads.append(reference)
        return real(cls, reference, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "lora_state_dict", classmethod(counting))
    rows = [{"id": f"r{i}", "prompt": "x", "seed": i, "lora": str(lora), "lora_scale": 0.5 + i % 2 / 2}
            for i in range(5)]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    assert cli(manifest, *FAST, "--out", tmp_path / "out", "--quiet", "--batch-size", "1") == 0
    assert [r for r in reads if r == str(lora)] == [str(lora)], reads


def _model_without_image_encoder(tmp_path):
    folder = tmp_path / "no-encoder"
    shutil.copytree(TINY, folder)
    shutil.rmtree(folder / "image_encoder")
    index = json.loads((folder / "model_index.json").read_text())
    index["image_encoder"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_image_encoders_missing_offline_are_refused_up_front(tmp_path, capsys, empty_hub_cache):
    model = _model_without_image_encoder(tmp_path)
    prompt = make_image(tmp_path / "p.png")
    rows = [{"id": "clip", "prompt_image": str(prompt), "image_prompt_method": "clip_embed", "model": str(model)},
            {"id": "ip", "prompt_image": str(prompt), "model": str(model)}]
    adapter = REPO / "models" / "tiny-ip-adapter" / "ip-adapter_tiny.safetensors"
    _refused(tmp_path, capsys, rows, "--ip-adapter", adapter,
             expect=("openai/clip-vit-large-patch14", "HF_HUB_OFFLINE", "row clip",
                     "image encoder of IP-Adapter", "row ip"))


def test_ip_adapter_weights_missing_offline_are_refused_up_front(tmp_path, images_dir, capsys, empty_hub_cache):
    rows = [{"id": "ip", "prompt_image": str(images_dir / "prompt.png")}]
    _refused(tmp_path, capsys, rows, "--ip-adapter", "someone/ip-adapters/models/ip-adapter_sd15.safetensors",
             expect=("cannot read IP-Adapter someone/ip-adapters/models/ip-adapter_sd15.safetensors",
                     "HF_HUB_OFFLINE", "row ip"))
