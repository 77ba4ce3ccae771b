"""The default thread count against every fixed choice, on an idle and on a loaded machine (issue 21.1).

    python benchmarks/threads.py [--images 12] [--out reports/threads-DATE-cpu.md]

Each variant is a fresh `sdbatch run` process on the embedded model (OMP_NUM_THREADS unset, so
the default is sdbatch's own), in turns, three rounds; the figure is generation images/s from
report.json (model loading excluded), the median of the rounds. "Loaded" runs one busy-looping
process per usable CPU beside it, as another job on a shared box would.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from batch.threads import usable_cpus  # noqa: E402


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def _run(threads: int | None, images: int, folder: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    out = folder / f"t{threads or 'default'}"
    command = [sys.executable, "-m", "batch.cli", "--prompt", "a red circle", "--num", str(images), "--model", "tiny",
               "--device", "cpu", "--steps", "8", "--width", "64", "--height", "64", "--out", str(out), "--fresh",
               "--quiet"]
    if threads is not None:
        command += ["--threads", str(threads)]
    subprocess.run(command, env=env, check=True, capture_output=True)
    report = json.loads((out / "report.json").read_text())
    chosen = report["run"]["threads"]
    made = report["totals"]["generated"]
    return made / report["totals"]["generate_s"], chosen


def measure(images: int, rounds: int) -> dict:
    variants = [None] + list(range(1, usable_cpus() + 1))
    seen: dict = {v: [] for v in variants}
    chosen = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for v in variants:
                rate, threads = _run(v, images, Path(tmp))
                seen[v].append(rate)
                if v is None:
                    chosen.setdefault("default", []).append(threads)
    return {("default" if v is None else v): statistics.median(r) for v, r in seen.items()} | {"chosen": chosen["default"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "reports" / f"threads-{dt.date.today()}-cpu.md")
    args = parser.parse_args()
    results = {"idle": measure(args.images, args.rounds)}
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True) for _ in range(usable_cpus())]
    for p in spinners:
        p.start()
    try:
        results["loaded"] = measure(args.images, args.rounds)
    finally:
        stop.set()
        for p in spinners:
            p.join()
    lines = [f"# Thread count: sdbatch's default against fixed choices ({dt.date.today()}, CPU)", "",
             f"`python benchmarks/threads.py --images {args.images} --rounds {args.rounds}`: "
             f"{usable_cpus()} usable CPU(s), tiny model, 64x64, 8 steps; generation images/s (median of "
             f"{args.rounds} rounds, fresh process each). Loaded: {usable_cpus()} busy-looping process(es) beside it.",
             "", "| machine | default (threads chosen) | " + " | ".join(
                 f"{t} thread(s)" for t in range(1, usable_cpus() + 1)) + " | default / best |",
             "|---|---|" + "---|" * usable_cpus() + "---|"]
    for name, figures in results.items():
        fixed = [figures[t] for t in range(1, usable_cpus() + 1)]
        lines.append(f"| {name} | {figures['default']:.2f} ({', '.join(map(str, figures['chosen']))}) | "
                     + " | ".join(f"{f:.2f}" for f in fixed) + f" | {figures['default'] / max(fixed):.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
