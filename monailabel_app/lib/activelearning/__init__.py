# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Active-learning strategies beyond MONAI Label's ``random`` and ``first``."""

from monailabel_app.lib.activelearning.int8_disagreement import Int8Disagreement
from monailabel_app.lib.activelearning.tta_uncertainty import TTAUncertainty

__all__ = ["Int8Disagreement", "TTAUncertainty"]
