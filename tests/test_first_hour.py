"""What a new user tripped over in the first hour (issue 21.6): each as the user met it."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import FAST, REPO, cli, write_jsonl

import batch
from batch.errors import ManifestError


def test_a_command_piped_into_head_exits_quietly(tmp_path):
    """`sdbatch compare ... --format json | head`: the reader is gone before sdbatch writes."""
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": "a red circle", "seed": 1}])
    assert cli(manifest, *FAST, "--out", tmp_path / "out", "--quiet") == 0
    proc = subprocess.Popen([sys.executable, "-m", "batch.cli", "compare", str(tmp_path / "out"),
                             str(tmp_path / "out"), "--format", "json"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # as `head` does once it has its lines
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == 141


def test_status_of_a_folder_that_is_not_an_output_is_exit_2_as_the_readme_says(tmp_path, capsys):
    assert cli("status", tmp_path) == 2
    assert "is this an sdbatch output folder?" in capsys.readouterr().err
    assert "2 when OUT is not an sdbatch output folder" in (REPO / "README.md").read_text()


def test_generator_load_lora_fails_at_once_with_one_message(tmp_path):
    with batch.Generator("tiny", device="cpu", steps=2, width=32, height=32, quiet=True) as gen:
        with pytest.raises(ManifestError) as caught:
            gen.load_lora("missing.safetensors")
        text = str(caught.value)
        assert "missing.safetensors" in text and "the current directory" in text
        assert "manifest" not in text and "lora_scale" not in text, text
        assert gen.lora is None
        assert len(gen.generate("a red circle", seed=1)) == 1  # the Generator is still usable


def test_generator_shows_no_diffusers_bars(capfd):
    with batch.Generator("tiny", device="cpu", steps=3, width=32, height=32) as gen:
        gen.generate("a red circle", seed=1)
    err = capfd.readouterr().err
    assert "it/s" not in err and "%|" not in err, err


def test_a_prompt_runs_failed_rows_keep_every_parameter(tmp_path, monkeypatch):
    """Rerunning failed.jsonl must make the same job, not one with the run's defaults."""
    from batch import execute
    from batch.errors import ModelError

    def refuse(model, options):
        raise ModelError("no model in this test")

    monkeypatch.setattr(execute, "load_family", refuse)
    out = tmp_path / "single"
    code = cli("--prompt", "a red circle", "--model", "tiny", "--device", "cpu", "--steps", "7", "--cfg", "3.5",
               "--width", "96", "--height", "64", "--scheduler", "euler", "--out", out, "--quiet")
    assert code == 1
    row = json.loads((out / "failed.jsonl").read_text().splitlines()[0])
    assert (row["steps"], row["cfg"], row["width"], row["height"], row["scheduler"]) == (7, 3.5, 96, 64, "euler")


def test_the_demos_img2img_tiles_show_what_their_ids_say(tmp_path):
    """`make demo`'s first impression: the 0.8 tile follows its prompt, the 0.3 tile keeps its init."""
    from judge import judge
    from PIL import Image

    rows = [json.loads(line) for line in (REPO / "manifests" / "demo.jsonl").read_text().splitlines()]
    wanted = {"triangle-turns-square": ("yellow", "square"), "square-kept": ("blue", "square")}
    rows = [dict(row, init_image=str(REPO / "manifests" / row["init_image"])) for row in rows if row["id"] in wanted]
    manifest = write_jsonl(tmp_path / "demo.jsonl", rows)
    assert cli(manifest, "--model", "tiny", "--device", "cpu", "--out", tmp_path / "out", "--quiet") == 0
    for image_id, (colour, shape) in wanted.items():
        verdict = judge(Image.open(tmp_path / "out" / "images" / f"{image_id}.png"))
        assert (verdict.colour, verdict.shape) == (colour, shape), f"{image_id} shows {verdict}"


def test_repeated_prompt_runs_into_one_folder_keep_every_image(tmp_path, capsys):
    out = tmp_path / "single"
    for prompt in ("a red circle", "a blue square", "a red circle"):  # the third is the first again: skipped
        assert cli("--prompt", prompt, *FAST, "--out", out, "--quiet") == 0
    capsys.readouterr()
    assert cli("status", out, "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"total": 2, "done": 2, "failed": 0, "pending": 0}
    lines = (out / "images" / "metadata.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["prompt"] for line in lines) == ["a blue square", "a red circle"]
    assert json.loads((out / "report.json").read_text())["totals"]["done"] == 2


def test_a_rerun_that_makes_nothing_keeps_the_first_runs_figures(tmp_path, capsys):
    """A second run that makes nothing used to rewrite the report as "0.00 img/s" and make compare pass."""
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": f"r{i}", "prompt": "a red circle", "seed": i} for i in range(3)])
    out = tmp_path / "out"
    assert cli(manifest, *FAST, "--out", out, "--quiet") == 0
    first = json.loads((out / "report.json").read_text())
    assert first["totals"]["generated"] == 3 and first["totals"]["images_per_s"] > 0
    assert cli(manifest, *FAST, "--out", out, "--quiet") == 0  # everything done: makes nothing
    again = json.loads((out / "report.json").read_text())
    assert (again["reported_run"], again["latest_run"]) == (1, 2)
    assert again["totals"]["generated"] == 3 and again["totals"]["images_per_s"] == first["totals"]["images_per_s"]
    assert again["groups"] == first["groups"]
    assert [(r["run"], r["generated"], r["skipped_from_checkpoint"]) for r in again["runs"]] == [(1, 3, 0), (2, 0, 3)]
    markdown = (out / "report.md").read_text()
    assert "The latest run (2) made no images" in markdown and "## Runs" in markdown
    assert "Runs (2)" in (out / "report.html").read_text()
    assert cli("report", out) == 0  # rebuilt from the checkpoint: the same
    assert json.loads((out / "report.json").read_text())["totals"]["images_per_s"] == first["totals"]["images_per_s"]
    capsys.readouterr()
    assert cli("compare", out, out, "--format", "json") == 0
    compared = json.loads(capsys.readouterr().out)
    assert compared["new"]["run"] == 1 and compared["new"]["latest_run"] == 2 and len(compared["groups"]) == 1
    assert cli("compare", out, out) == 0
    assert "run 1 (the latest that made images; run 2 made none)" in capsys.readouterr().out


def test_final_adapter_files_follow_the_umask(tmp_path):
    """safetensors writes 0600 whatever the umask: a trained adapter is meant to be shared."""
    import os
    import stat

    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from batch.train.export import save_diffusers, save_kohya

    unet = UNet2DConditionModel.from_pretrained(REPO / "models" / "tiny", subfolder="unet")
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    previous = os.umask(0o022)
    try:
        files = [save_diffusers(unet, tmp_path / "final", {"ss_network_dim": "2"}),
                 save_kohya(unet, tmp_path / "final" / "mine.safetensors")]
    finally:
        os.umask(previous)
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, f"{path.name}: {oct(stat.S_IMODE(path.stat().st_mode))}"
