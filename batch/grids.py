"""Sweep grids: one labelled picture per swept row, OUT/grids/<id>.png, laid out as A1111's X/Y/Z plot.

Built from the checkpoint alone, so `report OUT` rebuilds them too. Each image of a swept row carries
a `grid` column ({"id", "axes", "shape", "cell"}, written by expand.py); the first image (k = 0) of
each cell goes in its place: X across (labels on top), Y down (labels on the left), and a Z axis
gives one such grid per value, side by side, each titled. A cell whose image failed is drawn empty
and labelled "failed". A grid is written (atomically) once every cell is done or failed, and again
only when one of its cells changes: the PNG's `sdbatch-grid` text holds its layout and a signature.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .expand import GRID_COLUMN
from .manifest import file_stem
from .writer import read_written, write_atomic

log = logging.getLogger(__name__)
GRID_DIR = "grids"
INFO_KEY = "sdbatch-grid"  # PNG text chunk: the layout (cell boxes, margins) and the signature
PAD = 6  # pixels around a label
MAX_LABEL = 48  # characters of an axis value shown
BACKGROUND, INK, EMPTY, FAILED_INK = (255, 255, 255), (20, 20, 20), (232, 232, 232), (170, 40, 40)


@dataclass(frozen=True)
class Cell:
    """One image's place in a grid."""

    id: str
    index: tuple[int, ...]  # (x, y, z) positions, as many as the grid has axes
    status: str  # done | failed | pending
    file: str | None
    key: str
    labels: tuple[str, ...]  # "cfg: 4", one per axis
    size: tuple[int, int] | None  # the row's width and height, where known


@dataclass(frozen=True)
class Grid:
    id: str
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    cells: dict[tuple[int, ...], Cell]

    @property
    def complete(self) -> bool:
        """Every cell is there and decided (done or failed)."""
        count = 1
        for n in self.shape:
            count *= n
        return len(self.cells) == count and all(c.status in ("done", "failed") for c in self.cells.values())

    @property
    def signature(self) -> str:
        cells = [(c.id, list(c.index), c.status, c.file, c.key, list(c.labels)) for _, c in sorted(self.cells.items())]
        return hashlib.sha256(json.dumps([list(self.axes), list(self.shape), cells]).encode()).hexdigest()[:32]


def collect_grids(checkpoint) -> dict[str, Grid]:
    """Every grid the checkpoint's images belong to, by grid id, in manifest order."""
    grids: dict[str, Grid] = {}
    rows = checkpoint.db.execute(
        "SELECT id, status, file, key, row, meta FROM images WHERE k = 0 AND (row LIKE ? OR meta LIKE ?) "
        "ORDER BY ord, id", (f'%"{GRID_COLUMN}"%', f'%"{GRID_COLUMN}"%'))
    for image_id, status, file, key, row, meta in rows:
        record = _record(row) or _record(meta)
        spec = _spec(record.get(GRID_COLUMN)) if record else None
        if spec is None:
            continue
        grid_id, axes, shape, index = spec
        grid = grids.setdefault(grid_id, Grid(grid_id, axes, shape, {}))
        if (grid.axes, grid.shape) != (axes, shape):
            continue  # a cell of another sweep under the same id: the first one seen wins
        labels = tuple(_label(axis, record.get(axis)) for axis in axes)
        meta_record = _record(meta) or {}
        size = _size(meta_record) or _size(record)
        grid.cells[index] = Cell(image_id, index, status, file, key or "", labels, size)
    return grids


def write_grids(out: Path, checkpoint) -> int:
    """OUT/grids/<id>.png for every complete grid whose cells changed since it was drawn; how many were written."""
    grids = collect_grids(checkpoint)
    if not grids:
        return 0
    folder = Path(out) / GRID_DIR
    folder.mkdir(exist_ok=True)
    written = 0
    for grid in grids.values():
        if not grid.complete:
            continue  # an interrupted run: the rerun that finishes it draws it
        path = folder / f"{file_stem(grid.id)}.png"
        signature = grid.signature
        if _signature_of(path) == signature:
            continue
        picture, layout = draw_grid(grid, Path(out) / "images")
        layout["signature"] = signature
        _save(picture, layout, path)
        written += 1
    if written:
        log.info("wrote %d sweep grid(s) to %s", written, folder)
    return written


def draw_grid(grid: Grid, images: Path):
    """The grid picture and its layout (margins, cell size, each cell's box), for the PNG's text chunk."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()  # PIL's own font: no font file to ship or find
    pictures = {index: read_written(images / cell.file) if cell.status == "done" and cell.file else None
                for index, cell in grid.cells.items()}
    sizes = [p.size for p in pictures.values() if p is not None] or [c.size for c in grid.cells.values() if c.size]
    cell_w, cell_h = (max(s[0] for s in sizes), max(s[1] for s in sizes)) if sizes else (64, 64)
    nx, ny, nz = (list(grid.shape) + [1, 1])[:3]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = _text_size(measure, "Ag", font)[1] + 2 * PAD
    labels = {axis: {} for axis in range(len(grid.axes))}
    for index, cell in grid.cells.items():
        for axis, text in enumerate(cell.labels):
            labels[axis].setdefault(index[axis], text)
    left = max((_text_size(measure, t, font)[0] for t in labels.get(1, {}).values()), default=-2 * PAD) + 2 * PAD
    top = line_h * (2 if nz > 1 else 1)
    gap = 2 * PAD if nz > 1 else 0
    sub_w, sub_h = left + nx * cell_w, top + ny * cell_h
    canvas = Image.new("RGB", (nz * sub_w + (nz - 1) * gap, sub_h), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    boxes = []
    for z in range(nz):
        x0 = z * (sub_w + gap)
        if nz > 1:
            _centred(draw, labels[2].get(z, ""), (x0 + left, 0, x0 + sub_w, line_h), font, INK)
        for x in range(nx):
            _centred(draw, labels[0].get(x, ""), (x0 + left + x * cell_w, top - line_h, x0 + left + (x + 1) * cell_w, top),
                     font, INK)
        for y in range(ny):
            if ny > 1 or len(grid.axes) > 1:
                _centred(draw, labels[1].get(y, ""), (x0, top + y * cell_h, x0 + left, top + (y + 1) * cell_h), font, INK)
        for index, cell in grid.cells.items():
            if (index + (0, 0))[2] != z:
                continue
            x, y = index[0], (index + (0,))[1]
            box = (x0 + left + x * cell_w, top + y * cell_h, x0 + left + (x + 1) * cell_w, top + (y + 1) * cell_h)
            picture = pictures[index]
            if picture is not None:
                canvas.paste(picture, (box[0] + (cell_w - picture.width) // 2, box[1] + (cell_h - picture.height) // 2))
            else:
                draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=EMPTY)
                _centred(draw, "failed" if cell.status == "failed" else "missing", box, font, FAILED_INK)
            boxes.append({"id": cell.id, "cell": list(index), "box": list(box),
                          "status": cell.status if picture is not None or cell.status == "failed" else "missing"})
    layout = {"id": grid.id, "axes": list(grid.axes), "shape": list(grid.shape), "cell_size": [cell_w, cell_h],
              "margin": {"left": left, "top": top, "gap": gap}, "cells": boxes}
    return canvas, layout


# --- helpers ---------------------------------------------------------------------------------------

def _record(text) -> dict | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _spec(value):
    """(id, axes, shape, cell) from a `grid` cell, or None if it is not one expand.py wrote."""
    if isinstance(value, str):
        value = _record(value)
    if not isinstance(value, dict):
        return None
    grid_id, axes, shape, cell = value.get("id"), value.get("axes"), value.get("shape"), value.get("cell")
    if not (isinstance(grid_id, str) and isinstance(axes, list) and isinstance(shape, list) and isinstance(cell, list)):
        return None
    if not (1 <= len(axes) <= 3 and len(axes) == len(shape) == len(cell) and all(isinstance(a, str) for a in axes)):
        return None
    if not all(type(n) is int and type(i) is int and 0 <= i < n for n, i in zip(shape, cell)):
        return None
    return grid_id, tuple(axes), tuple(shape), tuple(cell)


def _label(axis: str, value) -> str:
    text = "default" if value is None else value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = f"{axis}: {text}"
    return text if len(text) <= MAX_LABEL else text[: MAX_LABEL - 1] + "…"


def _size(record: dict) -> tuple[int, int] | None:
    try:
        width, height = int(record["width"]), int(record["height"])
    except (KeyError, TypeError, ValueError):
        return None
    return (width, height) if 0 < width <= 8192 and 0 < height <= 8192 else None


def _text_size(draw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _centred(draw, text: str, box, font, fill) -> None:
    """`text` centred in box, cut with an ellipsis where it is wider than the box."""
    width = box[2] - box[0] - 2
    while text and _text_size(draw, text, font)[0] > width and len(text) > 1:
        text = text[:-2] + "…"
    w, h = _text_size(draw, text, font)
    left, top, _, _ = draw.textbbox((0, 0), text, font=font)
    draw.text((box[0] + (box[2] - box[0] - w) // 2 - left, box[1] + (box[3] - box[1] - h) // 2 - top), text,
              font=font, fill=fill)


def _signature_of(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return json.loads(image.text.get(INFO_KEY, "{}")).get("signature")
    except (OSError, ValueError, AttributeError):
        return None


def _save(picture, layout: dict, path: Path) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(INFO_KEY, json.dumps(layout, ensure_ascii=False))
    write_atomic(path, lambda f: picture.save(f, "PNG", pnginfo=info))


def read_layout(path: Path) -> dict:
    """The layout a grid PNG carries (margins, cell size, each cell's box and status)."""
    from PIL import Image

    with Image.open(path) as image:
        return json.loads(image.text[INFO_KEY])
