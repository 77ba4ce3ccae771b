"""Validation images during training, made by sdbatch's own runner, and one page showing them across steps.

Each validation is an ordinary sdbatch run (DIR/validation/step-N/: images, metadata,
report) of a small manifest: every prompt, with the adapter just exported in its `lora`
column, the same seeds at every step. Step 0 is the base model without the adapter.
"""
from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..interrupt import Stop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationSpec:
    """What every validation run draws; the same at every step, so the images are comparable."""

    prompts: tuple[str, ...]
    images: int  # per prompt
    width: int
    height: int
    seed: int
    model: str
    device: str


def validate(spec: ValidationSpec, out: Path, step: int, adapter: Path | None, stop: Stop | None = None) -> Path:
    """Run the validation manifest for one step (adapter None: the base model); returns its output folder.

    A single-process run on this process's device, whatever launch the training is part of, and
    stopped by the training's own `stop` (a Ctrl-C during validation stops the training too).
    """
    from ..config import Defaults, RunConfig
    from ..context import RunContext
    from ..runner import run

    folder = out / "validation" / f"step-{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for number, prompt in enumerate(spec.prompts):
        row = {"id": f"prompt{number}", "prompt": prompt, "num_images": spec.images, "seed": spec.seed + 1000 * number,
               "width": spec.width, "height": spec.height, "validation_step": step}
        if adapter is not None:
            row["lora"] = str(Path(adapter).resolve())
        rows.append(row)
    manifest = folder / "validation.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    result = run(RunConfig(manifest=manifest, out=folder, model=spec.model, device=spec.device, quiet=True,
                           defaults=Defaults(width=spec.width, height=spec.height), writer_threads=1),
                 RunContext.single(spec.device, stop))
    if result.interrupted:
        log.warning("validation at step %d interrupted: %d of %d images made", step, result.counts.done,
                    result.counts.total)
    elif result.exit_code != 0:
        log.warning("validation at step %d: %d of %d images failed (see %s)", step, result.counts.failed,
                    result.counts.total, folder / "failed.jsonl")
    return folder


def write_page(out: Path, spec: ValidationSpec) -> Path:
    """DIR/validation.html: one row per prompt and image, one column per validated step."""
    from ..html_report import CSS, thumbnail_uri

    steps = sorted((int(p.name.split("-")[1]), p) for p in (out / "validation").glob("step-*") if p.is_dir())
    head = "".join(f"<th>{'base' if step == 0 else f'step {step}'}</th>" for step, _ in steps)
    rows = []
    for number, prompt in enumerate(spec.prompts):
        for k in range(spec.images):
            cells = []
            for _, folder in steps:
                stem = f"prompt{number}" if spec.images == 1 else f"prompt{number}-{k}"
                found = sorted((folder / "images").glob(f"{stem}.*"))
                uri = thumbnail_uri(found[0]) if found else None
                cells.append(f"<td><img src=\"{uri}\" alt=\"{html.escape(stem)}\"></td>" if uri else "<td>-</td>")
            label = html.escape(prompt) + (f" <span class=sub>#{k}</span>" if spec.images > 1 else "")
            rows.append(f"<tr><th style='text-align:left'>{label}</th>{''.join(cells)}</tr>")
    page = (f"<!doctype html><meta charset=utf-8><title>LoRA validation: {html.escape(out.name)}</title>"
            f"<style>{CSS} td img{{display:block}}</style><main><h1>LoRA validation: {html.escape(out.name)}</h1>"
            f"<p class=sub>{len(spec.prompts)} prompt(s) x {spec.images} seed(s), {spec.width}x{spec.height}, "
            f"model {html.escape(spec.model)}; base = without the adapter. Images in validation/step-N/images.</p>"
            f"<table><tr><th>prompt</th>{head}</tr>{''.join(rows)}</table></main>\n")
    path = out / "validation.html"
    path.write_text(page, encoding="utf-8")
    return path
