"""`sdbatch compare OLD NEW`: per-group deltas, the regression threshold, exit codes, md and json output."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from conftest import cli

from batch.compare import compare, to_json, to_markdown
from batch.errors import BatchError

GB = 2**30


def group(mode="txt2img", width=512, height=512, ips=2.0, vram=4 * GB, model="m", lora=None, failed=0) -> dict:
    return {"model": model, "mode": mode, "width": width, "height": height, "lora": lora, "images": 16,
            "failed": failed, "batches": 2, "load_s": 3.0, "warmup_s": 0.0, "wall_s": 16 / ips, "images_per_s": ips,
            "s_per_image_p50": 1 / ips, "s_per_image_p95": 1.2 / ips, "peak_vram_bytes": vram}


def report(*groups, gpu="NVIDIA H100 80GB HBM3") -> dict:
    return {"run": {"model": "m", "device": "cuda", "gpu_name": gpu, "dtype": "fp16", "started_at": "2026-01-01"},
            "totals": {"images": 16 * len(groups), "done": 16 * len(groups), "failed": 0, "images_per_s": 2.0},
            "groups": list(groups), "stages": {}}


BASE = report(group(), group("img2img", 512, 512, ips=3.0), group("txt2img", 768, 768, ips=1.0, vram=8 * GB))


def save(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def scaled(data: dict, index: int, key: str, factor: float) -> dict:
    data = copy.deepcopy(data)
    data["groups"][index][key] *= factor
    return data


def test_a_report_compared_with_itself_passes(tmp_path, capsys):
    path = save(tmp_path / "r.json", BASE)
    assert cli("compare", path, path) == 0
    out = capsys.readouterr().out
    assert "| m txt2img 512x512 |" in out and "(+0.0%)" in out
    assert out.strip().splitlines()[-1].startswith("**OK: no group regressed by more than 10%")
    # an output folder holding report.json works as well
    folder = tmp_path / "run"
    folder.mkdir()
    save(folder / "report.json", BASE)
    assert cli("compare", folder, path) == 0


def test_halved_throughput_is_a_regression(tmp_path, capsys):
    old, new = save(tmp_path / "old.json", BASE), save(tmp_path / "new.json", scaled(BASE, 1, "images_per_s", 0.5))
    assert cli("compare", old, new) == 1
    out = capsys.readouterr().out
    assert "**REGRESSION beyond 10%: m img2img 512x512 throughput -50.0%**" in out
    assert "**3 → 1.5 (-50.0%)**" in out
    assert cli("compare", new, old) == 0  # faster is never a regression


def test_threshold_is_respected(tmp_path):
    old, new = save(tmp_path / "old.json", BASE), save(tmp_path / "new.json", scaled(BASE, 0, "images_per_s", 0.95))
    assert cli("compare", old, new, "--max-regression", "10") == 0
    assert cli("compare", old, new) == 0  # default 10%
    assert cli("compare", old, new, "--max-regression", "3") == 1
    assert cli("compare", old, new, "--max-regression", "5") == 0  # "more than PCT": exactly 5% passes
    assert cli("compare", old, new, "--max-regression", "-1") == 2


def test_peak_vram_growth_is_a_regression():
    grown = scaled(BASE, 2, "peak_vram_bytes", 1.25)
    result = compare(BASE, grown, 10)
    assert not result.ok and [g.name for g in result.regressed] == ["m txt2img 768x768"]
    assert result.regressed[0].regressions == ("peak_vram_bytes",)
    assert compare(BASE, grown, 30).ok
    assert compare(grown, BASE, 10).ok  # less memory is fine
    # slower s/image alone (p50/p95) is reported, not gated: throughput is the gate
    slower = scaled(BASE, 0, "s_per_image_p95", 2.0)
    assert compare(BASE, slower).ok and compare(BASE, slower).matched[0].metrics["s_per_image_p95"].pct == 100.0


def test_matching_ignores_group_order():
    shuffled = copy.deepcopy(BASE)
    shuffled["groups"].reverse()
    result = compare(BASE, shuffled)
    assert result.ok and len(result.matched) == 3 and not result.added and not result.missing
    assert all(g.metrics["images_per_s"].pct == 0 for g in result.matched)


def test_added_and_missing_groups_are_listed_not_counted(tmp_path, capsys):
    new = copy.deepcopy(BASE)
    del new["groups"][2]  # 768x768 gone
    new["groups"].append(group("image_prompt", 512, 512, ips=0.1))  # new and slow: nothing to compare with
    result = compare(BASE, new)
    assert result.ok
    assert [g["mode"] for g in result.added] == ["image_prompt"] and [g["width"] for g in result.missing] == [768]
    assert cli("compare", save(tmp_path / "o.json", BASE), save(tmp_path / "n.json", new)) == 0
    out = capsys.readouterr().out
    assert "Added (in new only), not counted as regressions: m image_prompt 512x512" in out
    assert "Missing (in old only), not counted as regressions: m txt2img 768x768" in out
    assert "(2 matched, 1 added, 1 missing)" in out


def test_groups_with_the_same_size_split_by_lora():
    old = report(group(lora="a.safetensors", ips=2.0), group(lora=None, ips=4.0))
    new = report(group(lora=None, ips=4.0), group(lora="a.safetensors", ips=1.0))
    result = compare(old, new)
    assert [g.name for g in result.regressed] == ["m txt2img 512x512 lora=a.safetensors"]


def test_json_format_is_machine_readable(tmp_path, capsys):
    new = scaled(BASE, 0, "images_per_s", 0.5)
    new["groups"][1]["failed"] = 2
    new["run"]["gpu_name"] = "NVIDIA L4"
    assert cli("compare", save(tmp_path / "o.json", BASE), save(tmp_path / "n.json", new), "--format", "json") == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["max_regression_pct"] == 10
    first = data["groups"][0]
    assert first["status"] == "regression" and first["regressions"] == ["images_per_s"]
    assert first["metrics"]["images_per_s"] == {"old": 2.0, "new": 1.0, "delta_pct": -50.0}
    assert data["groups"][1]["metrics"]["failed"] == {"old": 0, "new": 2}
    assert data["added"] == data["missing"] == []
    assert any("gpu_name differs" in n for n in data["notes"])
    assert any("2 failed image(s)" in n for n in data["notes"])
    assert data["verdict"].startswith("REGRESSION")
    assert to_json(compare(BASE, BASE))["ok"] is True


def test_markdown_is_a_table_and_a_verdict():
    text = to_markdown(compare(BASE, BASE), "a.json", "b.json")
    lines = text.strip().splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + 3 and table[0].startswith(
        "| group | images/s (generation) | s/image p50 (batch s ÷ batch size) | s/image p95 (batch s ÷ batch size) "
        "| peak VRAM")
    assert "4.00 GB → 4.00 GB (+0.0%)" in text and "`a.json`" in text
    assert lines[-1].startswith("**OK")


def test_per_image_figures_are_not_called_a_latency(tmp_path, capsys):
    """s_per_image_* are batch time ÷ batch size: the output names them so, never "latency"."""
    slower = scaled(BASE, 0, "s_per_image_p50", 2.0)
    assert cli("compare", save(tmp_path / "o.json", BASE), save(tmp_path / "n.json", slower)) == 0
    out = capsys.readouterr().out
    assert "latency" not in out.lower()
    assert "s/image p50 (batch s ÷ batch size)" in out and "0.5 → 1 (+100.0%)" in out


def test_cpu_reports_without_vram_compare_on_throughput():
    cpu = report(group(vram=None), gpu=None)
    assert compare(cpu, cpu).ok
    assert compare(cpu, scaled(cpu, 0, "images_per_s", 0.5)).regressed


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("not json {", "not JSON"),
    ("[1, 2]", "not an sdbatch report"),
    ('{"run": {}, "totals": {}}', "not an sdbatch report"),
    ('{"run": {}, "totals": {}, "groups": [{"model": "m"}]}', "groups[0] lacks"),
    ('{"run": {}, "totals": {}, "groups": [{"model": "m", "mode": "txt2img", "width": 8, "height": 8, '
     '"images_per_s": "fast"}]}', "groups[0].images_per_s is 'fast'"),
])
def test_bad_input_exits_2_with_one_message(tmp_path, capsys, content, message):
    good = save(tmp_path / "good.json", BASE)
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content, encoding="utf-8")
    assert cli("compare", good, bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    with pytest.raises(BatchError):
        from batch.compare import load_report

        load_report(bad)


def test_folder_without_report_exits_2(tmp_path, capsys):
    assert cli("compare", tmp_path, tmp_path) == 2
    assert "report.json: no such file" in capsys.readouterr().err
