"""report.html: the report for people, one self-contained file.

Built from report.json's data plus the checkpoint (batch timings, thumbnails, failures).
No network, no JavaScript: inline CSS, charts as inline SVG, thumbnails as data URIs,
so the file can be mailed, attached to a CI run or opened from a cluster's scratch disk.
Every piece of user text (ids, prompts, errors, paths) goes through `html.escape`.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import shlex
from itertools import islice
from pathlib import Path

from .checkpoint import Checkpoint

THUMB_PX = 128  # longest side of a contact-sheet thumbnail
MAX_THUMBS = 200  # keeps the page a few MB at most, whatever the run's size
MAX_FAILURES = 200
MAX_GRIDS = 24  # sweep grids embedded in the page (every one is in OUT/grids)
GRID_PX = 768  # longest side of an embedded grid
MAX_POINTS = 1000  # batch-latency points drawn; longer runs show the slowest batch of each stretch
# s_per_image_* are shares of a batch's time: say so, or they read as the latency of one image.
PER_IMAGE_NOTE = ("s/image p50/p95: each image's share of its batch (batch generation s ÷ batch size), "
                  "not the latency of one image; generate s and images/s exclude model load and warm-up.")
COLORS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1", "#edc948", "#9c755f")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;background:#fafafa;margin:0}
main{max-width:1120px;margin:0 auto;padding:16px 24px 40px}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:14px;margin:16px 0 6px}.sub,.note{color:#666}
.banner{background:#fff3cd;border:1px solid #e0c46c;padding:8px 12px;border-radius:4px}
.cards{display:flex;flex-wrap:wrap;gap:8px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:110px}
.card b{display:block;font-size:20px}.card span{color:#666;font-size:12px}
.card.bad b{color:#c0392b}
table{border-collapse:collapse;background:#fff;font-size:13px}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0}td.n{text-align:right;font-variant-numeric:tabular-nums}
.charts{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.chart{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
.chart h3{margin:0 0 4px}
svg text{font:11px system-ui,sans-serif;fill:#333}
.sheet{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;width:140px;background:#fff;border:1px solid #ddd;border-radius:4px;padding:5px}
figure img{display:block;margin:0 auto;max-width:128px;max-height:128px}
figcaption{font-size:11px;word-wrap:break-word;margin-top:3px}
figcaption .p{color:#555}
.missing{width:128px;height:64px;display:flex;align-items:center;justify-content:center;color:#999;background:#eee}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:12px;max-height:12em;overflow:auto}
code{background:#eee;padding:1px 4px;border-radius:3px}
.grid img{max-width:100%;background:#fff;border:1px solid #ddd}
"""


def render(report: dict, checkpoint: Checkpoint, out: Path) -> str:
    """The whole page, as one string."""
    run, totals = report["run"], report["totals"]
    shown = report.get("reported_run")  # the latest run that made images
    batches = batch_points(checkpoint.image_rows(shown)) if shown is not None else []
    thumbs = list(islice((meta for meta in checkpoint.done_metadata() if meta), MAX_THUMBS))
    failed = checkpoint.failed_jobs()
    title = f"sdbatch report: {run.get('model', '?')}, {run.get('started_at', 'no run yet')}"
    body = [
        "<h1>sdbatch report</h1>",
        f"<p class=sub>{_e(str(out))} &middot; model <b>{_e(run.get('model', '-'))}</b> &middot; "
        f"started {_e(run.get('started_at', '-'))}</p>",
        _summary(report),
        _ranks(report.get("ranks", [])),
        _runs(report),
        _charts(report, batches),
        _clip_scores(report.get("clip_score")),
        _grids(out),
        _contact_sheet(thumbs, totals["done"], out),
        _failures(failed, run, out),
        f"<p class=note>Written by sdbatch {_e(run.get('sdbatch', ''))} from checkpoint.sqlite; "
        "report.json holds the same numbers, report.csv one row per image.</p>",
    ]
    return (f"<!doctype html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n"
            f"<meta name=viewport content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            + "\n".join(part for part in body if part) + "\n</main>\n</body>\n</html>\n")


def batch_points(image_rows: list[tuple]) -> list[dict]:
    """Per-batch latency of one run, in generation order, from the checkpoint's per-image rows.

    An image's `seconds` is its share of its batch's wall time, so a batch's seconds are the
    sum over its images. The x axis is cumulative generation time rather than `updated_at`:
    the writer holds one batch, so commit times lag a batch behind and bunch up.
    """
    by_batch: dict[int, dict] = {}
    for _id, _k, group, batch, seconds, status in image_rows:
        if batch is None or seconds is None:
            continue  # invalid rows, or images that never reached a batch
        point = by_batch.setdefault(batch, {"batch": batch, "group": group or "", "seconds": 0.0,
                                            "images": 0, "failed": 0})
        point["seconds"] += seconds
        point["images"] += 1
        point["failed"] += status == "failed"
    points, clock = [], 0.0
    for batch in sorted(by_batch):
        point = by_batch[batch]
        clock += point["seconds"]
        points.append({**point, "end_s": clock})
    return points


# --- sections -------------------------------------------------------------------------

def _runs(report: dict) -> str:
    """Every run of the folder, when there was more than one; which one the figures above are from."""
    runs = report.get("runs", [])
    if len(runs) < 2:
        return ""
    rows = "".join(f"<tr><td>{_e(r['run'])}{' (shown)' if r['run'] == report.get('reported_run') else ''}</td>"
                   f"<td>{_e(r['started_at'] or '-')}</td><td>{_e(r['model'] or '-')}</td><td>{_e(r['device'] or '-')}</td>"
                   f"<td>{_e(r['generated'] if r['generated'] is not None else '-')}</td>"
                   f"<td>{_e(r['skipped_from_checkpoint'] if r['skipped_from_checkpoint'] is not None else '-')}</td>"
                   f"<td>{_num(r['generate_s'])}</td><td>{_num(r['images_per_s'])}</td>"
                   f"<td>{'yes' if r['finished'] else 'no'}</td></tr>" for r in runs)
    return (f"<h2>Runs ({len(runs)})</h2><p class=sub>The figures above are those of run {_e(report.get('reported_run'))}, "
            "the latest that made images.</p><table><tr><th>run</th><th>started</th><th>model</th><th>device</th>"
            f"<th>made</th><th>skipped</th><th>generate s</th><th>images/s</th><th>finished</th></tr>{rows}</table>")


def _ranks(ranks: list[dict]) -> str:
    """Runs under torchrun / accelerate launch: one row per process."""
    if not ranks:
        return ""
    rows = "".join(f"<tr><td>{_e(r['rank'])}</td><td>{_e(r['host'])}</td><td>{_e(r['device'])}</td>"
                   f"<td>{_e(r['images'])}</td><td>{_num(r['seconds'])}</td><td>{_num(r['images_per_s'])}</td></tr>"
                   for r in ranks)
    total = sum(r["images_per_s"] for r in ranks)
    return (f"<h2>Processes ({len(ranks)})</h2><table><tr><th>rank</th><th>host</th><th>device</th><th>images</th>"
            f"<th>generate s</th><th>images/s</th></tr>{rows}<tr><th colspan=5>all ranks together</th>"
            f"<th>{_num(total)}</th></tr></table>")


def _summary(report: dict) -> str:
    run, totals = report["run"], report["totals"]
    on_cpu = not str(run.get("device", "")).startswith("cuda")
    vram = "n/a on CPU" if on_cpu and totals.get("peak_vram_bytes") is None else _gb(totals.get("peak_vram_bytes"))
    cards = [
        (totals["done"], f"images done of {totals['images']}", False),
        (totals["failed"], "failed", totals["failed"] > 0),
        (totals["skipped_from_checkpoint"], "skipped (from checkpoint)", False),
        (totals.get("pending", 0), "pending", False),
        (_duration(totals.get("wall_s")), "wall time (whole run)", False),
        (_num(totals.get("end_to_end_images_per_s")), "images/s (end to end)", False),
        (_duration(totals.get("generate_s")), "generation time (no load, no warm-up)", False),
        (_num(totals.get("images_per_s")), "images/s (generation)", False),
        (vram, "peak VRAM", False),
        (_gb(totals.get("peak_rss_bytes")), "peak RSS", False),
    ]
    parts = ["<section id=summary>", "<h2>Summary</h2>"]
    if totals.get("interrupted"):
        parts.append("<p class=banner><b>The run was interrupted.</b> Run the same command again to finish it.</p>")
    parts.append("<div class=cards>" + "".join(
        f"<div class=\"card{' bad' if bad else ''}\"><b>{_e(value)}</b><span>{_e(label)}</span></div>"
        for value, label, bad in cards) + "</div>")
    device = run.get("gpu_name") or run.get("device") or "-"
    if run.get("gpu_total_bytes"):
        device += f" ({_gb(run['gpu_total_bytes'])})"
    facts = [("model", run.get("model")), ("device", device), ("dtype", run.get("dtype")),
             ("batch size", run.get("batch_size")), ("versions", f"torch {run.get('torch', '-')}, diffusers "
              f"{run.get('diffusers', '-')}, sdbatch {run.get('sdbatch', '-')}"),
             ("manifest", run.get("manifest")), ("host", run.get("host"))]
    parts.append("<h3>Run</h3><table>" + "".join(
        f"<tr><th>{_e(k)}</th><td>{_e(v if v is not None else '-')}</td></tr>" for k, v in facts) + "</table>")
    parts.append("</section>")
    return "\n".join(parts)


def _charts(report: dict, batches: list[dict]) -> str:
    groups, run = report["groups"], report["run"]
    parts = ["<section id=charts>", "<h2>Speed and memory</h2>"]
    if not groups:
        parts += ["<p class=note>No batch ran in the latest run: nothing to chart.</p>", "</section>"]
        return "\n".join(parts)
    labels = _group_labels(groups)
    throughput = _bar_chart(labels, [("images/s", [g.get("images_per_s") for g in groups], COLORS[0])], _num)
    per_image = _bar_chart(labels, [("p50", [g.get("s_per_image_p50") for g in groups], COLORS[0]),
                                    ("p95", [g.get("s_per_image_p95") for g in groups], COLORS[1])],
                           lambda v: f"{_num(v, 3)} s")
    parts.append("<div class=charts>")
    parts.append(f"<div class=chart><h3>Throughput per group (images/s, generation)</h3>{throughput}</div>")
    parts.append(f"<div class=chart><h3>s/image p50 and p95 (batch s ÷ batch size)</h3>{per_image}</div>")
    parts.append(f"<div class=chart><h3>Seconds per batch over the run</h3>{_batch_chart(batches)}</div>")
    vram = [g.get("peak_vram_bytes") for g in groups]
    if all(v is None for v in vram):
        where = "on CPU" if not str(run.get("device", "")).startswith("cuda") else "for this run"
        parts.append(f"<div class=chart><h3>Peak VRAM per group</h3><p class=note>Not measured {where}: "
                     "peak VRAM is <code>torch.cuda.max_memory_allocated</code>, a CUDA figure.</p></div>")
    else:
        total = run.get("gpu_total_bytes")
        chart = _bar_chart(labels, [("peak VRAM", vram, COLORS[2])], _gb,
                           limit=(total, f"device total {_gb(total)}") if total else None)
        parts.append(f"<div class=chart><h3>Peak VRAM per group</h3>{chart}</div>")
    parts.append("</div>")
    parts.append(_group_table(groups, labels))
    parts.append("</section>")
    return "\n".join(parts)


def _clip_scores(clip: dict | None) -> str:
    """One histogram per group of the CLIP scores (`sdbatch score`, `run --clip-score`), when there are any."""
    if not clip:
        return ""
    width = clip["bin_width"]
    bins = [f"{low}–{low + width}" for low in range(0, 100, width)]
    parts = ["<section id=clip-scores>", f"<h2>CLIP scores ({_e(clip['model'])})</h2>",
             f"<p class=note>{clip['images']} images scored, mean {_num(clip['mean'])}; {clip['unscored']} not scored "
             "(no text prompt, or not scored yet: <code>sdbatch score</code>). clip_score = 100 · max(cos(image, "
             "prompt), 0); each bar counts the images in a bin of the score.</p>", "<div class=charts>"]
    for g in clip["groups"]:
        chart = _bar_chart(bins, [("images", g["histogram"], COLORS[4])], lambda v: f"{v:g}")
        parts.append(f"<div class=chart><h3>{_e(g['group'])}: {g['images']} images, mean {_num(g['mean'])}</h3>"
                     f"{chart}</div>")
    parts += ["</div>", "</section>"]
    return "\n".join(parts)


def _group_table(groups: list[dict], labels: list[str]) -> str:
    head = ("group", "images", "failed", "batches", "batch size", "load s", "warm-up s", "generate s",
            "images/s (generation)", "s/image p50 (batch s ÷ batch size)", "s/image p95 (batch s ÷ batch size)",
            "peak VRAM", "VRAM estimate")
    rows = []
    for label, g in zip(labels, groups):
        cells = [g.get("images"), g.get("failed", 0), g.get("batches"), g.get("working_batch_size"),
                 _num(g.get("load_s")), _num(g.get("warmup_s")), _num(g.get("wall_s")), _num(g.get("images_per_s")),
                 _num(g.get("s_per_image_p50"), 3), _num(g.get("s_per_image_p95"), 3), _gb(g.get("peak_vram_bytes")),
                 _gb(g.get("vram_estimate_bytes"))]
        rows.append(f"<tr><td>{_e(label)}</td>" + "".join(f"<td class=n>{_e(c if c is not None else '-')}</td>"
                                                           for c in cells) + "</tr>")
    return ("<h3>Groups</h3><table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"
            + "".join(rows) + "</table>" + f"<p class=note>{_e(PER_IMAGE_NOTE)}</p>")


def _contact_sheet(meta_lines: list[str], done: int, out: Path) -> str:
    parts = ["<section id=images>", "<h2>Images</h2>"]
    if not meta_lines:
        parts += ["<p class=note>No image is done yet.</p>", "</section>"]
        return "\n".join(parts)
    shown = len(meta_lines)
    note = f"showing {shown} of {done} (the first in manifest order)" if done > shown else f"all {shown}"
    parts.append(f"<p class=note>{note}; hover a thumbnail for its full prompt. Files are in "
                 f"<code>{_e(str(out / 'images'))}</code>.</p>")
    sections: dict[str, list[str]] = {}
    models = {json.loads(line).get("model") for line in meta_lines}
    for line in meta_lines:
        meta = json.loads(line)
        heading = f"{meta.get('mode', '?')} · {meta.get('width')}×{meta.get('height')}"
        if len(models) > 1:
            heading = f"{meta.get('model')} · {heading}"
        sections.setdefault(heading, []).append(_figure(meta, out / "images"))
    for heading, figures in sections.items():
        parts.append(f"<h3>{_e(heading)} ({len(figures)})</h3>")
        parts.append("<div class=sheet>" + "".join(figures) + "</div>")
    parts.append("</section>")
    return "\n".join(parts)


def _figure(meta: dict, images: Path) -> str:
    name = str(meta.get("file_name", ""))
    stem = name.rsplit(".", 1)[0]
    prompt = meta.get("prompt") or ""
    if not prompt and meta.get("prompt_image"):
        prompt = f"[image prompt: {Path(str(meta['prompt_image'])).name}]"
    tooltip = "\n".join(filter(None, [
        stem, prompt, f"Negative prompt: {meta['negative_prompt']}" if meta.get("negative_prompt") else "",
        f"seed {meta.get('seed')}, steps {meta.get('steps')}, cfg {meta.get('cfg')}, {meta.get('scheduler')}"]))
    uri = thumbnail_uri(images / name) if name else None
    picture = (f"<img src=\"{uri}\" alt=\"{_e(stem)}\" title=\"{_e(tooltip)}\">" if uri
               else f"<div class=missing title=\"{_e(tooltip)}\">file missing</div>")
    short = prompt if len(prompt) <= 90 else prompt[:87] + "..."
    return (f"<figure>{picture}<figcaption><b>{_e(stem)}</b> &middot; seed {_e(meta.get('seed'))}"
            f"<br><span class=p>{_e(short)}</span></figcaption></figure>")


def _grids(out: Path) -> str:
    """The sweeps' grids (OUT/grids/, written by grids.py), embedded and linked."""
    files = sorted((out / "grids").glob("*.png")) if (out / "grids").is_dir() else []
    if not files:
        return ""
    parts = ["<section id=grids>", f"<h2>Grids ({len(files)})</h2>",
             f"<p class=note>One per swept row (<code>sweep</code> column): X across, Y down, a Z axis side by "
             f"side; files in <code>{_e(str(out / 'grids'))}</code>"
             + (f"; showing the first {MAX_GRIDS}" if len(files) > MAX_GRIDS else "") + ".</p>"]
    for path in files[:MAX_GRIDS]:
        uri = _grid_uri(path)
        picture = f"<img src=\"{uri}\" alt=\"{_e(path.stem)}\">" if uri else "<div class=missing>unreadable</div>"
        parts.append(f"<h3><a href=\"grids/{_e(path.name)}\">{_e(path.stem)}</a></h3><div class=grid>{picture}</div>")
    parts.append("</section>")
    return "\n".join(parts)


def _grid_uri(path: Path) -> str | None:
    """A grid as a PNG data URI (its labels stay sharp), scaled to GRID_PX at most."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            picture = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    picture.thumbnail((GRID_PX, GRID_PX))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def thumbnail_uri(path: Path) -> str | None:
    """A small JPEG data URI, or None when the file is gone or does not decode."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.draft("RGB", (THUMB_PX, THUMB_PX))  # JPEG sources decode at a reduced size
            small = image.convert("RGB")
            small.thumbnail((THUMB_PX, THUMB_PX), reducing_gap=2.0)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _failures(failed: list[tuple], run: dict, out: Path) -> str:
    if not failed:
        return ""
    jobs = {}
    for job_id, _row, error, attempts in failed:
        jobs.setdefault(job_id, (error, attempts))  # one line per job, as in failed.jsonl
    parts = ["<section id=failures>", f"<h2>Failures ({_plural(len(failed), 'image')}, {_plural(len(jobs), 'job')})</h2>"]
    rerun = ["sdbatch", "run", run.get("manifest") or "MANIFEST", "--model", run.get("model") or "MODEL",
             "--out", str(out), "--retry-failed"]
    parts.append(
        "<p>Fix the cause, then re-run the same command with <code>--retry-failed</code>, e.g. "
        f"<code>{_e(shlex.join(rerun))}</code> (plus the run's other options), or run "
        f"<code>{_e(str(out / 'failed.jsonl'))}</code> as a manifest: it holds the failed rows as they were read.</p>")
    rows = [f"<tr><td>{_e(job_id)}</td><td class=n>{_e(attempts)}</td><td><pre>{_e(_clip(error or '', 2000))}</pre></td></tr>"
            for job_id, (error, attempts) in islice(jobs.items(), MAX_FAILURES)]
    if len(jobs) > MAX_FAILURES:
        parts.append(f"<p class=note>showing {MAX_FAILURES} of {len(jobs)} failed jobs; all are in failed.jsonl.</p>")
    parts.append("<table><tr><th>id</th><th>attempts</th><th>error</th></tr>" + "".join(rows) + "</table>")
    parts.append("</section>")
    return "\n".join(parts)


# --- SVG charts -----------------------------------------------------------------------

def _bar_chart(labels: list[str], series: list[tuple[str, list, str]], fmt, limit: tuple | None = None) -> str:
    """Horizontal bars, one row per label and one bar per series; `limit` draws a dashed reference line."""
    label_w, plot_w, text_w, bar_h, gap = 170, 250, 80, 13, 8
    values = [v for _name, vs, _c in series for v in vs if v is not None]
    top = max(values + ([limit[0]] if limit else []) + [0]) or 1
    legend_h = 18 if len(series) > 1 else 0
    row_h = bar_h * len(series) + gap
    height = legend_h + row_h * len(labels) + 6 + (14 if limit else 0)
    width = label_w + plot_w + text_w
    out = [f"<svg width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" role=img>"]
    if legend_h:
        x = label_w
        for name, _vs, color in series:
            out.append(f"<rect x=\"{x}\" y=\"3\" width=\"10\" height=\"10\" fill=\"{color}\"/>"
                       f"<text x=\"{x + 14}\" y=\"12\">{_e(name)}</text>")
            x += 60
    for i, label in enumerate(labels):
        y0 = legend_h + i * row_h
        out.append(f"<text x=\"{label_w - 6}\" y=\"{y0 + row_h / 2 + 2:.1f}\" text-anchor=end>"
                   f"{_e(_clip(label, 28))}<title>{_e(label)}</title></text>")
        for j, (name, vs, color) in enumerate(series):
            v, y = vs[i], y0 + j * bar_h
            w = 0 if v is None else max(1.0, v / top * plot_w)
            if v is not None:
                out.append(f"<rect x=\"{label_w}\" y=\"{y}\" width=\"{w:.1f}\" height=\"{bar_h - 2}\" fill=\"{color}\">"
                           f"<title>{_e(label)}: {_e(name)} {_e(fmt(v))}</title></rect>")
            out.append(f"<text x=\"{label_w + w + 4:.1f}\" y=\"{y + bar_h - 3}\">{_e(fmt(v) if v is not None else 'n/a')}</text>")
    bottom = legend_h + row_h * len(labels)
    out.append(f"<line x1=\"{label_w}\" y1=\"{legend_h}\" x2=\"{label_w}\" y2=\"{bottom}\" stroke=\"#999\"/>")
    if limit:
        x = label_w + limit[0] / top * plot_w
        out.append(f"<line x1=\"{x:.1f}\" y1=\"{legend_h}\" x2=\"{x:.1f}\" y2=\"{bottom}\" stroke=\"#c0392b\" "
                   f"stroke-dasharray=\"4 3\"/><text x=\"{x:.1f}\" y=\"{bottom + 14}\" text-anchor=end "
                   f"fill=\"#c0392b\">{_e(limit[1])}</text>")
    out.append("</svg>")
    return "".join(out)


def _batch_chart(points: list[dict]) -> str:
    """Seconds per batch against cumulative generation time, one colour per group."""
    if not points:
        return "<p class=note>No batch timings recorded in the latest run.</p>"
    note = ""
    if len(points) > MAX_POINTS:
        stride = math.ceil(len(points) / MAX_POINTS)
        note = f"<p class=note>{len(points)} batches: each point is the slowest of {stride} in a row.</p>"
        points = [max(points[i:i + stride], key=lambda p: p["seconds"]) for i in range(0, len(points), stride)]
    left, right, top_pad, bottom, plot_w, plot_h = 46, 12, 22, 34, 480, 170
    x_ticks = _ticks(points[-1]["end_s"])
    y_ticks = _ticks(max(p["seconds"] for p in points))
    x_max, y_max = x_ticks[-1], y_ticks[-1]
    width, height = left + plot_w + right, top_pad + plot_h + bottom
    sx = lambda v: left + v / x_max * plot_w  # noqa: E731
    sy = lambda v: top_pad + plot_h - v / y_max * plot_h  # noqa: E731
    out = [f"<svg width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" role=img>"]
    for t in y_ticks:
        out.append(f"<line x1=\"{left}\" y1=\"{sy(t):.1f}\" x2=\"{left + plot_w}\" y2=\"{sy(t):.1f}\" stroke=\"#eee\"/>"
                   f"<text x=\"{left - 4}\" y=\"{sy(t) + 4:.1f}\" text-anchor=end>{_tick(t)}</text>")
    for t in x_ticks:
        out.append(f"<text x=\"{sx(t):.1f}\" y=\"{top_pad + plot_h + 14}\" text-anchor=middle>{_tick(t)}</text>")
    out.append(f"<line x1=\"{left}\" y1=\"{top_pad + plot_h}\" x2=\"{left + plot_w}\" y2=\"{top_pad + plot_h}\" stroke=\"#999\"/>"
               f"<line x1=\"{left}\" y1=\"{top_pad}\" x2=\"{left}\" y2=\"{top_pad + plot_h}\" stroke=\"#999\"/>"
               f"<text x=\"{left + plot_w / 2}\" y=\"{height - 4}\" text-anchor=middle>generation time (s), "
               f"batches in run order</text><text x=\"4\" y=\"12\">s per batch</text>")
    groups = list(dict.fromkeys(p["group"] for p in points))
    color = {g: COLORS[i % len(COLORS)] for i, g in enumerate(groups)}
    path = " ".join(f"{sx(p['end_s']):.1f},{sy(p['seconds']):.1f}" for p in points)
    out.append(f"<polyline points=\"{path}\" fill=none stroke=\"#bbb\"/>")
    for p in points:
        fill = "#fff" if p["failed"] else color[p["group"]]
        out.append(f"<circle cx=\"{sx(p['end_s']):.1f}\" cy=\"{sy(p['seconds']):.1f}\" r=\"4\" fill=\"{fill}\" "
                   f"stroke=\"{color[p['group']]}\" stroke-width=\"1.5\"><title>batch {p['batch']} ({_e(p['group'])}): "
                   f"{p['images']} images in {p['seconds']:.2f} s, ended at {p['end_s']:.1f} s"
                   f"{', ' + str(p['failed']) + ' failed' if p['failed'] else ''}</title></circle>")
    x = left + 90
    for g in groups:
        out.append(f"<circle cx=\"{x}\" cy=\"8\" r=\"4\" fill=\"{color[g]}\"/><text x=\"{x + 7}\" y=\"12\">{_e(_clip(g, 24))}</text>")
        x += 16 + 6.5 * len(_clip(g, 24))
    out.append("</svg>")
    return "".join(out) + note


def _ticks(vmax: float, n: int = 4) -> list[float]:
    """Round tick values from 0 to at least vmax (1-2-5 steps)."""
    if not vmax or vmax <= 0 or not math.isfinite(vmax):
        vmax = 1.0
    raw = vmax / n
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(math.ceil(vmax / step - 1e-9) + 1)]


# --- formatting -----------------------------------------------------------------------

def _group_labels(groups: list[dict]) -> list[str]:
    several_models = len({g.get("model") for g in groups}) > 1
    labels = []
    for g in groups:
        label = f"{g.get('mode')} {g.get('width')}x{g.get('height')}"
        if g.get("lora"):
            label += f" +{Path(str(g['lora'])).name}"
        if several_models:
            label = f"{g.get('model')} ({g.get('family', 'sd')}) {label}"
        labels.append(label)
    return labels


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _tick(v: float) -> str:
    return f"{v:g}" if v >= 1 or v == 0 else f"{v:.2g}"


def _num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _gb(value) -> str:
    if value is None:
        return "-"
    return f"{value / 2**30:.2f} GB" if value >= 2**28 else f"{value / 2**20:.0f} MB"


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} m" if hours else f"{m} m {s:02d} s"
