"""Scaling across processes: the same manifest run by one process and by N under torchrun, side by side.

On a multi-GPU machine: 1 GPU vs N GPUs (`--device cuda`, one rank per GPU). On a CPU:
one process with N threads vs N processes with one thread each (the same cores), which
measures the plumbing, not a speed-up; label it so.

    python benchmarks/ranks.py --processes 2 --images 48 [--model tiny --device cpu] [--report]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _manifest(path: Path, images: int) -> Path:
    colours, shapes = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle"]
    rows = [{"id": f"img{i:05d}", "prompt": f"a {colours[i % 4]} {shapes[i % 3]}", "seed": i} for i in range(images)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (one rank per GPU)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--report", action="store_true", help="write reports/ranks-<date>-<device>.md")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sdbatch-ranks-"))
    manifest = _manifest(work / "bench.jsonl", args.images)
    options = ["--model", args.model, "--device", args.device, "--steps", str(args.steps), "--width", str(args.size),
               "--height", str(args.size), "--batch-size", str(args.batch_size), "--quiet"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    cpu = args.device == "cpu"
    results = {}
    for label, processes in (("1 process", 1), (f"{args.processes} processes", args.processes)):
        out = work / f"out{processes}"
        run_env = dict(env)
        if cpu:  # the same cores either way: N threads in one process, or one thread in each of N
            run_env["OMP_NUM_THREADS"] = str(args.processes if processes == 1 else 1)
        if processes == 1:
            command = [sys.executable, str(REPO / "run_batch.py"), str(manifest), "--out", str(out), *options]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                       "--master-port", str(_port()), "-m", "batch.cli", "run", str(manifest), "--out", str(out),
                       *options]
        wall = _run(command, run_env)
        report = json.loads((out / "report.json").read_text())
        totals = report["totals"]
        results[label] = {"processes": processes, "wall_s": round(wall, 2), "images": totals["generated"],
                          "images_per_s_end_to_end": round(totals["generated"] / wall, 3),
                          "images_per_s_generation": totals.get("ranks_images_per_s", totals["images_per_s"]),
                          "ranks": [(r["rank"], r["images"]) for r in report.get("ranks", [])]}
        print(label, json.dumps(results[label]))
    shutil.rmtree(work, ignore_errors=True)
    one, many = results["1 process"], results[f"{args.processes} processes"]
    ratio = many["images_per_s_end_to_end"] / one["images_per_s_end_to_end"]
    print(f"end-to-end images/s, {args.processes} processes vs 1: {ratio:.2f}x")
    if args.report:
        kind = "cpu" if cpu else "gpu"
        lines = [f"# Scaling across processes — {dt.date.today()} ({kind})", "",
                 f"`python benchmarks/ranks.py --processes {args.processes} --images {args.images} --model {args.model} "
                 f"--device {args.device} --steps {args.steps} --size {args.size} --batch-size {args.batch_size}` on "
                 f"{platform.node()} ({os.cpu_count()} CPU cores).", ""]
        if cpu:
            lines += ["**CPU figure, labelled as such:** the same cores run one process with "
                      f"{args.processes} threads, then {args.processes} processes with one thread each (torchrun). "
                      "It measures the multi-process plumbing (claims, journals, report), not a GPU speed-up.", ""]
        lines += ["| run | wall s (whole command) | images | images/s end to end | images/s generating (sum over ranks) | images per rank |",
                  "|---|---|---|---|---|---|"]
        for label, r in results.items():
            lines.append(f"| {label} | {r['wall_s']} | {r['images']} | {r['images_per_s_end_to_end']} | "
                         f"{r['images_per_s_generation']} | {r['ranks'] or '-'} |")
        lines += ["", f"{args.processes} processes vs 1, end to end: **{ratio:.2f}x**.", ""]
        path = REPO / "reports" / f"ranks-{dt.date.today()}-{kind}.md"
        path.write_text("\n".join(lines), encoding="utf-8")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
