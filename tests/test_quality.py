"""What the embedded model's images show, judged from pixels, at the defaults users get.

Fixed prompts and seeds, 128x128, 20 steps, CFG 7.5, dpmpp_2m_karras (unless a test varies
one of them), run through the CLI like any manifest. Each test names its figure in the
assertion message and records it; with SDBATCH_QUALITY_REPORT=path.md the figures are
written there (reports/quality-<date>.md is made that way).
"""
from __future__ import annotations

import itertools
import json
import random
import signal
from pathlib import Path

import pytest
from conftest import cli, done_count, read_metadata, record_figure, start_run, wait_for_done, write_jsonl
from judge import judge
from PIL import Image

from batch.families import SD
from batch.toy.world import COLOURS, SHAPES, draw, sample_scene

pytestmark = pytest.mark.quality

DEFAULTS = ["--model", "tiny", "--device", "cpu", "--steps", "20", "--cfg", "7.5", "--width", "128", "--height", "128",
            "--scheduler", "dpmpp_2m_karras", "--quiet"]
PAIRS = list(itertools.product(sorted(COLOURS), SHAPES))  # 12 (colour, shape)
SEEDS = (11, 22)
GUIDANCE_SEEDS = (11, 22, 33, 44)  # txt2img at CFG 7.5 and 1.0: 48 images each, as a gap of a few images is judged
I2I_SEEDS = (7, 8, 9, 10)  # 48 images per strength: at 12, one image moves the figure by 8 points


def _verdicts(out: Path) -> dict[str, tuple]:
    """{image id (with -k): (judged colour, judged shape, metadata)} for every image of a run."""
    verdicts = {}
    for meta in read_metadata(out):
        with Image.open(out / "images" / meta["file_name"]) as image:
            v = judge(image.convert("RGB"))
        verdicts[Path(meta["file_name"]).stem] = (v.colour, v.shape, meta)
    return verdicts


def _share(hits: int, total: int) -> float:
    return hits / total if total else 0.0


def _drawings(folder: Path, seed: int) -> dict[tuple[str, str], Path]:
    """One drawing per (colour, shape), from a seed the model never saw."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, (colour, shape) in enumerate(PAIRS):
        path = folder / f"{colour}-{shape}-{seed}.png"
        draw(sample_scene(random.Random(f"held-out/{seed}/{i}"), 128, colour, shape)).save(path)
        paths[colour, shape] = path
    return paths


def _txt2img_rows(cfg: float | None = None, tag: str = "t", seeds=SEEDS) -> list[dict]:
    rows = []
    for (colour, shape), seed in itertools.product(PAIRS, seeds):
        row = {"id": f"{tag}-{colour}-{shape}-{seed}", "prompt": f"a {colour} {shape}", "seed": seed,
               "want_colour": colour, "want_shape": shape}
        if cfg is not None:
            row["cfg"] = cfg
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def main_run(tmp_path_factory) -> dict:
    """One run of every row the checks below judge (one model load, shared batches)."""
    folder = tmp_path_factory.mktemp("quality")
    inits, references = _drawings(folder / "init", 1), _drawings(folder / "ref", 2)
    rows = _txt2img_rows(seeds=GUIDANCE_SEEDS) + _txt2img_rows(cfg=1.0, tag="cfg1", seeds=GUIDANCE_SEEDS)
    for name in SD.schedulers:
        rows += [{"id": f"s-{name}-{c}-{s}", "prompt": f"a {c} {s}", "seed": 5, "scheduler": name,
                  "want_colour": c, "want_shape": s} for c, s in PAIRS]
    for shape, seed in itertools.product(SHAPES, range(8)):
        rows.append({"id": f"neg-none-{shape}-{seed}", "prompt": shape, "seed": 100 + seed})
        rows += [{"id": f"neg-{c}-{shape}-{seed}", "prompt": shape, "negative_prompt": c, "seed": 100 + seed,
                  "avoid": c} for c in sorted(COLOURS)]
    for (colour, shape), (other_c, other_s) in zip(PAIRS, PAIRS[5:] + PAIRS[:5]):  # prompt names another pair
        for strength, seed in itertools.product((0.3, 1.0), I2I_SEEDS):
            rows.append({"id": f"i2i-{strength}-{colour}-{shape}-{seed}", "prompt": f"a {other_c} {other_s}", "seed": seed,
                         "init_image": str(inits[colour, shape]), "strength": strength,
                         "init_colour": colour, "init_shape": shape, "want_colour": other_c, "want_shape": other_s})
    for method in ("ip_adapter", "clip_embed"):
        rows += [{"id": f"ip-{method}-{c}-{s}", "prompt_image": str(references[c, s]), "image_prompt_method": method,
                  "seed": 9, "want_colour": c, "want_shape": s} for c, s in PAIRS]
    out = folder / "out"
    assert cli(write_jsonl(folder / "quality.jsonl", rows), *DEFAULTS, "--out", out) == 0
    return _verdicts(out)


def _adherence(verdicts: dict, prefix: str) -> tuple[int, int, int]:
    """(colour right, shape right, images) over the images whose id starts with prefix."""
    chosen = [(c, s, m) for key, (c, s, m) in verdicts.items() if key.startswith(prefix)]
    return (sum(c == m["want_colour"] for c, _, m in chosen), sum(s == m["want_shape"] for _, s, m in chosen),
            len(chosen))


def test_txt2img_draws_the_prompted_colour_and_shape(main_run):
    colour, shape, n = _adherence(main_run, "t-")
    text = record_figure(f"txt2img ({n} images)", f"colour right {colour}/{n}, shape right {shape}/{n}")
    assert _share(colour, n) >= 0.90 and _share(shape, n) >= 0.80, text


def test_guidance_raises_adherence(main_run):
    def both(prefix):
        chosen = [(c, s, m) for key, (c, s, m) in main_run.items() if key.startswith(prefix)]
        return sum(c == m["want_colour"] and s == m["want_shape"] for c, s, m in chosen), len(chosen)

    high, n = both("t-")
    low, _ = both("cfg1-")
    text = record_figure("CFG 7.5 vs 1.0", f"colour and shape right {high}/{n} at CFG 7.5, {low}/{n} at CFG 1.0")
    assert high - low >= 0.2 * n, text


@pytest.mark.parametrize("scheduler", list(SD.schedulers))
def test_every_scheduler_draws_the_prompted_colour(main_run, scheduler):
    colour, shape, n = _adherence(main_run, f"s-{scheduler}-")
    text = record_figure(f"scheduler {scheduler}", f"colour right {colour}/{n}, shape right {shape}/{n}")
    assert n == 12 and _share(colour, n) >= 0.80, text


def test_a_colour_in_the_negative_prompt_appears_less(main_run):
    baseline = [c for key, (c, _, _) in main_run.items() if key.startswith("neg-none-")]
    without = sum(baseline.count(colour) for colour in COLOURS)  # each colour's count when nothing is negated
    with_negative = sum(c == m["avoid"] for key, (c, _, m) in main_run.items()
                        if key.startswith("neg-") and not key.startswith("neg-none-"))
    per_colour = {colour: (baseline.count(colour), sum(c == colour for key, (c, _, m) in main_run.items()
                                                       if key.startswith(f"neg-{colour}-")))
                  for colour in sorted(COLOURS)}
    text = record_figure("negative prompt", f"named colour appears {with_negative} times with it negated vs {without} "
                                      f"without (24 images per colour; per colour without/with: {per_colour})")
    assert with_negative <= 0.5 * without and without >= 12, text


def test_img2img_strength_keeps_or_replaces_the_init_image(main_run):
    low = [(c == m["init_colour"] and s == m["init_shape"]) for key, (c, s, m) in main_run.items()
           if key.startswith("i2i-0.3-")]
    high = [(c == m["want_colour"] and s == m["want_shape"]) for key, (c, s, m) in main_run.items()
            if key.startswith("i2i-1.0-")]
    init_colour = sum(c == m["init_colour"] for key, (c, s, m) in main_run.items() if key.startswith("i2i-1.0-"))
    text = record_figure("img2img", f"strength 0.3 keeps the init's colour and shape {sum(low)}/{len(low)}; "
                              f"strength 1.0 follows the prompt {sum(high)}/{len(high)} "
                              f"(the init's colour survives in {init_colour})")
    assert _share(sum(low), len(low)) >= 0.90 and _share(sum(high), len(high)) >= 0.80, text


@pytest.mark.parametrize("method", ["ip_adapter", "clip_embed"])
def test_an_image_prompt_gives_its_colour(main_run, method):
    colour, shape, n = _adherence(main_run, f"ip-{method}-")
    text = record_figure(f"image prompt ({method})", f"reference colour {colour}/{n}, reference shape {shape}/{n}")
    assert n == 12 and _share(colour, n) >= 0.80, text


# --- the judge's verdicts do not depend on how a run was executed -----------------------------

@pytest.fixture(scope="module")
def txt2img_manifest(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("same") / "m.jsonl", _txt2img_rows())


def _verdict_pairs(out: Path) -> dict:
    return {key: (c, s) for key, (c, s, _) in _verdicts(out).items()}


def test_batch_size_does_not_change_the_verdicts(txt2img_manifest, tmp_path):
    runs = {}
    for size in (1, 8):
        out = tmp_path / f"b{size}"
        assert cli(txt2img_manifest, *DEFAULTS, "--out", out, "--batch-size", size) == 0
        runs[size] = _verdict_pairs(out)
    same = sum(runs[1][k] == runs[8][k] for k in runs[1])
    text = record_figure("batch size 1 vs 8", f"same verdict {same}/{len(runs[1])}")
    assert same == len(runs[1]) == 24, text


def test_a_killed_and_resumed_run_gives_the_same_verdicts(txt2img_manifest, tmp_path):
    whole = tmp_path / "whole"
    assert cli(txt2img_manifest, *DEFAULTS, "--out", whole) == 0
    out = tmp_path / "killed"
    options = [a for a in DEFAULTS if a != "--quiet"]
    proc = start_run(txt2img_manifest, out, *options)
    wait_for_done(proc, out, at_least=8)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = done_count(out)
    assert cli(txt2img_manifest, *DEFAULTS, "--out", out) == 0
    expected, resumed = _verdict_pairs(whole), _verdict_pairs(out)
    same = sum(expected[k] == resumed.get(k) for k in expected)
    text = record_figure("resume after SIGKILL", f"killed at {killed_at}/24 done; same verdict {same}/{len(expected)}")
    assert same == len(expected) == 24 and killed_at < 24, text
    assert json.loads((out / "report.json").read_text())["totals"]["done"] == 24


torch = pytest.importorskip("torch")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fp16_gives_the_cpu_verdicts(txt2img_manifest, tmp_path):
    outs = {}
    for device in ("cpu", "cuda"):
        outs[device] = tmp_path / device
        options = [a if a != "cpu" else device for a in DEFAULTS]
        assert cli(txt2img_manifest, *options, "--out", outs[device]) == 0
    cpu, gpu = _verdict_pairs(outs["cpu"]), _verdict_pairs(outs["cuda"])
    same = sum(cpu[k] == gpu[k] for k in cpu)
    text = record_figure("CPU fp32 vs GPU fp16", f"same verdict {same}/{len(cpu)}")
    assert same >= len(cpu) - 1, text  # fp16 may tip one borderline image
    assert json.loads((outs["cuda"] / "report.json").read_text())["run"]["dtype"] == "fp16"
