"""report.html: self-contained, escaped, with thumbnails, charts and failures; renders in a real browser."""
from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import FAST, REPO, cli, write_jsonl


class Page(HTMLParser):
    """The parts of report.html the tests look at."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str) -> list[dict]:
        return [attrs for t, attrs in self.tags if t == tag]

    @property
    def thumbnails(self) -> list[dict]:
        return [a for a in self.all("img") if a.get("src", "").startswith("data:image/")]

    @property
    def section_ids(self) -> set[str]:
        return {a.get("id") for a in self.all("section")}


def page(out: Path) -> tuple[str, Page]:
    text = (out / "report.html").read_text(encoding="utf-8")
    return text, Page(text)


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("html") / "demo"
    assert cli(REPO / "manifests" / "demo.jsonl", "--model", "tiny", "--device", "cpu", "--out", out,
               "--quiet", "--steps", "2") == 0
    return out


def test_demo_report_html_is_self_contained(demo_out):
    text, html = page(demo_out)
    assert len(html.thumbnails) == len(html.all("img")) == 7
    assert {a["alt"] for a in html.thumbnails} == {"red-circle-0", "red-circle-1", "blue-square", "green-triangle",
                                                    "triangle-turns-square", "square-kept", "like-the-triangle"}
    assert "http://" not in text and "https://" not in text  # nothing to fetch: works offline, mailed, archived
    assert not html.all("script") and not html.all("link")
    assert {"summary", "charts", "images"} <= html.section_ids and "failures" not in html.section_ids
    assert len(html.all("svg")) == 3  # throughput, p50/p95, batch latency; VRAM is a note on CPU
    words = " ".join(html.text)
    assert "n/a on CPU" in words and "Not measured on CPU" in words
    assert "all 7" in words and "tiny" in words and "torch 2" in words
    # the latency chart: one point per batch, plus one legend dot per group
    groups = json.loads((demo_out / "report.json").read_text())["groups"]
    assert len(html.all("circle")) == sum(g["batches"] for g in groups) + len(groups)


def test_report_command_rebuilds_html_and_caps_the_contact_sheet(demo_out, tmp_path, monkeypatch):
    import batch.html_report as html_report

    out = tmp_path / "copy"
    shutil.copytree(demo_out, out)
    (out / "report.html").unlink()
    (out / "images" / "blue-square.png").unlink()  # a deleted file shows as missing, not as a broken image
    monkeypatch.setattr(html_report, "MAX_THUMBS", 3)
    assert cli("report", out) == 0
    _text, html = page(out)
    assert len(html.thumbnails) == 2 and "showing 3 of 7" in " ".join(html.text)
    assert "file missing" in html.text


def test_escaping_failures_and_no_images(tmp_path, monkeypatch):
    import batch.execute as execute

    real = execute.generate_batch

    def fail_bad(family, conditioner, batch, steps=None):
        if any(t.job.id.startswith("bad") for t in batch.tasks):
            raise RuntimeError("<b>injected</b> failure & \"quotes\"")
        return real(family, conditioner, batch, steps)

    monkeypatch.setattr(execute, "generate_batch", fail_bad)
    evil = "<script>alert(\"x\")</script>\n'single' & \"double\" <img src=x onerror=alert(1)>"
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "evil", "prompt": evil, "seed": 5},
                                                  {"id": "bad", "prompt": "y"}])
    out = tmp_path / "out"
    assert cli(manifest, *FAST, "--out", out, "--quiet", "--batch-size", "1") == 1
    text, html = page(out)
    assert not html.all("script") and "<script>" not in text and "&lt;script&gt;" in text
    (thumb,) = html.thumbnails  # the injected <img> is text, not an element
    assert len(html.all("img")) == 1
    assert evil in thumb["title"] and "seed 5" in thumb["title"]  # the full prompt, unescaped by the parser
    assert "failures" in html.section_ids
    words = "".join(html.text)
    assert "<b>injected</b> failure & \"quotes\"" in words and "&lt;b&gt;injected&lt;/b&gt;" in text
    assert "--retry-failed" in words and "failed.jsonl" in words

    # Every job failing: 0 images done still renders, with the failures and no thumbnails.
    monkeypatch.setattr(execute, "generate_batch", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    manifest = write_jsonl(tmp_path / "none.jsonl", [{"id": "bad-1", "prompt": "x"}, {"id": "bad-2", "prompt": "y"}])
    out = tmp_path / "none"
    assert cli(manifest, *FAST, "--out", out, "--quiet") == 1
    _text, html = page(out)
    assert not html.all("img") and "No image is done yet." in html.text
    assert {"summary", "charts", "images", "failures"} <= html.section_ids
    assert "Failures (2 images, 2 jobs)" in html.text


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_report_renders_in_headless_chromium(demo_out, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("install Debian's chromium to run this test: apt-get install chromium")
    from PIL import Image, ImageStat

    url = (demo_out / "report.html").resolve().as_uri()
    shot = tmp_path / "report.png"
    common = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,2000", url],
                   check=True, capture_output=True, timeout=60)
    dom = subprocess.run([*common, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=60).stdout
    with Image.open(shot) as image:
        assert image.size == (1200, 2000)
        gray = image.convert("L")
        assert ImageStat.Stat(gray).stddev[0] > 10  # not a blank page
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or ()) > 500  # charts and noisy thumbnails
    rendered = Page(dom)
    assert len(rendered.thumbnails) == 7 and {"summary", "charts", "images"} <= rendered.section_ids


def test_vram_chart_against_the_gpu_memory(tmp_path):
    """A CUDA run's report (no GPU needed): peak VRAM bars with the device's total memory as a reference line."""
    from batch.checkpoint import Checkpoint
    from batch.html_report import render

    gb = 2**30
    groups = [{"model": "m", "mode": mode, "width": 512, "height": 512, "lora": None, "images": 8, "batches": 1,
               "load_s": 1.0, "warmup_s": 0.0, "wall_s": 4.0, "images_per_s": 2.0, "s_per_image_p50": 0.5,
               "s_per_image_p95": 0.6, "peak_vram_bytes": vram}
              for mode, vram in (("txt2img", 6 * gb), ("img2img", 5 * gb))]
    report = {"run": {"model": "m", "device": "cuda", "gpu_name": "NVIDIA H100 80GB HBM3", "gpu_total_bytes": 80 * gb},
              "totals": {"images": 16, "done": 16, "failed": 0, "pending": 0, "skipped_from_checkpoint": 0,
                         "wall_s": 9.0, "images_per_s": 2.0, "peak_vram_bytes": 6 * gb, "peak_rss_bytes": None},
              "groups": groups}
    checkpoint = Checkpoint(tmp_path / "checkpoint.sqlite")
    text = render(report, checkpoint, tmp_path)
    checkpoint.close()
    html = Page(text)
    words = " ".join(html.text)
    assert "6.00 GB" in words and "device total 80.00 GB" in words and "NVIDIA H100 80GB HBM3 (80.00 GB)" in words
    assert "n/a on CPU" not in words and "Not measured" not in words
    assert len(html.all("svg")) == 3  # throughput, p50/p95, VRAM; no batch timings in an empty checkpoint
    assert "No batch timings recorded" in words and "No image is done yet." in words


def test_batch_points_sum_each_batch_and_long_runs_stay_small():
    from batch.html_report import MAX_POINTS, _batch_chart, batch_points

    rows = [("a", 0, "g", 0, 0.5, "done"), ("b", 0, "g", 0, 0.5, "done"), ("c", 0, "g", 1, 2.0, "failed"),
            ("d", 0, "g", None, None, "failed")]  # an invalid row: never in a batch
    assert [(p["batch"], p["seconds"], p["images"], p["failed"], p["end_s"]) for p in batch_points(rows)] == [
        (0, 1.0, 2, 0, 1.0), (1, 2.0, 1, 1, 3.0)]
    many = [(f"i{i}", 0, "g", i, 10.0 if i == 4321 else 0.1, "done") for i in range(20_000)]
    svg = _batch_chart(batch_points(many))
    assert svg.count("<circle") <= MAX_POINTS + 1 and "each point is the slowest of 20" in svg
    assert "10.00 s" in svg  # the one slow batch survives the thinning
