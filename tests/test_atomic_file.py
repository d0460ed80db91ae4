# Copyright MedAttnSlicer contributors. Apache-2.0.
"""The project's one atomic writer (atomic_io) and the four places that write through it: file mode as open() gives
it (umask respected), old file intact and no temporary file left when a write fails, fsync of file and folder."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from atomic_io import atomic_open, atomic_path, atomic_write_bytes, current_umask, new_file_mode
from monailabel_app.lib import json_files
from networks.checkpoint import atomic_torch_save
from networks.quantization import quantize_int8, save_int8_artifact
from sample_data import atomic as sample_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    """Set the process umask for one test (restored afterwards)."""
    original = os.umask(0o022)
    os.umask(original)
    yield os.umask
    os.umask(original)


def _image() -> sitk.Image:
    image = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    image.SetSpacing((1.0, 1.5, 2.0))
    return image


# every writer of the project, as (name, write(path) -> None)
WRITERS: list[tuple[str, Callable[[Path], None]]] = [
    ("atomic_io.atomic_write_bytes", lambda p: atomic_write_bytes(p, b"new bytes")),
    ("networks.checkpoint.atomic_torch_save", lambda p: atomic_torch_save({"w": torch.arange(3)}, p)),
    ("sample_data.atomic_write_json", lambda p: sample_atomic.atomic_write_json(p, {"a": 1})),
    ("sample_data.atomic_write_image", lambda p: sample_atomic.atomic_write_image(_image(), p, p.parent / ".staging")),
    ("monailabel_app json_files.atomic_write_json", lambda p: json_files.atomic_write_json(str(p), {"a": 1})),
]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002, 0o027])
@pytest.mark.parametrize("name,write", WRITERS, ids=[name for name, _ in WRITERS])
def test_new_files_get_the_mode_open_gives(tmp_path: Path, umask, mask: int, name: str, write) -> None:
    umask(mask)
    assert current_umask() == mask
    reference = tmp_path / "plain.txt"
    with open(reference, "w") as handle:
        handle.write("x")
    target = tmp_path / "out" / ("file.nii.gz" if "image" in name else "file.bin")
    write(target)
    assert _mode(target) == _mode(reference) == 0o666 & ~mask == new_file_mode()


def test_replacing_an_owner_only_file_gives_the_new_file_mode(tmp_path: Path, umask) -> None:
    """A file left 0600 by the old mkstemp-based writer becomes readable by the group/others like a new file."""
    umask(0o022)
    target = tmp_path / "card.json"
    target.write_text("{}")
    os.chmod(target, 0o600)
    json_files.atomic_write_json(str(target), {"name": "x"})
    assert _mode(target) == 0o644
    assert json.loads(target.read_text()) == {"name": "x"}


def test_writers_keep_their_formats(tmp_path: Path) -> None:
    sample_atomic.atomic_write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "a.json").read_text() == '{\n  "b": 1,\n  "a": [\n    1,\n    2\n  ]\n}\n'
    json_files.atomic_write_json(str(tmp_path / "b.json"), {"path": tmp_path})  # default=str
    assert json.loads((tmp_path / "b.json").read_text()) == {"path": str(tmp_path)}
    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "c.pt")
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["w"], torch.arange(3))
    sample_atomic.atomic_write_image(_image(), tmp_path / "d.nii.gz", tmp_path / ".staging")
    read = sitk.ReadImage(str(tmp_path / "d.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(_image()))
    assert read.GetSpacing() == (1.0, 1.5, 2.0)
    assert list((tmp_path / ".staging").iterdir()) == []


class _HalfWritten(RuntimeError):
    pass


def _unpicklable_after_data() -> dict:
    # torch.save writes the tensor's storage record, then fails pickling the lambda
    return {"weights": torch.zeros(100_000), "callback": lambda: None}


# writers made to fail after they started writing the temporary file
FAILING_WRITES: list[tuple[str, Callable[[Path], None], type[BaseException]]] = [
    ("atomic_open then error", lambda p: _write_then_raise(p, _HalfWritten), _HalfWritten),
    ("atomic_open then KeyboardInterrupt", lambda p: _write_then_raise(p, KeyboardInterrupt), KeyboardInterrupt),
    ("torch.save of an unpicklable object", lambda p: atomic_torch_save(_unpicklable_after_data(), p), Exception),
    ("json of a non-serialisable value", lambda p: sample_atomic.atomic_write_json(p, {"x": object()}), TypeError),
    (
        "image to an unknown extension",
        lambda p: sample_atomic.atomic_write_image(_image(), p.with_suffix(".unknownext"), p.parent / ".staging"),
        RuntimeError,
    ),
]


def _write_then_raise(path: Path, error: type[BaseException]) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(b"partial " * 1000)
        handle.flush()
        raise error()


@pytest.mark.parametrize("name,write,error", FAILING_WRITES, ids=[name for name, _, _ in FAILING_WRITES])
def test_failure_mid_write_leaves_the_old_file_and_no_temporary_file(tmp_path: Path, name: str, write, error) -> None:
    target = tmp_path / "model.pt"
    target.write_bytes(b"old content")
    if "image" in name:
        target.with_suffix(".unknownext").write_bytes(b"old content")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(error):
        write(target)
    assert target.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".staging") == before
    staging = tmp_path / ".staging"
    assert not staging.exists() or list(staging.iterdir()) == []


def test_int8_artifact_failure_keeps_the_old_artifact(tmp_path: Path) -> None:
    """save_int8_artifact writes through atomic_path: an export that fails leaves the previous artifact."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU()).eval()
    int8 = quantize_int8(net, [torch.randn(2, 1, 8, 8)])
    target = tmp_path / "net_int8.pt"
    target.write_bytes(b"old artifact")
    with pytest.raises(ValueError, match="reserved"):
        save_int8_artifact(int8, torch.randn(1, 1, 8, 8), target, metadata={"format": "mine"})
    assert target.read_bytes() == b"old artifact"
    assert [p.name for p in tmp_path.iterdir()] == ["net_int8.pt"]
    save_int8_artifact(int8, torch.randn(1, 1, 8, 8), target)
    assert _mode(target) == new_file_mode()


def test_file_then_rename_then_folder_are_synced(tmp_path: Path, monkeypatch) -> None:
    """Data reach the disk before the rename, and the folder (the rename itself) after it."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_bytes(tmp_path / "a.bin", b"data")
    assert events == ["fsync file", "replace", "fsync folder"]
    assert (tmp_path / "a.bin").read_bytes() == b"data"


def test_temporary_file_is_hidden_next_to_the_destination_or_in_the_staging_folder(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "weights.pt") as tmp:
        assert Path(tmp).parent == tmp_path and Path(tmp).name.startswith(".weights.pt.")
        assert not (tmp_path / "weights.pt").exists()
        Path(tmp).write_bytes(b"w")
    staging = tmp_path / ".staging"
    with atomic_path(tmp_path / "labels" / "x.nii.gz", suffix="-x.nii.gz", staging_dir=staging) as tmp:
        assert Path(tmp).parent == staging and tmp.endswith("-x.nii.gz")
        assert list((tmp_path / "labels").iterdir()) == []  # a datastore scanning labels/ sees nothing partial
        Path(tmp).write_bytes(b"label")
    assert (tmp_path / "labels" / "x.nii.gz").read_bytes() == b"label"
    assert (tmp_path / "weights.pt").read_bytes() == b"w"


def test_atomic_open_rejects_modes_that_do_not_write_a_whole_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"), atomic_open(tmp_path / "a", "ab"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_writer_and_sample_data_import_no_torch() -> None:
    code = (
        "import sys, atomic_io, sample_data, sample_data.atomic; print(sorted(m for m in sys.modules if m == 'torch'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
