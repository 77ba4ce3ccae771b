"""CUDA-only checks (skipped without a GPU): peak VRAM in the report, fp16, offload over shared views."""
from __future__ import annotations

import json

import pytest
from conftest import REPO, cli, read_metadata

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("extra", [[], ["--offload", "model"], ["--vae-slicing", "--attention-slicing"]])
def test_demo_on_cuda_reports_vram(tmp_path, extra):
    out = tmp_path / "out"
    assert cli(REPO / "manifests" / "demo.jsonl", "--model", "tiny", "--device", "cuda", "--out", out, "--quiet",
               *extra) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["dtype"] == "fp16" and report["run"]["gpu_name"]
    assert report["totals"]["peak_vram_bytes"] > 0
    for group in report["groups"]:
        assert group["peak_vram_bytes"] > 0 and group["vram_estimate_bytes"] > 0 and group["warmup_s"] > 0
    assert len(read_metadata(out)) == 7
