"""The package declares everything it needs: a fresh install must not lean on packages once added by hand."""
from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys

import pytest
from conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

# Packages diffusers imports lazily for features sdbatch offers: nothing in batch/ imports them,
# so only a run of that feature would find them missing (as `peft` and `scipy` once were).
USED_THROUGH_LIBRARIES = {
    "peft": "LoRA rows (diffusers' load_lora_weights uses the peft backend)",
    "scipy": "the lms scheduler (LMSDiscreteScheduler integrates with scipy)",
}


def _declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {_canonical(re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0]) for spec in project["dependencies"]}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_top_level_modules() -> set[str]:
    modules = set()
    for path in (REPO / "batch").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m != "batch"}


def test_every_module_batch_imports_is_a_declared_dependency():
    owners = metadata.packages_distributions()
    declared = _declared()
    missing = {}
    for module in sorted(_imported_top_level_modules()):
        distributions = {_canonical(d) for d in owners.get(module, [module])}
        if not distributions & declared:
            missing[module] = sorted(distributions)
    assert not missing, f"imported by batch/ but not in pyproject's dependencies: {missing}"


def test_packages_used_through_diffusers_are_declared():
    missing = {name: why for name, why in USED_THROUGH_LIBRARIES.items() if _canonical(name) not in _declared()}
    assert not missing, f"needed at run time but not declared: {missing}"


def test_the_package_carries_the_shipped_model_folders():
    # `pip install .` (not editable) has no checkout: the embedded model, its IP-Adapter and the SD 1.5
    # configs must travel inside the package (tests/test_wheel.py builds one and runs it).
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools.get("package-dir", {}).get("batch.models_data") == "models"
    assert "batch.models_data" in setuptools["packages"]
    shipped = {p for pattern in setuptools.get("package-data", {}).get("batch.models_data", [])
               for p in (REPO / "models").glob(pattern) if p.is_file()}
    needed = {p for name in ("tiny", "tiny-ip-adapter", "sd15")
              for p in (REPO / "models" / name).rglob("*") if p.is_file()}
    assert not needed - shipped, f"not in the wheel: {sorted(str(p.relative_to(REPO)) for p in needed - shipped)}"
