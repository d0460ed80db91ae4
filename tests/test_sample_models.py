# Copyright MedAttnSlicer contributors. Apache-2.0.
"""The sample-model cache: where it lives, what its keys depend on, and the command that fills it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sample_models import trained_models
from sample_models.trained_models import CONFIGS, cache_dir, code_digest, train_missing

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_cache_is_outside_the_checkout_unless_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(trained_models.MODEL_CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "medattn" / "trained_models" and cache_dir().is_dir()
    monkeypatch.setenv(trained_models.MODEL_CACHE_ENV, str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine" and cache_dir().is_dir()


def test_keys_change_with_the_code_that_shapes_the_weights_and_only_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A model trained by other network, kernel or training code is never reused: its key differs."""
    for name in ("networks/nets/net.py", "networks/kernels/csrc/core.cpp", "sample_models/train.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    (tmp_path / "networks" / "nets" / "notes.md").write_text("prose")
    (tmp_path / "networks" / "quantization").mkdir()
    (tmp_path / "networks" / "quantization" / "q.py").write_text("q = 1\n")
    monkeypatch.setattr(trained_models, "REPO_ROOT", tmp_path)
    config = CONFIGS["sadnn_seg_small_2d"]

    def key() -> str:
        code_digest.cache_clear()
        return config.key()

    try:
        first = key()
        (tmp_path / "networks" / "nets" / "notes.md").write_text("other prose")  # not source
        (tmp_path / "networks" / "quantization" / "q.py").write_text("q = 2\n")  # quantisation: same FP32 weights
        assert key() == first
        for name in ("networks/nets/net.py", "networks/kernels/csrc/core.cpp", "sample_models/train.py"):
            (tmp_path / name).write_text("x = 2\n")
            changed = key()
            assert changed != first, name
            first = changed
    finally:
        code_digest.cache_clear()
    assert CONFIGS["unet_baseline_2d"].key() != CONFIGS["sadnn_seg_small_2d"].key()


def test_unknown_names_are_refused_before_anything_trains():
    with pytest.raises(ValueError, match=r"unknown model\(s\) \['no_such_model'\]"):
        train_missing(["no_such_model"])
    command = [sys.executable, "-m", "sample_models", "--jobs", "0"]
    refused = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert refused.returncode == 2 and "--jobs must be at least 1" in refused.stderr


def test_cli_reports_cached_models_without_training_them(tmp_path: Path):
    """``make test`` runs this before pytest: on a cache that holds the model, it trains nothing."""
    from sample_models import trained_model

    trained_model("hct_small_cls_2d")  # cached by make test (or trained here, once)
    command = [sys.executable, "-m", "sample_models", "hct_small_cls_2d", "--jobs", "1"]
    run = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "1 cached, 0 trained" in run.stdout, run.stdout
