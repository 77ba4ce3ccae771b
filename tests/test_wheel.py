"""A wheel (`pip install .`, not editable) carries the embedded model: every `tiny` path works from it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_image, write_jsonl

pytestmark = pytest.mark.slow


def _pip(*args: str, cwd: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"pip {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (the checkout stays untouched) and installed into a folder."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("batch", "models"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(source), "-w", str(root / "dist"),
         cwd=root)
    (wheel,) = (root / "dist").glob("sdbatch-*.whl")
    _pip("install", "--no-deps", "--no-index", "-q", "--target", str(root / "site"), str(wheel), cwd=root)
    return root / "site"


def _run(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    # Only the installed copy is importable: not the checkout (cwd is elsewhere, PYTHONPATH is the install).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_ships_the_model_folders(installed, tmp_path):
    done = _run(installed, tmp_path, "-c", "import batch, batch.models as m; print(batch.__file__); "
                "print(m.resolve_model('tiny').location); print(m.resolve_model('sd15-random').location); "
                "print(m.TINY_IP_ADAPTERS['tiny'].is_file())")
    assert done.returncode == 0, done.stderr
    package, tiny, sd15, adapter = done.stdout.split()
    assert Path(package).is_relative_to(installed), f"imported {package}, not the installed copy"
    assert Path(tiny).is_relative_to(installed) and Path(sd15).is_relative_to(installed), (tiny, sd15)
    assert adapter == "True"


def test_tiny_runs_from_the_wheel_in_another_folder(installed, tmp_path):
    from PIL import Image

    fast = ["--model", "tiny", "--device", "cpu", "--steps", "2", "--width", "64", "--height", "64", "--quiet"]
    single = _run(installed, tmp_path, "-m", "batch.cli", "--prompt", "a red circle", *fast, "--out", "single")
    assert single.returncode == 0, single.stderr
    (image,) = (tmp_path / "single" / "images").glob("*.png")
    assert Image.open(image).size == (64, 64)

    make_image(tmp_path / "ref.png")
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "like", "prompt_image": "ref.png"}])  # the tiny IP-Adapter
    rows = _run(installed, tmp_path, "-m", "batch.cli", str(manifest), *fast, "--out", "rows")
    assert rows.returncode == 0, rows.stderr
    assert Image.open(tmp_path / "rows" / "images" / "like.png").size == (64, 64)
