"""Every CUDA call names the run's device (cuda:N), and GPU memory is read and freed at the right moments."""
from __future__ import annotations

import ast
import json
import weakref

import pytest
from conftest import FAST, REPO, cli, write_jsonl

import batch.devices as devices

torch = pytest.importorskip("torch")


class _FakeCuda:
    """Records the device every torch.cuda call was given."""

    def __init__(self, monkeypatch):
        self.calls = {}
        for name in ("set_device", "synchronize", "reset_peak_memory_stats", "max_memory_allocated",
                     "memory_allocated", "mem_get_info", "empty_cache", "get_device_name", "get_device_properties"):
            monkeypatch.setattr(torch.cuda, name, self._recorder(name))
        monkeypatch.setattr(torch.cuda, "device", self._recorder("device"))

    def _recorder(self, name):
        def call(*args, **kwargs):
            self.calls.setdefault(name, []).append(args[0] if args else kwargs.get("device"))
            if name == "mem_get_info":
                return 1, 10
            if name == "device":
                return _NullContext(self, args[0])
            if name == "get_device_properties":
                return type("Props", (), {"total_memory": 10})()
            return 7
        return call


class _NullContext:
    def __init__(self, fake, device):
        self.fake, self.device = fake, device

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_every_cuda_helper_passes_the_run_device(monkeypatch):
    fake = _FakeCuda(monkeypatch)
    device = "cuda:1"
    devices.activate(device)
    devices.synchronize(device)
    devices.reset_peak(device)
    assert devices.peak_allocated(device) == 7 and devices.allocated(device) == 7
    assert devices.used_bytes(device) == 9
    devices.free_cache(device)
    devices.name(device)
    assert devices.total_bytes(device) == 10
    called_without = {name: args for name, args in fake.calls.items()
                      if name != "empty_cache" and any(a != device for a in args)}
    assert not called_without, f"torch.cuda calls that did not name {device}: {called_without}"
    # empty_cache takes no device: it runs inside `with torch.cuda.device(cuda:1)`
    assert fake.calls["device"] == [device] and "empty_cache" in fake.calls


_DEVICE_BOUND = {"synchronize", "reset_peak_memory_stats", "max_memory_allocated", "memory_allocated",
                 "mem_get_info", "empty_cache", "memory_reserved", "reset_max_memory_allocated"}


def test_no_module_calls_device_bound_cuda_functions_directly():
    """Such calls act on the current device (GPU 0) unless told: they go through batch/devices.py."""
    offenders = []
    for path in sorted((REPO / "batch").rglob("*.py")):
        if path.name == "devices.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in _DEVICE_BOUND \
                    and isinstance(node.value, ast.Attribute) and node.value.attr == "cuda":
                offenders.append(f"{path.name}:{node.lineno} torch.cuda.{node.attr}")
    assert not offenders, offenders


def _two_models(tmp_path):
    """Two model names for the same tiny weights: two groups with equal mode and size."""
    return write_jsonl(tmp_path / "m.jsonl", [
        {"id": "a", "prompt": "a red circle", "seed": 1},
        {"id": "b", "prompt": "a blue square", "seed": 2, "model": str(REPO / "models" / "tiny")},
        {"id": "c", "prompt": "a green triangle", "seed": 3},
    ])


def test_device_memory_is_read_while_a_model_is_loaded(tmp_path, monkeypatch):
    import batch.models as models

    loaded = {"n": 0}
    real_load, real_unload = models.load_family, models.PipelineFamily.unload

    def load(*args, **kwargs):
        loaded["n"] += 1
        return real_load(*args, **kwargs)

    def unload(self):
        loaded["n"] -= 1
        return real_unload(self)

    import batch.execute as execute

    monkeypatch.setattr(execute, "load_family", load)
    monkeypatch.setattr(models.PipelineFamily, "unload", unload)
    monkeypatch.setattr(devices, "used_bytes", lambda device: 1000 * loaded["n"])  # "GPU" memory of loaded models
    out = tmp_path / "out"
    assert cli(_two_models(tmp_path), *FAST, "--out", out, "--quiet") == 0
    assert json.loads((out / "report.json").read_text())["totals"]["device_used_bytes"] == 1000


def test_the_previous_models_caches_are_gone_before_the_next_model_loads(tmp_path, monkeypatch):
    import batch.execute as execute

    conditioners, cached_at_load = [], []
    real_conditioner, real_load = execute.Conditioner, execute.load_family

    def conditioner(family):
        made = real_conditioner(family)
        conditioners.append(weakref.ref(made))
        return made

    def load(*args, **kwargs):
        live = [ref() for ref in conditioners if ref() is not None]
        cached_at_load.append(sum(len(c.text_cache) + len(c.image_cache) + len(c.ip_cache) for c in live))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(execute, "Conditioner", conditioner)
    monkeypatch.setattr(execute, "load_family", load)
    assert cli(_two_models(tmp_path), *FAST, "--out", tmp_path / "out", "--quiet") == 0
    assert cached_at_load == [0, 0], f"embeddings still cached when a model loaded: {cached_at_load}"


def test_group_names_tell_models_apart(tmp_path):
    import csv

    out = tmp_path / "out"
    assert cli(_two_models(tmp_path), *FAST, "--out", out, "--quiet") == 0
    with open(out / "report.csv", newline="") as f:
        groups = {row["id"]: row["group"] for row in csv.DictReader(f)}
    assert groups["a"] == groups["c"] != groups["b"]
    assert groups["a"].startswith("tiny ") and str(REPO / "models" / "tiny") in groups["b"]
    report = json.loads((out / "report.json").read_text())
    assert sorted(g["images"] for g in report["groups"]) == [1, 2]


def test_written_images_are_credited_to_the_group_that_made_them():
    """After an interruption the writer's last images are committed with every tally in view."""
    from types import SimpleNamespace

    from batch.plan import Group
    from batch.execute import commit_written as _commit_written
    from batch.tally import GroupTally

    first = GroupTally(Group("tiny", None, "txt2img", 64, 64, ()))
    second = GroupTally(Group("/models/other", None, "txt2img", 64, 64, ()))
    committed = []
    written = [SimpleNamespace(task=object(), file="x.png", meta={}, error=None, seconds=0.5, context=(second, 0, 1.0))]
    _commit_written(written, SimpleNamespace(commit=committed.extend))
    assert (first.per_image_s, second.per_image_s) == ([], [1.0])
    assert committed[0].group == second.group.name != first.group.name


def test_a_model_that_fails_to_load_in_any_way_fails_only_its_rows(tmp_path, monkeypatch):
    import batch.execute as execute

    real_load = execute.load_family

    def load(model, options):
        if model != "tiny":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_load(model, options)

    monkeypatch.setattr(execute, "load_family", load)
    out = tmp_path / "out"
    assert cli(_two_models(tmp_path), *FAST, "--out", out, "--quiet") == 1
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["done"] == 2 and report["totals"]["failed"] == 1
    (failed,) = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert failed["id"] == "b" and "illegal memory access" in failed["error"]
    assert (out / "report.md").exists() and (out / "images" / "metadata.jsonl").read_text().count("\n") == 2


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_1_measures_cuda_1(tmp_path):
    out = tmp_path / "out"
    before = torch.cuda.memory_allocated(0)
    assert cli(REPO / "manifests" / "demo.jsonl", "--model", "tiny", "--device", "cuda:1", "--out", out, "--quiet") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["peak_vram_bytes"] > 1_000_000
    assert torch.cuda.memory_allocated(0) == before


@pytest.mark.gpu
@needs_cuda
def test_out_of_memory_halves_succeed_with_real_allocations(tmp_path, monkeypatch):
    """A real CUDA OOM: the halves fit only if the failed call's allocation was freed first."""
    import batch.execute as execute

    real, sizes = execute.generate_batch, []
    free, _ = torch.cuda.mem_get_info()
    chunk = int(free * 0.4) // 4  # float32 elements: 40% of free memory per allocation

    def greedy(family, conditioner, batch, steps=None):  # fault-injection seam: tests only
        sizes.append(len(batch.tasks))
        held = torch.empty(chunk, dtype=torch.float32, device="cuda")  # noqa: F841
        if len(batch.tasks) > 1:  # a batch of two wants a second 40% on top, then a third: real OOM
            more = [torch.empty(chunk, dtype=torch.float32, device="cuda") for _ in range(2)]  # noqa: F841
        return real(family, conditioner, batch, steps)

    monkeypatch.setattr(execute, "generate_batch", greedy)
    rows = [{"id": f"r{i}", "prompt": "x", "seed": i} for i in range(2)]
    out = tmp_path / "out"
    assert cli(write_jsonl(tmp_path / "m.jsonl", rows), "--model", "tiny", "--device", "cuda", "--steps", "3",
               "--width", "64", "--height", "64", "--out", out, "--quiet", "--batch-size", "2") == 0
    assert sizes[:3] == [2, 1, 1]
    assert json.loads((out / "report.json").read_text())["groups"][0]["working_batch_size"] == 1
