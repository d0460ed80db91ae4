# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Atomic file writes shared by every package of the project (standard library only: no torch, no numpy).

>>> with atomic_path("weights.pt") as tmp:
...     torch.save(state, tmp)                   # readers see the old file or the complete new one
>>> atomic_write_text("stats.json", json.dumps(stats))
"""

# writer.__all__ is the one list of the public names: re-export exactly those
from atomic_io.writer import *  # noqa: F403
from atomic_io.writer import __all__ as __all__
