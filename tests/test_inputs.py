"""Input images are read as viewers show them: EXIF orientation applied (phone JPEGs)."""
from __future__ import annotations

import numpy as np
from conftest import FAST, cli, pixels, write_jsonl
from PIL import Image, ImageOps

from batch.generate import read_rgb


def _phone_jpeg(path) -> Image.Image:
    """A JPEG stored sideways with EXIF orientation 6 (rotate 90° clockwise to view), as phones write;
    returns the upright picture a viewer shows."""
    stored = Image.new("RGB", (64, 32), (220, 40, 40))
    stored.paste((40, 40, 220), (0, 0, 16, 32))  # a blue band on the stored image's left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, format="JPEG", quality=95, exif=exif.tobytes())
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def test_read_rgb_applies_exif_orientation(tmp_path):
    upright = _phone_jpeg(tmp_path / "phone.jpg")
    picture = read_rgb(str(tmp_path / "phone.jpg"), "init_image")
    assert picture.size == (32, 64) == upright.size
    assert np.array_equal(np.asarray(picture), np.asarray(upright))
    assert np.asarray(picture)[2, 16, 2] > 150  # the blue band is now along the top


def test_img2img_from_a_phone_jpeg_equals_the_upright_image(tmp_path):
    _phone_jpeg(tmp_path / "phone.jpg").save(tmp_path / "upright.png")
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "phone", "prompt": "a red circle", "init_image": "phone.jpg", "strength": 0.5, "seed": 3},
        {"id": "upright", "prompt": "a red circle", "init_image": "upright.png", "strength": 0.5, "seed": 3},
    ])
    assert cli(manifest, *FAST, "--out", tmp_path / "out", "--quiet", "--batch-size", "1") == 0
    diff = np.abs(pixels(tmp_path / "out/images/phone.png") - pixels(tmp_path / "out/images/upright.png")).max()
    assert diff <= 2, f"phone JPEG and its upright copy differ by {diff}/255"
