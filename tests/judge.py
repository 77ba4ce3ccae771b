"""The automatic judge: which colour and which shape a picture of the toy world shows."""
from __future__ import annotations

import colorsys
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image
from scipy import ndimage

from batch.toy.world import ALL_SHAPES, COLOURS, SHAPES, Scene, draw

MIN_CONTRAST = 40.0  # RGB distance from the background that counts as "something drawn"
MIN_FOREGROUND = 0.01  # an object smaller than this fraction of the image is noise, not a shape
MIN_CHROMA = 20.0  # below this (max - min channel) the object is grey: no colour to name
# RMS gap to the nearest prototype: degraded drawings stay under 0.1; an upside-down triangle, a star
# or a diamond is over 0.27; a circle and a square are 0.29 apart.
MAX_SHAPE_DISTANCE = 0.22
BANDS = 10  # samples along each silhouette profile
MAX_ASPECT = 1.5  # every shape in the world is as wide as it is tall; a longer one is something else
# Every shape in the world is convex: drawn ones fill >= 0.98 of their convex hull, the embedded model's
# 0.93 or more; a four-pointed star or a ragged blob (0.7-0.88) is not a diamond, however its profile reads.
MIN_SOLIDITY = 0.9


@dataclass(frozen=True)
class Verdict:
    """What the judge saw, with the measurements it decided on."""

    colour: str | None
    shape: str | None
    foreground: float = 0.0  # fraction of the image covered by the object
    fill: float = 0.0  # object area over its bounding box: square 1, circle π/4, triangle 1/2
    rgb: tuple[int, int, int] | None = None  # the object's median colour, after removing the background's cast
    distance: float = math.inf  # from the silhouette to the nearest shape prototype


class Score(NamedTuple):
    """How many images the judge found right, out of n."""

    colour_right: int
    shape_right: int
    n: int


def judge(image: Image.Image, shapes: Sequence[str] = SHAPES) -> Verdict:
    """Name the colour and shape (one of `shapes`) of the largest object that stands out from the background."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    # Smoothing first keeps noise and JPEG speckle from breaking the object into pieces.
    sigma = max(1.0, min(pixels.shape[:2]) / 128)
    smooth = ndimage.gaussian_filter(pixels, sigma=(sigma, sigma, 0))
    background = _border_colour(smooth)
    mask = _object_mask(smooth, background)
    if mask is None or mask.mean() < MIN_FOREGROUND:
        return Verdict(None, None, 0.0 if mask is None else float(mask.mean()))
    rgb = _object_colour(pixels, mask, background)
    shape, fill, distance = _shape(mask, shapes)
    return Verdict(_nearest_colour(rgb), shape, float(mask.mean()), fill, rgb, distance)


def score(images_and_expected: Iterable[tuple[Image.Image, str, str]]) -> Score:
    """Judge (image, expected colour, expected shape) triples and count the right answers."""
    colour_right = shape_right = n = 0
    for image, colour, shape in images_and_expected:
        verdict = judge(image)
        colour_right += verdict.colour == colour
        shape_right += verdict.shape == shape
        n += 1
    return Score(colour_right, shape_right, n)


def _border_colour(pixels: np.ndarray) -> np.ndarray:
    """The median colour of a thin frame around the image: the background, since objects sit inside it."""
    width = max(2, min(pixels.shape[:2]) // 32)
    frame = np.concatenate([pixels[:width].reshape(-1, 3), pixels[-width:].reshape(-1, 3),
                            pixels[:, :width].reshape(-1, 3), pixels[:, -width:].reshape(-1, 3)])
    return np.median(frame, axis=0)


def _object_mask(pixels: np.ndarray, background: np.ndarray) -> np.ndarray | None:
    """The largest region that differs from the background, cut at half its contrast, holes filled."""
    contrast = np.linalg.norm(pixels - background, axis=2)
    rough = _largest_component(contrast > MIN_CONTRAST)
    if rough is None:
        return None
    # Cutting halfway between background and object keeps a blurred edge where the sharp edge was,
    # so blur changes the silhouette's size but hardly its shape.
    level = float(np.percentile(contrast[rough], 90))
    mask = _largest_component(contrast > max(MIN_CONTRAST, level / 2))
    return None if mask is None else ndimage.binary_fill_holes(mask)


def _largest_component(mask: np.ndarray) -> np.ndarray | None:
    """The biggest 8-connected region of a boolean mask, or None if it is empty."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def _object_colour(pixels: np.ndarray, mask: np.ndarray, background: np.ndarray) -> tuple[int, int, int]:
    """The median colour inside the object, away from its edge, white-balanced against the background."""
    inner = ndimage.binary_erosion(mask, iterations=max(1, int(math.sqrt(mask.sum()) / 10)))
    median = np.median(pixels[inner if inner.any() else mask], axis=0)
    # Backgrounds are near-grey by design, so whatever tint the background has is a cast on the whole image.
    gain = np.clip(background.mean() / np.maximum(background, 1.0), 0.8, 1.25)
    return tuple(int(v) for v in np.clip(median * gain, 0, 255))


def _hue(rgb: tuple[int, int, int]) -> float:
    """Hue in [0, 1), the one property a dull, dark or washed-out copy of a colour keeps."""
    return colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0]


def _nearest_colour(rgb: tuple[int, int, int]) -> str | None:
    """The palette colour nearest in hue, or None for a grey object."""
    if max(rgb) - min(rgb) < MIN_CHROMA:
        return None
    hue = _hue(rgb)

    def gap(name: str) -> float:
        d = abs(hue - _hue(COLOURS[name]))
        return min(d, 1 - d)

    return min(COLOURS, key=gap)


def _features(mask: np.ndarray) -> np.ndarray:
    """The silhouette's width down its bounding box and height across it, sampled at BANDS points, plus fill."""
    rows, cols = np.nonzero(mask)
    box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].astype(np.float32)
    # Graded profiles rather than single landmarks: blur or a wobbly edge moves each sample a little,
    # none of them a lot. A triangle widens downward, a circle bulges in the middle, a square is flat.
    return np.concatenate([_profile(box.mean(axis=1)), _profile(box.mean(axis=0)), [box.mean()]])


def _profile(values: np.ndarray) -> np.ndarray:
    """values resampled at BANDS evenly spaced points, whatever their length."""
    where = (np.arange(len(values)) + 0.5) / len(values)
    return np.interp((np.arange(BANDS) + 0.5) / BANDS, where, values)


def _prototypes(size: int = 256) -> dict[str, np.ndarray]:
    """Features of each shape as the world itself draws it, so the judge and the world cannot drift apart."""
    prototypes = {}
    for shape in ALL_SHAPES:
        grey = (230, 230, 230)
        pixels = np.asarray(draw(Scene("red", shape, int(size * 0.8), (size / 2, size / 2), grey), size), np.float32)
        prototypes[shape] = _features(np.linalg.norm(pixels - grey, axis=2) > MIN_CONTRAST)
    return prototypes


PROTOTYPES = _prototypes()


def _shape(mask: np.ndarray, shapes: Sequence[str] = SHAPES) -> tuple[str | None, float, float]:
    """The nearest of `shapes` (None if none is near, or the object is long and thin), fill ratio, distance."""
    features = _features(mask)
    distances = {shape: float(np.sqrt(np.mean((features - PROTOTYPES[shape]) ** 2))) for shape in shapes}
    nearest = min(distances, key=distances.get)
    rows, cols = np.nonzero(mask)
    height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
    known = (distances[nearest] <= MAX_SHAPE_DISTANCE and max(height, width) <= MAX_ASPECT * min(height, width)
             and solidity(mask) >= MIN_SOLIDITY)
    return (nearest if known else None), float(features[-1]), distances[nearest]


def solidity(mask: np.ndarray) -> float:
    """The silhouette's area over its convex hull's (pixel centres, plus the half-pixel rim the hull cuts off)."""
    from scipy.spatial import ConvexHull, QhullError

    points = np.argwhere(mask).astype(np.float64)
    try:
        hull = ConvexHull(points)
    except QhullError:  # a line or a point: nothing convex to speak of
        return 0.0
    return float(mask.sum() / (hull.volume + 0.5 * hull.area))
