"""report.json, report.csv, report.md and report.html, built from the checkpoint alone (so `report OUT` can rebuild them)."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from . import html_report
from .checkpoint import Checkpoint
from .writer import write_text_atomic

STAGES = ("load_s", "warmup_s", "encode_s", "denoise_s", "decode_s", "write_s")


def build_report(checkpoint: Checkpoint) -> dict:
    """The report of the folder's latest run that made images (a rerun that made nothing must not
    erase the figures of the run that did), a table of every run, and image counts over the whole folder."""
    runs = checkpoint.runs()
    counts = checkpoint.counts()
    made = [r for r in runs if (r[2] or {}).get("generated") or checkpoint.group_stats(r[0])]
    shown = made[-1] if made else (runs[-1] if runs else None)
    if shown is None:
        run_id, settings, timing = None, {}, {}
    else:
        run_id, settings, timing = shown
        timing = timing or {}
    groups = checkpoint.group_stats(run_id) if run_id is not None else []
    generated = sum(g["images"] for g in groups)
    generate_s = timing.get("generate_s", sum(g["wall_s"] for g in groups))
    vram = [g["peak_vram_bytes"] for g in groups if g.get("peak_vram_bytes") is not None]
    stages = {name: round(sum(g.get(name, 0.0) for g in groups), 4) for name in ("load_s", "warmup_s")}
    for name in STAGES[2:]:
        stages[name] = round(sum(g.get("stages", {}).get(name, 0.0) for g in groups), 4)
    wall_s = timing.get("wall_s", round(sum(g["wall_s"] + g["load_s"] + g["warmup_s"] for g in groups), 4))
    totals = {
        "jobs": timing.get("jobs"),
        "images": counts.total,
        "done": counts.done,
        "failed": counts.failed,
        "pending": counts.pending,
        "skipped_from_checkpoint": timing.get("skipped_from_checkpoint", 0),
        "generated": generated,
        "wall_s": wall_s,  # the whole run: reading, loading, warm-up, generation, writing
        "generate_s": generate_s,  # batches only: no model load, no warm-up
        "images_per_s": round(generated / generate_s, 4) if generate_s else 0.0,
        "end_to_end_images_per_s": round(generated / wall_s, 4) if wall_s else 0.0,
        "peak_vram_bytes": timing.get("peak_vram_bytes", max(vram) if vram else None),
        "device_used_bytes": timing.get("device_used_bytes"),
        "peak_rss_bytes": timing.get("peak_rss_bytes"),
        "interrupted": timing.get("interrupted", bool(settings) and not timing),
    }
    report = {"run": settings, "totals": totals, "groups": groups, "stages": stages,
              "reported_run": run_id, "latest_run": runs[-1][0] if runs else None,
              "runs": [run_summary(number, run_settings, run_totals) for number, run_settings, run_totals in runs]}
    ranks = checkpoint.rank_stats(run_id) if run_id is not None else []
    if ranks:  # a run under torchrun / accelerate launch: what each process did, and all together
        report["ranks"] = ranks
        totals["ranks_images_per_s"] = round(sum(r["images_per_s"] for r in ranks), 4)
    clip = clip_score_summary(checkpoint, counts.done)
    if clip:  # `score` or `run --clip-score` has scored images here
        report["clip_score"] = clip
    return report


CLIP_BIN = 10  # clip_score histogram: counts per 10 points, [0, 10) ... [90, 100]


def clip_score_summary(checkpoint: Checkpoint, done: int) -> dict | None:
    """The scores of the CLIP model used last (batch/score.py): count, mean and a histogram, over
    all done images and per group (the group's name: model, mode, size, LoRA); None if none was used."""
    clip = checkpoint.clip_model()
    if clip is None:
        return None
    by_group: dict[str, list[float]] = {}
    for group, score in checkpoint.clip_scores(clip[0]):
        by_group.setdefault(group or "-", []).append(score)

    def summary(scores: list[float]) -> dict:
        histogram = [0] * (100 // CLIP_BIN)
        for score in scores:
            histogram[min(int(score // CLIP_BIN), len(histogram) - 1)] += 1
        return {"images": len(scores), "mean": round(sum(scores) / len(scores), 4) if scores else None,
                "histogram": histogram}

    every = [score for scores in by_group.values() for score in scores]
    return {"model": clip[1], "bin_width": CLIP_BIN, **summary(every), "unscored": done - len(every),
            "groups": [{"group": group, **summary(scores)} for group, scores in by_group.items()]}


def run_summary(number: int, settings: dict, totals: dict | None) -> dict:
    """One line of the report's table of runs."""
    totals = totals or {}
    generated, generate_s = totals.get("generated"), totals.get("generate_s")
    return {"run": number, "started_at": settings.get("started_at"), "model": settings.get("model"),
            "device": settings.get("device"), "processes": settings.get("processes", 1),
            "threads": settings.get("threads"), "generated": generated,
            "skipped_from_checkpoint": totals.get("skipped_from_checkpoint"), "generate_s": generate_s,
            "images_per_s": round(generated / generate_s, 4) if generated and generate_s else None,
            "wall_s": totals.get("wall_s"), "finished": bool(totals) and not totals.get("interrupted")}


def write_reports(out: Path, checkpoint: Checkpoint) -> dict:
    report = build_report(checkpoint)
    write_text_atomic(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(out / "report.csv", _csv(checkpoint))
    write_text_atomic(out / "report.md", markdown(report))
    write_text_atomic(out / "report.html", html_report.render(report, checkpoint, out))
    return report


def _csv(checkpoint: Checkpoint) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "k", "group", "batch", "seconds", "status"])
    for image_id, k, group, batch, seconds, status in checkpoint.image_rows():
        writer.writerow([image_id, k, group or "", "" if batch is None else batch,
                         "" if seconds is None else f"{seconds:.4f}", status])
    return buffer.getvalue()


def _gb(value) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GB"


def _num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    """A human summary: what ran, how fast, where the time went."""
    run, totals, groups = report["run"], report["totals"], report["groups"]
    lines = [
        "# sdbatch report",
        "",
        f"Model `{run.get('model')}` on {run.get('gpu_name') or run.get('device')} ({run.get('dtype')}), "
        f"torch {run.get('torch')}, diffusers {run.get('diffusers')}, started {run.get('started_at')}.",
        "",
        "| images | done | failed | pending | skipped (checkpoint) | made now | generate s | images/s (generation) "
        "| wall s (whole run) | images/s (end to end) | peak VRAM | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {totals['images']} | {totals['done']} | {totals['failed']} | {totals['pending']} | "
        f"{totals['skipped_from_checkpoint']} | {totals['generated']} | {_num(totals.get('generate_s'))} | "
        f"{_num(totals['images_per_s'])} | {_num(totals['wall_s'])} | {_num(totals.get('end_to_end_images_per_s'))} | "
        f"{_gb(totals['peak_vram_bytes'])} | {_gb(totals['peak_rss_bytes'])} |",
        "",
        "images/s (generation) = made now ÷ generate s (the batches: no model load, no warm-up); "
        "images/s (end to end) = made now ÷ wall s (the whole run, loads and warm-up included).",
        "",
    ]
    if totals.get("interrupted"):
        lines += ["**The run was interrupted**: run the same command again to finish it.", ""]
    if report.get("latest_run") is not None and report.get("reported_run") != report.get("latest_run"):
        lines += [f"The latest run ({report['latest_run']}) made no images: the figures here are those of run "
                  f"{report['reported_run']}, the latest that did. Every run is listed under Runs.", ""]
    if groups:
        lines += [
            "## Groups",
            "",
            "| model | family | mode | size | lora | images | batches | load s | warm-up s | generate s | images/s (generation) "
            "| s/image p50 (batch s ÷ batch size) | s/image p95 (batch s ÷ batch size) | peak VRAM | VRAM estimate |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for g in groups:
            lines.append(
                f"| {g['model']} | {g.get('family', 'sd')} | {g['mode']} | {g['width']}x{g['height']} | {g['lora'] or '-'} | {g['images']} | "
                f"{g['batches']} | {_num(g['load_s'])} | {_num(g['warmup_s'])} | {_num(g['wall_s'])} | "
                f"{_num(g['images_per_s'])} | {_num(g['s_per_image_p50'], 3)} | {_num(g['s_per_image_p95'], 3)} | "
                f"{_gb(g['peak_vram_bytes'])} | {_gb(g.get('vram_estimate_bytes'))} |")
        lines += ["", html_report.PER_IMAGE_NOTE, ""]
        lines += ["## Time per stage (seconds, summed)", "", "| " + " | ".join(STAGES) + " |",
                  "|" + "---|" * len(STAGES),
                  "| " + " | ".join(_num(report["stages"][s]) for s in STAGES) + " |", ""]
    if report.get("ranks"):
        lines += ["## Processes", "", "| rank | host | device | images | generate s | images/s |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['rank']} | {r['host']} | {r['device']} | {r['images']} | {_num(r['seconds'])} | "
                  f"{_num(r['images_per_s'])} |" for r in report["ranks"]]
        lines += [f"| all | | | {sum(r['images'] for r in report['ranks'])} | | {_num(totals['ranks_images_per_s'])} |", ""]
    if len(report.get("runs", [])) > 1:
        lines += ["## Runs", "", "| run | started | model | device | processes | threads | made | skipped | generate s "
                  "| images/s (generation) | wall s | finished |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['run']} | {r['started_at']} | {r['model']} | {r['device']} | {r['processes']} | "
                  f"{r['threads'] or '-'} | {r['generated'] if r['generated'] is not None else '-'} | "
                  f"{r['skipped_from_checkpoint'] if r['skipped_from_checkpoint'] is not None else '-'} | "
                  f"{_num(r['generate_s'])} | {_num(r['images_per_s'])} | {_num(r['wall_s'])} | "
                  f"{'yes' if r['finished'] else 'no'} |" for r in report["runs"]]
        lines.append("")
    clip = report.get("clip_score")
    if clip:
        bins = [f"{low}-{low + clip['bin_width']}" for low in range(0, 100, clip["bin_width"])]
        lines += [f"## CLIP scores ({clip['model']})", "",
                  f"{clip['images']} images scored, mean {_num(clip['mean'])}; {clip['unscored']} not scored "
                  "(no text prompt, or not yet: `sdbatch score`). Images per score bin:", "",
                  "| group | images | mean | " + " | ".join(bins) + " |", "|---|---|---|" + "---|" * len(bins)]
        lines += [f"| {g['group']} | {g['images']} | {_num(g['mean'])} | " + " | ".join(map(str, g["histogram"])) + " |"
                  for g in clip["groups"]]
        lines.append("")
    if totals["failed"]:
        lines += [f"{totals['failed']} image(s) failed: see `failed.jsonl` (run it as a manifest, or rerun with `--retry-failed`).", ""]
    return "\n".join(lines)
