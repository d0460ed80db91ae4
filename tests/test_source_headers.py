# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Every source file git tracks carries the project's licence line near its top. ``ruff check`` (CPY001) checks the
Python files in CI too; this test also covers C++, shell, make, CMake and Qt Designer files, which ruff does not
read."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTICE = "copyright medattnslicer contributors"
SOURCE_SUFFIXES = {".py", ".cpp", ".h", ".sh", ".cmake", ".ui"}
SOURCE_NAMES = {"Makefile", "CMakeLists.txt", "run"}  # .ci/run has no suffix
HEAD_LINES = 3  # after a shebang or an XML declaration


def tracked_sources() -> list[Path]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True, timeout=60
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"not a git checkout ({err}): the tracked files cannot be listed")
    paths = [REPO_ROOT / name for name in listed.split("\0") if name]
    return [p for p in paths if p.is_file() and (p.suffix in SOURCE_SUFFIXES or p.name in SOURCE_NAMES)]


def missing_notice(paths: list[Path], root: Path = REPO_ROOT) -> list[str]:
    missing = []
    for path in paths:
        with path.open(encoding="utf-8", errors="replace") as f:
            head = "".join(f.readline() for _ in range(HEAD_LINES)).lower()
        if NOTICE not in head:
            missing.append(str(path.relative_to(root)))
    return missing


def test_every_source_file_has_the_licence_line():
    sources = tracked_sources()
    assert len(sources) > 100  # the listing found the tree
    assert missing_notice(sources) == []


def test_a_file_without_the_line_is_reported(tmp_path):
    (tmp_path / "ok.cpp").write_text("// Copyright MedAttnSlicer contributors. Apache-2.0.\nint x;\n")
    (tmp_path / "late.sh").write_text("#!/bin/sh\necho\necho\n# Copyright MedAttnSlicer contributors.\n")
    assert missing_notice([tmp_path / "ok.cpp", tmp_path / "late.sh"], root=tmp_path) == ["late.sh"]
