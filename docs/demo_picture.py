"""Draw docs/demo.png (the README's picture) from `make demo`'s output folder.

    make demo && python docs/demo_picture.py outputs/demo

One tile per image of manifests/demo.jsonl, in manifest order, with its prompt (or its image
prompt) and, for img2img rows, the strength underneath.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

TILE, GAP, TEXT = 128, 8, 34


def caption(meta: dict) -> str:
    if meta.get("prompt_image"):
        return f"like {Path(meta['prompt_image']).stem}\n({meta.get('image_prompt_method')})"
    if meta.get("init_image"):
        return f"{meta['prompt']}\nimg2img {meta['strength']}"
    return meta["prompt"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the demo's output folder (outputs/demo)")
    parser.add_argument("--save", type=Path, default=Path(__file__).with_name("demo.png"), help="[docs/demo.png]")
    args = parser.parse_args(argv)
    metas = [json.loads(line) for line in (args.out / "images" / "metadata.jsonl").read_text().splitlines() if line]
    sheet = Image.new("RGB", (len(metas) * (TILE + GAP) + GAP, TILE + GAP + TEXT), "white")
    pen, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for i, meta in enumerate(metas):
        x = GAP + i * (TILE + GAP)
        with Image.open(args.out / "images" / meta["file_name"]) as image:
            sheet.paste(image.convert("RGB").resize((TILE, TILE)), (x, GAP))
        pen.multiline_text((x, GAP + TILE + 3), caption(meta), fill="black", font=font, spacing=2)
    sheet.save(args.save)
    print(f"{args.save}: {len(metas)} images")


if __name__ == "__main__":
    main()
