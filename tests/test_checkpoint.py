# Copyright MedAttnSlicer contributors. Apache-2.0.
"""networks.checkpoint: save/load round trip through the factory, atomic writes, clear errors."""

from __future__ import annotations

import os

import pytest
import torch

from networks.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from networks.factory import create_model


def _perturbed(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    for m in model.modules():  # non-default BN statistics must survive too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model.eval()


@pytest.mark.parametrize(
    "name, kwargs, shape",
    [
        ("sadnn_seg_small", {"out_channels": 3}, (1, 1, 32, 32)),
        ("unet_baseline", {}, (1, 1, 32, 32)),
        ("sadnn_cls_small", {"out_channels": 5, "img_size": 64}, (1, 1, 64, 64)),
    ],
)
def test_round_trip_rebuilds_model_and_metadata(tmp_path, name, kwargs, shape):
    model = _perturbed(name, **kwargs)
    path = save_checkpoint(
        model,
        tmp_path / "sub" / "model.pt",
        factory_name=name,
        factory_kwargs=kwargs,
        metadata={"epoch": 3, "dice": 0.5},
    )
    assert path.is_file()
    loaded, meta = load_checkpoint(path)
    assert type(loaded) is type(model)
    assert not loaded.training
    assert meta["epoch"] == 3 and meta["dice"] == 0.5
    assert meta["factory_name"] == name and meta["factory_kwargs"] == kwargs
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_corrupt_file(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(os.urandom(2048))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_truncated_checkpoint(tmp_path):
    path = save_checkpoint(_perturbed("sadnn_seg_small"), tmp_path / "m.pt", factory_name="sadnn_seg_small")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_foreign_torch_file(tmp_path):
    path = tmp_path / "state.pt"
    torch.save(create_model("sadnn_seg_small").state_dict(), path)
    with pytest.raises(CheckpointError, match="not a MedAttnSlicer checkpoint"):
        read_checkpoint(path)


def test_unknown_factory_name(tmp_path):
    path = save_checkpoint(_perturbed("sadnn_seg_small"), tmp_path / "m.pt", factory_name="no_such_model")
    with pytest.raises(CheckpointError, match="no_such_model"):
        load_checkpoint(path)


def test_weights_that_do_not_fit(tmp_path):
    path = save_checkpoint(
        _perturbed("sadnn_seg_small"),
        tmp_path / "m.pt",
        factory_name="sadnn_seg_small",
        factory_kwargs={"out_channels": 3},
    )
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(path)


def test_bad_arguments(tmp_path):
    model = create_model("sadnn_seg_small")
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(model, tmp_path / "m.pt", factory_name="sadnn_seg_small", metadata={"x": object()})
    with pytest.raises(ValueError, match="factory_name"):
        save_checkpoint(model, tmp_path / "m.pt", factory_name="")
    with pytest.raises(TypeError, match="nn.Module"):
        save_checkpoint({"a": 1}, tmp_path / "m.pt", factory_name="sadnn_seg_small")


def test_atomic_overwrite_leaves_no_temporary_files(tmp_path):
    first = _perturbed("sadnn_seg_small")
    path = save_checkpoint(first, tmp_path / "m.pt", factory_name="sadnn_seg_small", metadata={"v": 1})
    second = create_model("sadnn_seg_small")
    save_checkpoint(second, path, factory_name="sadnn_seg_small", metadata={"v": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
    loaded, meta = load_checkpoint(path)
    assert meta["v"] == 2
    torch.testing.assert_close(loaded.state_dict(), second.state_dict())


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = save_checkpoint(_perturbed("sadnn_seg_small"), tmp_path / "m.pt", factory_name="sadnn_seg_small")
    before = path.read_bytes()

    def failing_save(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(create_model("sadnn_seg_small"), path, factory_name="sadnn_seg_small")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
