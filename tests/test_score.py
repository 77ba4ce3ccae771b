"""CLIP scores: `sdbatch score`, `run --clip-score`, their table in the checkpoint, the report's histograms.

One run of the embedded model (48 images: 12 prompts x 4 seeds at 128 px, 10 steps, plus a clip_embed
row) serves every check; each check that writes works on its own copy of the folder.
"""
from __future__ import annotations

import itertools
import json
import random
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, cli, read_metadata, record_figure, write_jsonl
from PIL import Image

from batch.interrupt import Stop
from batch.score import ClipScorer, resolve_clip, score_folder
from batch.toy.clip import swapped
from batch.toy.world import COLOURS, SHAPES, draw, sample_scene

CLIP = "tiny-clip"
PAIRS = list(itertools.product(sorted(COLOURS), SHAPES))
SEEDS = (1, 2, 3, 4)
# 10 steps at the model's own 128 px: every image shows its prompt (the judge: colour 47/48, shape 48/48);
# at 64 px the model draws an almost empty canvas, which no CLIP can score against a colour.
RUN = ["--model", "tiny", "--device", "cpu", "--steps", "10", "--width", "128", "--height", "128", "--quiet",
       "--batch-size", "8"]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """An output folder of 49 images, none scored yet (do not write into it: copy it)."""
    folder = tmp_path_factory.mktemp("score")
    draw(sample_scene(random.Random(5), 128, "red", "circle")).save(folder / "ref.png")
    rows = [{"id": f"{c}-{s}-{seed}", "prompt": f"a {c} {s}", "seed": seed} for (c, s), seed in
            itertools.product(PAIRS, SEEDS)]
    rows.append({"id": "like-ref", "prompt_image": "ref.png", "image_prompt_method": "clip_embed", "seed": 1})
    assert cli(write_jsonl(folder / "m.jsonl", rows), *RUN, "--out", folder / "out") == 0
    return folder / "out"


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "out"))


@pytest.fixture(scope="module")
def scored(made: Path, tmp_path_factory) -> Path:
    out = Path(shutil.copytree(made, tmp_path_factory.mktemp("scored") / "out"))
    assert cli("score", out, "--clip", CLIP, "--batch-size", "16", "--device", "cpu", "--quiet") == 0
    return out


def _scores_table(out: Path) -> dict[str, float]:
    with sqlite3.connect(out / "checkpoint.sqlite") as db:
        return dict(db.execute("SELECT key, score FROM clip_scores"))


class StopAfter(Stop):
    """A stop asked for once `batches` safe points have passed (what a first Ctrl-C does, on cue)."""

    def __init__(self, batches: int):
        super().__init__()
        self.left = batches

    def check(self) -> None:
        if self.left == 0:
            self.request()
        self.left -= 1
        super().check()


class _Features(torch.nn.Module):
    """transformers 5's CLIPModel returns outputs from get_*_features; torchmetrics 1.9 wants the tensors."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        output = self.model.get_image_features(*args, **kwargs)
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_text_features(self, *args, **kwargs):
        output = self.model.get_text_features(*args, **kwargs)
        return output if isinstance(output, torch.Tensor) else output.pooler_output


@pytest.mark.filterwarnings("ignore:`max_length` is ignored")  # torchmetrics' own processor call
def test_scores_are_torchmetrics_clip_score(scored: Path):
    from torchmetrics.functional.multimodal import clip_score
    from transformers import CLIPModel, CLIPProcessor

    folder = resolve_clip(CLIP).location
    model, processor = _Features(CLIPModel.from_pretrained(folder).eval()), CLIPProcessor.from_pretrained(folder)
    lines = read_metadata(scored)
    with_score = [m for m in lines if "clip_score" in m]
    assert len(with_score) == 48 and all(m["clip_model"] == CLIP for m in with_score)
    [skipped] = [m for m in lines if "clip_score" not in m]
    assert skipped["image_prompt_method"] == "clip_embed"  # no text prompt to score against
    gaps = []
    for meta in with_score:
        with Image.open(scored / "images" / meta["file_name"]) as image:
            pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        with torch.no_grad():
            expected = float(clip_score(pixels, meta["prompt"], lambda: (model, processor)))
        gaps.append(abs(meta["clip_score"] - expected))
    assert max(gaps) < 0.01, f"largest gap to torchmetrics' clip_score: {max(gaps):.5f} (over {len(gaps)} images)"


@pytest.mark.quality
def test_own_prompt_beats_swapped_colour_and_shape(scored: Path):
    scorer = ClipScorer(resolve_clip(CLIP), "cpu")
    lines = [m for m in read_metadata(scored) if "clip_score" in m]
    images = []
    for meta in lines:
        with Image.open(scored / "images" / meta["file_name"]) as image:
            images.append(image.convert("RGB"))
    own = [m["prompt"] for m in lines]
    colour, shape = [], []
    for prompt in own:
        _, c, s = prompt.split()
        colour.append(f"a {swapped(c, s)[0]} {s}")
        shape.append(f"a {c} {swapped(c, s)[1]}")
    mine, by_colour, by_shape = scorer.score(images, own), scorer.score(images, colour), scorer.score(images, shape)
    assert mine == pytest.approx([m["clip_score"] for m in lines], abs=1e-3)  # batch of 48 = the command's 16s
    colour_wins = sum(a > b for a, b in zip(mine, by_colour))
    shape_wins = sum(a > b for a, b in zip(mine, by_shape))
    figure = record_figure("clip own vs swapped prompt",
                           f"own prompt above swapped colour {colour_wins}/48, above swapped shape {shape_wins}/48; "
                           f"mean {np.mean(mine):.1f} own, {np.mean(by_colour):.1f} swapped colour, "
                           f"{np.mean(by_shape):.1f} swapped shape")
    assert colour_wins >= 0.9 * 48 and shape_wins >= 0.9 * 48, figure


def test_interrupted_score_resumes_and_a_second_computes_nothing(made: Path, tmp_path: Path, monkeypatch):
    out = _copy(made, tmp_path)
    first = score_folder(out, CLIP, device="cpu", batch_size=8, quiet=True, stop=StopAfter(1))
    assert first.interrupted and first.exit_code == 130 and first.scored == 8
    kept = _scores_table(out)
    assert len(kept) == 8
    assert sum("clip_score" in m for m in read_metadata(out)) == 8  # metadata.jsonl rewritten from the checkpoint

    assert cli("score", out, "--clip", CLIP, "--batch-size", "8", "--device", "cpu", "--quiet") == 0
    after = _scores_table(out)
    assert len(after) == 48 and all(after[key] == score for key, score in kept.items())
    assert sum("clip_score" in m for m in read_metadata(out)) == 48

    def no_model(*args, **kwargs):
        raise AssertionError("a second score loaded the CLIP model")

    monkeypatch.setattr("batch.score.ClipScorer", no_model)
    again = score_folder(out, CLIP, device="cpu", quiet=True)
    assert (again.scored, again.earlier, again.skipped, again.exit_code) == (0, 48, 1, 0)
    assert _scores_table(out) == after


def test_report_has_a_histogram_per_group(scored: Path):
    report = json.loads((scored / "report.json").read_text())
    clip = report["clip_score"]
    assert (clip["model"], clip["bin_width"], clip["images"], clip["unscored"]) == (CLIP, 10, 48, 1)
    [group] = clip["groups"]
    assert group["group"] == "tiny txt2img 128x128" and group["images"] == 48
    assert len(group["histogram"]) == 10 and sum(group["histogram"]) == 48
    scores = [m["clip_score"] for m in read_metadata(scored) if "clip_score" in m]
    assert group["histogram"] == [sum(int(s // 10) == b or (b == 9 and s == 100) for s in scores) for b in range(10)]
    assert group["mean"] == pytest.approx(np.mean(scores), abs=1e-3)
    html = (scored / "report.html").read_text()
    assert "CLIP scores (tiny-clip)" in html and "90–100" in html
    assert "## CLIP scores (tiny-clip)" in (scored / "report.md").read_text()


def test_run_clip_score_scores_every_image(tmp_path: Path, images_dir: Path):
    rows = [{"id": f"r{i}", "prompt": f"a {c} {s}", "seed": i} for i, (c, s) in enumerate(PAIRS[:6])]
    rows.append({"id": "emb", "prompt_image": "prompt.png", "image_prompt_method": "clip_embed"})
    out = tmp_path / "out"
    # images made without scores first: the scoring run must score them too, not only what it makes
    assert cli(write_jsonl(images_dir / "first.jsonl", rows[:3]), *FAST, "--out", out, "--quiet") == 0
    assert cli(write_jsonl(images_dir / "m.jsonl", rows), *FAST, "--batch-size", "2", "--out", out, "--quiet",
               "--clip-score", CLIP) == 0
    lines = {m["id"]: m for m in read_metadata(out)}
    assert len(lines) == 7
    assert all(isinstance(lines[f"r{i}"]["clip_score"], float) for i in range(6))
    assert "clip_score" not in lines["emb"]
    table = _scores_table(out)
    with sqlite3.connect(out / "checkpoint.sqlite") as db:
        keys = dict(db.execute("SELECT id, key FROM images"))
        [model] = [m for (m,) in db.execute("SELECT DISTINCT model FROM clip_scores")]
    assert model.startswith(f"{CLIP}@")  # the CLIP's name and a digest of its weights
    assert [lines[f"r{i}"]["clip_score"] for i in range(6)] == pytest.approx([table[keys[f"r{i}"]] for i in range(6)],
                                                                           abs=1e-4)  # metadata: 4 decimals
    assert json.loads((out / "report.json").read_text())["clip_score"]["images"] == 6
    # the scores are the command's: a `score` afterwards finds nothing to do
    assert score_folder(out, CLIP, device="cpu", quiet=True).scored == 0


def test_bad_input_exits_2(made: Path, tmp_path: Path, capsys):
    assert cli("score", tmp_path / "nothing-here", "--clip", CLIP) == 2
    assert "no checkpoint" in capsys.readouterr().err
    out = _copy(made, tmp_path)
    assert cli("score", out, "--clip", tmp_path / "no-such-clip") == 2
    assert cli("score", out, "--clip", "nobody/no-such-clip-model") == 2  # not cached, HF_HUB_OFFLINE
    assert "hf download" in capsys.readouterr().err
    assert _scores_table(out) == {}
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": "a red circle"}])
    assert cli(manifest, *FAST, "--out", tmp_path / "run", "--clip-score", "nobody/no-such-clip-model") == 2
    assert not (tmp_path / "run").exists()  # refused before the output folder is touched
