"""The run's context (ranks, device, stop) is handed in, never discovered (issue 19: 1, 2, 4, 6, 8).

No GPU here: a fake torch.cuda checks every device it is handed with torch's own validation
(`_get_device_index`, which `set_device` uses), so a bare "cuda" fails here as it fails on a GPU.
Launches are simulated with an in-memory store shared by threads, one thread per rank.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from conftest import cli, done_count, write_jsonl

torch = pytest.importorskip("torch")

import batch.ranks as ranks_module  # noqa: E402
from batch.context import RunContext  # noqa: E402
from batch.interrupt import GracefulStop, Stop, StopRequested  # noqa: E402
from batch.ranks import Claims, Ranks  # noqa: E402

# --- 1. every device string handed to torch.cuda is one torch accepts ------------------------------------


class CheckedCuda:
    """torch.cuda on a pretend two-GPU machine: each call's device goes through torch's own check."""

    def __init__(self, monkeypatch, count: int = 2):
        from torch.cuda._utils import _get_device_index

        self.handed: list[tuple[str, object]] = []
        self.current = 0
        self.count = count

        def checked(name, result=None):
            def call(device=None, *args, **kwargs):
                self.handed.append((name, device))
                index = _get_device_index(device, optional=False)  # raises on "cuda" without an index
                assert 0 <= index < self.count, f"{name} got {device!r}: no such GPU"
                if name == "set_device":
                    self.current = index
                return result(index) if callable(result) else result
            return call

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        for name in ("set_device", "synchronize", "reset_peak_memory_stats"):
            monkeypatch.setattr(torch.cuda, name, checked(name))
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)  # takes no device: it acts on the current one
        for name in ("max_memory_allocated", "memory_allocated"):
            monkeypatch.setattr(torch.cuda, name, checked(name, 0))
        monkeypatch.setattr(torch.cuda, "mem_get_info", checked("mem_get_info", (1, 2)))
        monkeypatch.setattr(torch.cuda, "get_device_name", checked("get_device_name", "Fake GPU"))
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            checked("get_device_properties", type("Props", (), {"total_memory": 2})()))

        class _Device:  # `with torch.cuda.device(d)`: the same check
            def __init__(inner, device):
                checked("device")(device)

            def __enter__(inner):
                return inner

            def __exit__(inner, *exc):
                return False

        monkeypatch.setattr(torch.cuda, "device", _Device)


def _no_model(monkeypatch):
    """Loading fails (there is no GPU to load onto): its rows fail, the run ends normally."""
    from batch import execute
    from batch.errors import ModelError

    loaded_on = []

    def refuse(model, options):
        loaded_on.append(options.device)
        raise ModelError("no model in this test")

    monkeypatch.setattr(execute, "load_family", refuse)
    return loaded_on


@pytest.mark.parametrize("requested, expected", [("auto", "cuda:0"), ("cuda", "cuda:0"), ("cuda:1", "cuda:1")])
def test_device_names_resolve_to_an_indexed_gpu(monkeypatch, requested, expected):
    CheckedCuda(monkeypatch)
    from batch.models import resolve_device

    assert resolve_device(requested) == expected
    assert RunContext.single(requested).device == expected


def test_cuda_follows_the_current_device(monkeypatch):
    cuda = CheckedCuda(monkeypatch)
    torch.cuda.set_device(1)  # e.g. train-lora --device cuda:1 before its validation run
    assert RunContext.single("cuda").device == "cuda:1"
    assert cuda.current == 1


@pytest.mark.parametrize("requested", ["auto", "cuda"])
def test_under_a_launcher_each_rank_takes_its_local_gpu(monkeypatch, requested):
    CheckedCuda(monkeypatch)
    environ = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}
    context = RunContext.launched(requested, environ=environ)
    assert context.device == "cuda:1" and context.ranks.rank == 3 and context.ranks.world_size == 4
    assert RunContext.launched(requested, environ={}).device == "cuda:0"  # no launcher: one process


@pytest.mark.parametrize("requested", ["auto", "cuda", "cuda:1"])
def test_a_cli_run_on_one_gpu_hands_cuda_only_indexed_devices(monkeypatch, tmp_path, requested):
    """`--device auto` on one GPU once stopped before its first image: set_device("cuda") is refused."""
    cuda = CheckedCuda(monkeypatch)
    loaded_on = _no_model(monkeypatch)
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": "a red circle"}])
    code = cli(manifest, "--model", "tiny", "--device", requested, "--out", tmp_path / "out", "--quiet")
    assert code == 1, "the model did not load, so the row failed; the run itself must end normally"
    expected = "cuda:1" if requested == "cuda:1" else "cuda:0"
    assert loaded_on == [expected]
    assert ("set_device", expected) in cuda.handed
    assert {device for _, device in cuda.handed} == {expected}


def test_the_python_api_hands_cuda_only_indexed_devices(monkeypatch, tmp_path):
    import batch

    cuda = CheckedCuda(monkeypatch)
    loaded_on = _no_model(monkeypatch)
    result = batch.run([{"id": "a", "prompt": "a red circle"}], out=tmp_path / "out", model="tiny", quiet=True)
    assert result.exit_code == 1 and loaded_on == ["cuda:0"]
    assert ("set_device", "cuda:0") in cuda.handed

    import batch.models as models

    seen = []

    def capture(model, options):
        seen.append(options.device)
        raise RuntimeError("stop here")

    monkeypatch.setattr(models, "load_family", capture)
    with pytest.raises(RuntimeError, match="stop here"):
        batch.Generator("tiny", device="auto")
    assert seen == ["cuda:0"]


def test_train_lora_validation_on_one_gpu_hands_an_indexed_device(monkeypatch, tmp_path):
    """accelerate's device on one GPU is a bare `cuda`; the validation run must index it."""
    from batch.train.validation import ValidationSpec, validate

    cuda = CheckedCuda(monkeypatch)
    loaded_on = _no_model(monkeypatch)
    spec = ValidationSpec(("a red circle",), 1, 64, 64, 0, "tiny", "cuda")
    validate(spec, tmp_path, 1, None)
    assert loaded_on == ["cuda:0"] and ("set_device", "cuda:0") in cuda.handed


# --- 2. a nested or main-process-only run is one process, whatever the launcher's environment says ------

SMALL = {"steps": 2, "width": 32, "height": 32, "quiet": True, "device": "cpu"}


@pytest.fixture
def inside_a_launch(monkeypatch):
    """This process is rank 0 of 2 (as under `torchrun --nproc-per-node 2`), and no store may be reached."""
    import torch.distributed as dist

    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)

    def no_rendezvous(*args, **kwargs):
        raise AssertionError("a single-process run tried to join the launch")

    monkeypatch.setattr(dist, "rendezvous", no_rendezvous)


def test_api_run_under_is_main_process_is_one_process(inside_a_launch, tmp_path):
    import batch

    result = batch.run([{"id": "a", "prompt": "a red circle", "seed": 1}], out=tmp_path / "out", model="tiny", **SMALL)
    assert result.exit_code == 0 and result.generated == 1
    assert not list((tmp_path / "out").glob("journal-*")) and not list((tmp_path / "out").glob(".plan-*"))


def test_train_lora_validation_under_a_launcher_is_one_process(inside_a_launch, tmp_path):
    from batch.train.validation import ValidationSpec, validate

    spec = ValidationSpec(("a red circle", "a blue square"), 1, 32, 32, 0, "tiny", "cpu")
    folder = validate(spec, tmp_path, 3, None)
    assert done_count(folder) == 2


def test_api_run_with_launcher_true_joins_the_launch(inside_a_launch, tmp_path):
    import batch

    with pytest.raises(AssertionError, match="tried to join the launch"):
        batch.run([{"id": "a", "prompt": "a red circle"}], out=tmp_path / "out", model="tiny", launcher=True, **SMALL)


# --- 6. Ctrl-C during a nested run reaches the caller -------------------------------------------------------


def test_ctrl_c_during_validation_stops_the_caller_too(tmp_path, monkeypatch):
    """The nested run checks the caller's stop and installs no handler: the SIGINT is the training's."""
    from batch import execute, generate
    from batch.train.validation import ValidationSpec, validate

    real = generate.generate_batch
    calls = []

    def interrupted_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C during the first batch
        return real(*args, **kwargs)

    monkeypatch.setattr(execute, "generate_batch", interrupted_batch)
    colours = ("red", "blue", "green", "yellow", "purple", "white")  # two batches: 4 + 2 on the CPU
    spec = ValidationSpec(tuple(f"a {c} circle" for c in colours), 1, 32, 32, 0, "tiny", "cpu")
    with GracefulStop() as training_stop:
        folder = validate(spec, tmp_path, 2, None, training_stop)
    assert training_stop.requested, "the training's own stop must see the Ctrl-C"
    assert len(calls) == 1, f"the validation run must stop after the batch in hand, not make {len(calls)} batches"
    assert done_count(folder) == 4, "the batch in hand is finished and recorded, the next is not started"


# --- 4 and 8: the launch's store: one generation for every rank, stoppable waits, no leaked connection ----


class MemoryStore:
    """The few TCPStore calls sdbatch makes, in memory, shared by threads."""

    def __init__(self):
        self.data: dict[str, bytes] = {}
        self.lock = threading.Lock()

    def set(self, key, value):
        with self.lock:
            self.data[key] = value.encode() if isinstance(value, str) else value

    def get(self, key):
        with self.lock:
            return self.data[key]

    def check(self, keys):
        with self.lock:
            return all(k in self.data for k in keys)

    def add(self, key, amount):
        with self.lock:
            value = int(self.data.get(key, b"0")) + amount
            self.data[key] = str(value).encode()
            return value


@pytest.fixture
def fast_polls(monkeypatch):
    monkeypatch.setattr(ranks_module, "POLL_S", 0.01)


def _in_thread(target, *args):
    box = {}

    def body():
        try:
            box["value"] = target(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, box


def _claims(store, rank, world=2, stop=None):
    return Claims(Ranks(rank, world, rank, "host", "job1"), stop or Stop(), store=store)


def test_ranks_agree_on_one_prefix_whatever_each_node_counts_as_its_restart(fast_polls, monkeypatch):
    """Node 1 restarted its workers once more than node 0 (torchelastic counts per node)."""
    store = MemoryStore()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # what node 1's worker sees
    thread, box = _in_thread(_claims, store, 1)
    deadline = time.monotonic() + 10
    while not any(k.startswith("sdbatch/job1/run/join/") for k in store.data) and thread.is_alive():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # what node 0's worker sees
    first = _claims(store, 0)
    thread.join(10)
    second = box["value"]
    assert first.prefix == second.prefix
    assert sorted([first.next_batch(), second.next_batch(), first.next_batch()]) == [0, 1, 2]


def test_a_stale_join_from_an_earlier_run_does_not_confuse_the_next(fast_polls):
    store = MemoryStore()
    store.set("sdbatch/job1/run/join/1", "token-of-a-dead-rank")
    thread, box = _in_thread(_claims, store, 1)
    zero = _claims(store, 0)
    thread.join(10)
    assert box["value"].prefix == zero.prefix
    # A second run in the same processes (the Python API) gets its own keys.
    thread, box = _in_thread(_claims, store, 1)
    again = _claims(store, 0)
    thread.join(10)
    assert box["value"].prefix == again.prefix != zero.prefix


def test_waiting_for_a_peer_that_never_comes_ends_on_stop(fast_polls):
    stop = Stop()
    thread, box = _in_thread(_claims, MemoryStore(), 0, 2, stop)
    time.sleep(0.1)
    stop.request()
    thread.join(5)
    assert not thread.is_alive() and isinstance(box.get("error"), StopRequested)


def test_rank0_waiting_for_a_dead_peer_to_finish_ends_on_stop(fast_polls):
    """A dead peer must not keep rank 0 from writing its reports before torchrun's grace period ends."""
    store, stop = MemoryStore(), Stop()
    thread, box = _in_thread(_claims, store, 1)
    zero = _claims(store, 0, stop=stop)
    thread.join(10)
    zero.finished()  # rank 1 never finishes
    waiter, result = _in_thread(zero.await_all_finished)
    time.sleep(0.1)
    stop.request()
    waiter.join(5)
    assert not waiter.is_alive(), "rank 0 ignored the stop"
    assert result["value"] is False
    box["value"].finished()
    assert zero.await_all_finished() is True


def test_the_other_ranks_run_rank_0s_plan_batch_sizes_included(tmp_path):
    """A CPU rank beside a GPU rank 0 would choose batches of 4 where rank 0 chose 8."""
    import json

    from batch.config import Defaults
    from batch.manifest import load_manifest
    from batch.plan import layout, make_plan
    from batch.runner import rank_plan

    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": f"r{i}", "prompt": "a red circle", "width": 512,
                                                  "height": 512} for i in range(20)]
                           + [{"id": "s", "prompt": "a blue square", "width": 256, "height": 256, "num_images": 3}])
    jobs = load_manifest(manifest, Defaults(model="tiny"), 0, False).jobs
    tasks = [t for job in jobs for t in job.images("")]
    plan = make_plan(tasks, "tiny", None, "cuda:0")
    (tmp_path / ".plan-run1.json").write_text(json.dumps(layout(plan)))
    mine = rank_plan(tmp_path, 1, tasks, "tiny")
    assert make_plan(tasks, "tiny", None, "cpu") != plan, "the test needs a device that plans otherwise"
    assert mine == plan


def test_claims_close_their_store_connection(fast_polls):
    """A notebook keeps the frames of a failed or interrupted call alive (its traceback), and with them
    each run's Claims: closing it must release the connection even then."""
    import datetime as dt

    import psutil
    from torch.distributed import TCPStore

    server = TCPStore("127.0.0.1", 0, 1, True, timeout=dt.timedelta(seconds=10))
    port = server.port
    kept = []  # what the notebook's tracebacks hold on to

    def client():
        return TCPStore("127.0.0.1", port, 1, False, timeout=dt.timedelta(seconds=10))

    def connections() -> int:
        return sum(1 for c in psutil.Process().net_connections("tcp")
                   if c.raddr and c.raddr.port == port and c.status == "ESTABLISHED")

    def one_run():
        thread, box = _in_thread(lambda: Claims(Ranks(1, 2, 1, "h", "leak"), Stop(), store=client()))
        with Claims(Ranks(0, 2, 0, "h", "leak"), Stop(), store=client()) as zero:
            zero.next_batch()
        thread.join(10)
        with box["value"] as one:
            one.next_batch()
        kept.extend([zero, one])

    before = connections()
    for _ in range(10):
        one_run()
    assert connections() <= before, f"{connections() - before} connection(s) left open by 10 runs"
