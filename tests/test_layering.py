# Copyright MedAttnSlicer contributors. Apache-2.0.
"""The packages depend on each other one way: networks <- monailabel_app <- benchmarks, and nothing but the test suite
imports ``tests`` (what benchmarks and tests share lives in :mod:`sample_models` and :mod:`monailabel_app.launcher`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# package -> top-level packages of this repository it must never import
FORBIDDEN = {
    # the one atomic writer: standard library only, so that even the torch-free sample_data can use it
    "atomic_io": {
        "tests",
        "networks",
        "monailabel",
        "monailabel_app",
        "benchmarks",
        "sample_data",
        "sample_models",
        "torch",
        "numpy",
    },
    "networks": {"tests", "monailabel", "monailabel_app", "benchmarks", "sample_models", "MedAttnSlicerLib"},
    "sample_data": {"tests", "monailabel", "monailabel_app", "benchmarks", "sample_models", "torch"},
    "sample_models": {"tests", "monailabel", "monailabel_app", "benchmarks"},
    "monailabel_app": {"tests", "benchmarks"},
    "benchmarks": {"tests"},
}


def imported_top_level(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (absolute imports, at any depth of the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_it_may(package):
    offenders = {
        str(path.relative_to(REPO_ROOT)): sorted(imported_top_level(path) & FORBIDDEN[package])
        for path in sorted((REPO_ROOT / package).rglob("*.py"))
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_check_sees_imports_inside_functions(tmp_path):
    # benchmarks imported tests inside functions: the check must see those too
    module = tmp_path / "late.py"
    module.write_text("def f():\n    from tests.trained_models import ct_slices\n    import torch.nn\n")
    assert imported_top_level(module) == {"tests", "torch"}
