# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Atomic file writes of the network library: the project's one writer, :mod:`atomic_io` (temporary file in the
destination's folder with the mode ``open()`` gives, fsync, ``os.replace``, fsync of the folder).

It lives outside ``networks`` because torch-free packages (``sample_data``) use it too, and importing anything under
``networks`` imports torch.
"""

from atomic_io import atomic_open, atomic_path, atomic_write_bytes, atomic_write_text

__all__ = ["atomic_path", "atomic_open", "atomic_write_bytes", "atomic_write_text"]
