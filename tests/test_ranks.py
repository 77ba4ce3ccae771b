"""Several processes under torchrun (CPU, gloo-free: ranks share only the launcher's store and OUT).

Every image once, pixels identical to a single-process run, both ranks at work; kills,
restarts and resumes with another number of processes lose and duplicate nothing; two
"machines" (two torchrun invocations, --nnodes 2, loopback) share one OUT.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, cli, done_count, pixels, read_metadata, write_jsonl

pytestmark = pytest.mark.slow

OPTIONS = ["--model", "tiny", "--device", "cpu", "--steps", "8", "--width", "64", "--height", "64", "--batch-size", "2",
           "--quiet"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _manifest(folder: Path, count: int = 22) -> Path:
    """txt2img rows and an img2img row: two groups, several batches each."""
    from PIL import Image

    Image.new("RGB", (64, 64), (220, 30, 30)).save(folder / "init.png")
    rows = [{"id": f"t{i:02d}", "prompt": f"a {['red', 'blue', 'green'][i % 3]} circle", "seed": 10 + i}
            for i in range(count)]
    rows += [{"id": f"i{i}", "prompt": "a blue square", "init_image": "init.png", "strength": 0.7, "seed": i}
             for i in range(4)]
    return write_jsonl(folder / "night.jsonl", rows)


def _torchrun(manifest: Path, out: Path, nproc: int = 2, extra=(), torchrun_args=(), wait=True):
    return _launch(["run", str(manifest), "--out", str(out), *OPTIONS, *extra], nproc, torchrun_args, wait)


def _launch_env() -> dict[str, str]:
    """What every launched process runs with: one CPU thread, and stacks printed when something hangs.

    PYTHONFAULTHANDLER: a process sent SIGABRT prints every thread's Python stack (`_finish` does
    that before it kills a launch that did not end), and one that crashes prints its own.
    TORCH_DISTRIBUTED_DEBUG is not set here (a CI job may set it; it is passed on): under torch
    2.13+cpu, DETAIL crashes DDP's constructor on gloo (SIGSEGV in `set_construction_data_and_log`,
    every time), and INFO aborts a plain two-rank DDP script at exit about once in 30 runs
    ("terminate called without an active exception"; 0 in 30 without it).
    """
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")


def _no_core_files() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the stack dump's SIGABRT writes no core file


def _popen(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(args, env=_launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_no_core_files)


def _launch(command: list[str], nproc: int = 2, torchrun_args=(), wait=True):
    """`torchrun ... -m batch.cli COMMAND`, one CPU thread per process."""
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *torchrun_args]
    if "--nnodes" not in torchrun_args:
        args += ["--master-port", str(_free_port())]
    args += ["-m", "batch.cli", *command]
    proc = _popen(args)
    if not wait:
        return proc
    output = _finish(proc, "the launch did not end", timeout=600)
    return proc.returncode, output


def _status(out: Path, capsys) -> dict:
    capsys.readouterr()
    assert cli("status", out, "--json") == 0
    return json.loads(capsys.readouterr().out)


def _same_pixels(out: Path, reference: Path) -> None:
    names = sorted(m["file_name"] for m in read_metadata(out))
    assert names == sorted(m["file_name"] for m in read_metadata(reference)), "every image exactly once"
    assert len(names) == len(set(names))
    for name in names:
        assert np.array_equal(pixels(out / "images" / name), pixels(reference / "images" / name)), name


def _single(manifest: Path, out: Path, wait: bool = True):
    """One process, with the one CPU thread torchrun gives each rank (a thread count can move a pixel)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "run_batch.py"), str(manifest), "--out", str(out), *OPTIONS],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    output, _ = proc.communicate(timeout=600)
    return proc.returncode, output


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("ranks")
    manifest = _manifest(folder)
    code, output = _single(manifest, folder / "single")
    assert code == 0, output[-2000:]
    return manifest, folder / "single"


def test_two_ranks_make_every_image_once_with_single_process_pixels(reference, tmp_path, capsys):
    manifest, single = reference
    out = tmp_path / "two"
    code, output = _torchrun(manifest, out)
    assert code == 0, output[-3000:]
    _same_pixels(out, single)
    assert _status(out, capsys) == {"total": 26, "done": 26, "failed": 0, "pending": 0}
    report = json.loads((out / "report.json").read_text())
    ranks = report["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["images"] >= 1 for r in ranks), f"both ranks must work: {ranks}"
    assert sum(r["images"] for r in ranks) == 26 == report["totals"]["generated"]
    assert report["run"]["processes"] == 2
    single_report = json.loads((single / "report.json").read_text())
    batches = [[g["batches"] for g in r["groups"]] for r in (report, single_report)]
    assert batches[0] == batches[1], "each batch counted once, whichever rank ran it"
    assert not list(out.glob("journal-rank*.sqlite")), "rank 0 absorbs the journals at the end"
    assert "Processes (2)" in (out / "report.html").read_text()


def _merged_done(out: Path) -> int:
    from batch.checkpoint import Checkpoint

    if not (out / "checkpoint.sqlite").exists():
        return 0
    try:
        view = Checkpoint.merged(out)
    except Exception:  # noqa: BLE001 -- the file is being created
        return 0
    try:
        return view.counts().done
    finally:
        view.close()


def _rank_pids(launcher: int) -> list[int]:
    """The worker processes torchrun started (children of its agent)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    return [int(c) for c in children]


def test_a_killed_rank_restarts_under_max_restarts_and_nothing_is_lost_or_duplicated(reference, tmp_path):
    manifest, single = reference
    out = tmp_path / "restarted"
    proc = _torchrun(manifest, out, torchrun_args=("--max-restarts", "1"), wait=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and _merged_done(out) < 4:
        time.sleep(0.05)
    workers = _rank_pids(proc.pid)
    assert len(workers) == 2 and proc.poll() is None
    os.kill(workers[-1], signal.SIGKILL)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    _same_pixels(out, single)


@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)])
def test_resume_with_another_number_of_processes(reference, tmp_path, capsys, first, second):
    manifest, single = reference
    out = tmp_path / f"{first}-then-{second}"
    if first == 2:
        proc = _torchrun(manifest, out, wait=False)
    else:
        proc = _single(manifest, out, wait=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and _merged_done(out) < 6:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    for pid in (_rank_pids(proc.pid) if first == 2 else []) + [proc.pid]:  # every worker, then the launcher
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    killed_at = _merged_done(out)
    status = _status(out, capsys)
    assert status["done"] >= killed_at and status["done"] < 26
    if second == 2:
        code, output = _torchrun(manifest, out)
        assert code == 0, output[-3000:]
    else:
        code, output = _single(manifest, out)
        assert code == 0, output[-3000:]
    _same_pixels(out, single)
    assert _status(out, capsys) == {"total": 26, "done": 26, "failed": 0, "pending": 0}


def test_two_machines_on_loopback_share_one_out(reference, tmp_path):
    manifest, single = reference
    out = tmp_path / "two-hosts"
    port = _free_port()
    common = ("--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port))
    node0 = _torchrun(manifest, out, nproc=1, torchrun_args=(*common, "--node-rank", "0"), wait=False)
    node1 = _torchrun(manifest, out, nproc=1, torchrun_args=(*common, "--node-rank", "1"), wait=False)
    out0, _ = node0.communicate(timeout=600)
    out1, _ = node1.communicate(timeout=600)
    assert node0.returncode == 0 and node1.returncode == 0, (out0[-2000:], out1[-2000:])
    _same_pixels(out, single)
    ranks = json.loads((out / "report.json").read_text())["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and sum(r["images"] for r in ranks) == 26


def test_train_lora_under_torchrun_an_interrupt_to_one_process_stops_both_at_one_step(tmp_path):
    """Ctrl-C that reaches one rank only (a signal to one pid): every rank stops after the same step,
    one checkpoint is written, and the run resumes under the same launch to the end."""
    from batch.toy.world import write_folder

    write_folder(tmp_path / "raw", 4, seed=1, shapes=("diamond",))
    assert cli("prepare-dataset", tmp_path / "raw", tmp_path / "data", "--size", "64", "--quiet") == 0
    out = tmp_path / "lora"
    train = ["train-lora", str(tmp_path / "data"), "--out", str(out), "--model", "tiny", "--device", "cpu",
             "--resolution", "64", "--batch-size", "1", "--rank", "2", "--checkpoint-every", "1000", "--quiet"]
    proc = _launch([*train, "--max-steps", "1000"], wait=False)
    deadline = time.monotonic() + 300
    loss_log = out / "loss.csv"
    while time.monotonic() < deadline and proc.poll() is None and (
            not loss_log.exists() or len(loss_log.read_text().splitlines()) < 4):
        time.sleep(0.05)
    workers = _rank_pids(proc.pid)
    assert len(workers) == 2 and proc.poll() is None, "the run ended before it could be interrupted"
    os.kill(workers[-1], signal.SIGINT)
    output = _finish(proc, "the other process did not stop: it waits for the interrupted one")
    stopped = [int(line.split("stopped at step ")[1].split(";")[0]) for line in output.splitlines()
               if "stopped at step " in line]
    assert len(stopped) == 2 and stopped[0] == stopped[1], output[-3000:]  # each rank says so, at one step
    step = stopped[0]
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{step}"]
    proc = _launch([*train, "--max-steps", str(step + 2), "--resume", "latest"], wait=False)
    output = _finish(proc, "the resumed run did not end")
    assert proc.returncode == 0, output[-3000:]
    assert json.loads((out / "train.json").read_text())["processes"] == 2
    assert (out / "final").is_dir() and len(loss_log.read_text().splitlines()) == step + 3  # a header, every step


def _finish(proc, why: str, timeout: float = 180) -> str:
    """The launch's output once it ends; past `timeout`, every rank prints its stacks (SIGABRT under
    PYTHONFAULTHANDLER), then every process of the launch is killed and the test fails with `why`."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        workers = _live_rank_pids(proc)
        for pid in workers:
            _signal(pid, signal.SIGABRT)
        try:
            output = proc.communicate(timeout=30)[0]  # the launcher reports its failed workers and ends
        except subprocess.TimeoutExpired:
            for pid in [*workers, *_live_rank_pids(proc), proc.pid]:
                _signal(pid, signal.SIGKILL)
            output = proc.communicate()[0]
        stacks = output[output.find("Fatal Python error"):] if "Fatal Python error" in output else output[-2000:]
        pytest.fail(f"{why} within {timeout} s; the ranks' stacks:\n{stacks[-12000:]}")


def _live_rank_pids(proc) -> list[int]:
    """`_rank_pids`, or none if the launcher has just ended."""
    try:
        return _rank_pids(proc.pid)
    except FileNotFoundError:
        return []


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def test_a_launch_that_hangs_prints_every_rank_s_stack_before_it_is_killed(tmp_path):
    """The intermittent CI hang (rank 1 in a gloo collective after rank 0 had left) gave no stacks:
    the next one prints them. A fake launcher whose one worker waits for ever stands in for torchrun."""
    assert _launch_env()["PYTHONFAULTHANDLER"] == "1"
    ready = tmp_path / "waiting"
    worker = (f"import pathlib, time\ndef waiting_in_a_collective():\n    pathlib.Path({str(ready)!r}).touch()\n"
              "    time.sleep(600)\nwaiting_in_a_collective()\n")
    launcher = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {worker!r}])"
    proc = _popen([sys.executable, "-c", launcher])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not ready.exists():
        time.sleep(0.05)
    with pytest.raises(pytest.fail.Exception) as failed:
        _finish(proc, "the fake launch did not end", timeout=1)
    message = str(failed.value)
    assert "did not end within 1 s" in message and "in waiting_in_a_collective" in message, message
    assert proc.poll() is not None, "every process of the launch is gone"


def test_a_single_process_run_writes_no_journal_and_keeps_wal(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": "a red circle"}])
    out = tmp_path / "out"
    assert cli(manifest, *OPTIONS, "--out", out) == 0
    import sqlite3

    assert not list(out.glob("journal-*"))
    mode = sqlite3.connect(out / "checkpoint.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    assert "ranks" not in json.loads((out / "report.json").read_text())
    assert done_count(out) == 1
