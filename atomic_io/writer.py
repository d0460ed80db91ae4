# Copyright MedAttnSlicer contributors. Apache-2.0.
"""The project's one atomic file writer (standard library only, so torch-free packages such as ``sample_data`` use it).

Every file the project writes for others to read (checkpoints, INT8 artifacts, model cards, JSON stats, sample
volumes) goes through :func:`atomic_path`:

1. a temporary file is created next to the destination (same folder, hence same file system) with
   ``os.open(O_CREAT | O_EXCL, 0o666)``, so it gets exactly the mode a plain ``open(path, "w")`` would give: the
   umask (and a default ACL of the folder) apply. ``tempfile.mkstemp`` would give 0600, and a model card or label
   written by the server would be unreadable by the other users of a shared folder;
2. the caller writes it (by name: ``torch.jit.save``, ``SimpleITK.WriteImage`` and ``savefig`` need a file name);
3. its data are flushed to disk (``fsync``), it is renamed over the destination (``os.replace``, atomic on POSIX
   and Windows), and the folder is flushed so that the rename itself survives a crash.

A reader (a serving app reloading weights, MONAI Label's datastore watcher) therefore sees the old file or the
complete new one, never a partial write; on any error the temporary file is removed and the old file is untouched.
A replaced file gets the new-file mode, not the old file's (a file left 0600 by an earlier writer is healed).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = [
    "atomic_open",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "current_umask",
    "fsync_directory",
    "new_dir_mode",
    "new_file_mode",
]

# what open()/mkdir() ask the kernel for before the umask is applied
_OPEN_MODE = 0o666
_MKDIR_MODE = 0o777


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc/self/status``).

    Elsewhere it is read with ``os.umask`` (set and restored at once), which another thread creating a file in
    that instant could observe.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """Permission bits ``open(path, "w")`` gives a new file: ``0o666 & ~umask``."""
    return _OPEN_MODE & ~current_umask()


def new_dir_mode() -> int:
    """Permission bits ``os.mkdir`` gives a new folder: ``0o777 & ~umask``."""
    return _MKDIR_MODE & ~current_umask()


def fsync_directory(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened (Windows)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as err:
        # some file systems (and FUSE mounts) do not sync folders; the rename is still atomic there
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _create_temporary(folder: Path, prefix: str, suffix: str) -> tuple[Path, int]:
    """Create an empty file ``folder/prefix<random>suffix`` as ``open()`` would; return its path and mode."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        candidate = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            fd = os.open(candidate, flags, _OPEN_MODE)
        except FileExistsError:
            continue
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
        return candidate, mode
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(folder / f"{prefix}*{suffix}"))


@contextmanager
def atomic_path(
    path: str | os.PathLike, suffix: str = ".tmp", *, staging_dir: str | os.PathLike | None = None
) -> Iterator[str]:
    """Yield the name of a new empty temporary file to write; on success it replaces ``path`` atomically.

    On leaving the block normally the temporary file is fsynced, renamed to ``path`` and ``path``'s folder is
    fsynced; on any exception it is deleted and ``path`` stays as it was.

    Args:
        path: the destination (its folder is created).
        suffix: the temporary file's suffix; writers that pick the format from the extension need the real one
            (``".png"``, ``".nii.gz"``).
        staging_dir: create the temporary file in this folder instead of ``path``'s, for destinations watched
            by a scanner that must not see even a hidden partial file; it must be on the same file system
            (``os.replace`` cannot cross file systems).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if staging_dir is None:
        folder, prefix = path.parent, f".{path.name}."
    else:
        folder, prefix = Path(staging_dir), "partial-"
        folder.mkdir(parents=True, exist_ok=True)
    tmp, mode = _create_temporary(folder, prefix, suffix)
    try:
        yield str(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:  # a writer that re-created the file under another mode
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO]:
    """``open(path, mode)`` whose content replaces ``path`` atomically when the block ends without an error.

    Args:
        path: the destination.
        mode: ``"wb"`` or ``"w"`` (text; ``encoding`` defaults to UTF-8).
        encoding: text encoding for ``mode="w"``.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as handle:
        yield handle


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically; returns ``path``."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Replace ``path`` with ``text`` atomically; returns ``path``."""
    with atomic_open(path, "w", encoding=encoding) as handle:
        handle.write(text)
    return Path(path)
