"""torch's CPU thread count (issue 21.1): --threads, the default from usable and free CPUs, log and report."""
from __future__ import annotations

import json

import pytest
from conftest import FAST, cli, write_jsonl

from batch import threads

torch = pytest.importorskip("torch")


def test_explicit_threads_win_over_everything():
    assert threads.choose(3, environ={"OMP_NUM_THREADS": "1"}, previous=2).threads == 3


def test_omp_num_threads_is_honoured_when_no_threads_are_given():
    assert threads.choose(None, environ={"OMP_NUM_THREADS": "1"}, busy=0.0).threads == 1


def test_a_resumed_folder_keeps_its_first_runs_count():
    assert threads.choose(None, environ={}, busy=0.0, previous=1).threads == 1


def test_the_default_counts_usable_cpus_shares_them_and_leaves_busy_ones(monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 8)
    assert threads.choose(None, environ={}, busy=0.0).threads == 8
    assert threads.choose(None, processes_on_host=4, environ={}).threads == 2, "4 ranks on one host: 2 each"
    assert threads.choose(None, processes_on_host=16, environ={}).threads == 1
    assert threads.choose(None, environ={}, busy=6.2).threads == 2, "6 of 8 CPUs busy with another job"
    assert threads.choose(None, environ={}, busy=8.0).threads == 1, "never fewer than one"


def test_usable_cpus_follow_affinity_and_the_cgroup_quota(monkeypatch, tmp_path):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.setattr(threads, "cgroup_quota", lambda: None)
    assert threads.usable_cpus() == 6
    monkeypatch.setattr(threads, "cgroup_quota", lambda: 2.5)  # docker --cpus 2.5
    assert threads.usable_cpus() == 2


def test_cgroup_quota_reads_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_quota(tmp_path) == 3.0


def test_bad_thread_counts_are_refused(tmp_path, capsys):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": "a red circle"}])
    assert cli(manifest, *FAST, "--threads", "0", "--out", tmp_path / "out") == 2
    assert "--threads" in capsys.readouterr().err


def test_a_run_sets_logs_and_reports_its_thread_count(tmp_path, monkeypatch):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": "a red circle", "seed": 1}])
    before = torch.get_num_threads()
    try:
        assert cli(manifest, *FAST, "--threads", "1", "--out", tmp_path / "out", "--quiet") == 0
        assert torch.get_num_threads() == 1
        assert json.loads((tmp_path / "out" / "run.json").read_text())["threads"] == 1
        assert json.loads((tmp_path / "out" / "report.json").read_text())["run"]["threads"] == 1
        assert "1 CPU thread(s)" in (tmp_path / "out" / "run.log").read_text()
        # The same folder again without --threads keeps the count its images were made with.
        monkeypatch.delenv("OMP_NUM_THREADS")
        torch.set_num_threads(2)
        assert cli(manifest, *FAST, "--out", tmp_path / "out", "--quiet", "--fresh") == 0
        assert torch.get_num_threads() == 1
        assert json.loads((tmp_path / "out" / "run.json").read_text())["threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_every_command_takes_threads(capsys):
    from batch.cli import COMMANDS, build_parser

    parser = build_parser()
    for command in COMMANDS:
        sub = parser._subparsers._group_actions[0].choices[command]
        assert any("--threads" in action.option_strings for action in sub._actions), command


def test_the_python_api_takes_threads(tmp_path):
    import batch

    before = torch.get_num_threads()
    try:
        result = batch.run([{"id": "a", "prompt": "a red circle", "seed": 1}], out=tmp_path / "out", model="tiny",
                           device="cpu", steps=2, width=32, height=32, quiet=True, threads=1)
        assert result.exit_code == 0 and torch.get_num_threads() == 1
        assert result.report["run"]["threads"] == 1
    finally:
        torch.set_num_threads(before)
