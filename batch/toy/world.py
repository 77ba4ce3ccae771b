"""The drawn world: one coloured, upright shape on a plain light background, captioned "a <colour> <shape>"."""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

# Saturated and far apart in hue, so a dull or blurred copy still reads as one of them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Drawable, but never in the embedded model's training data: a concept for a LoRA to teach it.
# (A new shape, not a new colour: the VAE only learnt the four colours and decodes others as one of them.)
NEW_SHAPES: tuple[str, ...] = ("diamond",)
ALL_SHAPES = SHAPES + NEW_SHAPES

SUPERSAMPLE = 4  # drawn this much larger, then downsampled, for smooth edges


@dataclass(frozen=True)
class Scene:
    """One picture: which shape, which colour, where, and on what background (pixels of a size×size canvas)."""

    colour: str
    shape: str
    size: int  # width and height of the shape's bounding box; every shape fills its box edge to edge
    centre: tuple[float, float]  # (x, y) of the bounding box's centre
    background: tuple[int, int, int]


def caption(scene: Scene) -> str:
    """The training caption, e.g. "a red circle"."""
    return f"a {scene.colour} {scene.shape}"


def sample_scene(rng: random.Random, size: int = 128, colour: str | None = None, shape: str | None = None) -> Scene:
    """A random scene on a size×size canvas; colour and shape are random unless given."""
    if colour is not None and colour not in COLOURS:
        raise ValueError(f"`colour` must be one of {sorted(COLOURS)} but is {colour!r}.")
    if shape is not None and shape not in ALL_SHAPES:
        raise ValueError(f"`shape` must be one of {list(ALL_SHAPES)} but is {shape!r}.")
    colour = colour or rng.choice(sorted(COLOURS))
    shape = shape or rng.choice(SHAPES)
    extent = round(rng.uniform(0.35, 0.70) * size)
    low, high = 0.04 * size + extent / 2, size - 0.04 * size - extent / 2
    centre = (rng.uniform(low, high), rng.uniform(low, high))
    return Scene(colour, shape, extent, centre, _light_background(rng))


def _light_background(rng: random.Random) -> tuple[int, int, int]:
    """A pale, nearly grey colour: light and unsaturated so it never reads as one of COLOURS."""
    base = rng.randint(215, 240)
    return tuple(min(250, max(205, base + rng.randint(-6, 6))) for _ in range(3))


def draw(scene: Scene, size: int = 128) -> Image.Image:
    """Render the scene as a size×size RGB image."""
    half = scene.size / 2
    x, y = scene.centre
    if x - half < 0 or y - half < 0 or x + half > size or y + half > size:
        raise ValueError(f"the shape at {scene.centre} with size {scene.size} does not fit a {size}×{size} image.")
    big = Image.new("RGB", (size * SUPERSAMPLE, size * SUPERSAMPLE), scene.background)
    pen = ImageDraw.Draw(big)
    left, top, right, bottom = (v * SUPERSAMPLE for v in (x - half, y - half, x + half, y + half))
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        pen.ellipse((left, top, right, bottom), fill=fill)
    elif scene.shape == "square":
        pen.rectangle((left, top, right, bottom), fill=fill)
    elif scene.shape == "diamond":  # a square standing on a corner, filling its box
        middle_x, middle_y = (left + right) / 2, (top + bottom) / 2
        pen.polygon([(middle_x, top), (right, middle_y), (middle_x, bottom), (left, middle_y)], fill=fill)
    else:  # an isosceles triangle pointing up, as tall as it is wide
        pen.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    return big.resize((size, size), Image.LANCZOS)


def dataset(count: int, seed: int, size: int = 128) -> list[tuple[Image.Image, str, Scene]]:
    """`count` drawings with captions, cycling through every (colour, shape) pair so each is equally common."""
    pairs = list(itertools.product(sorted(COLOURS), SHAPES))
    items = []
    for index in range(count):
        colour, shape = pairs[index % len(pairs)]
        # One generator per item, so the first n items are the same whatever `count` is.
        scene = sample_scene(random.Random(f"{seed}/{index}"), size, colour, shape)
        items.append((draw(scene, size), caption(scene), scene))
    return items


def write_folder(folder, count: int, seed: int, size: int = 128, colours=None, shapes=SHAPES) -> list:
    """`count` drawings as NNNN.png + NNNN.txt (the caption) in `folder`, cycling through colours x shapes."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = list(itertools.product(colours or sorted(COLOURS), shapes))
    paths = []
    for index in range(count):
        colour, shape = pairs[index % len(pairs)]
        scene = sample_scene(random.Random(f"{seed}/{index}"), size, colour, shape)
        path = folder / f"{index:04d}.png"
        draw(scene, size).save(path)
        path.with_suffix(".txt").write_text(caption(scene) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    """Draw a folder of the world: the stand-in for "a folder of images you collected"."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m batch.toy.world", description=main.__doc__,
        epilog="example: python -m batch.toy.world data/diamonds --shape diamond --count 24")
    parser.add_argument("folder")
    parser.add_argument("--colour", action="append", choices=sorted(COLOURS), help="repeatable [all four]")
    parser.add_argument("--shape", action="append", choices=ALL_SHAPES,
                        help=f"repeatable [{', '.join(SHAPES)}; {', '.join(NEW_SHAPES)} is new to the model]")
    parser.add_argument("--count", type=int, default=48, help="[48]")
    parser.add_argument("--size", type=int, default=128, help="[128]")
    parser.add_argument("--seed", type=int, default=0, help="[0]")
    args = parser.parse_args(argv)
    paths = write_folder(args.folder, args.count, args.seed, args.size, args.colour, tuple(args.shape or SHAPES))
    print(f"drew {len(paths)} images with captions in {args.folder}")


if __name__ == "__main__":
    main()
