# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Scoring methods storing per-image figures in the datastore."""

from monailabel_app.lib.scoring.int8_agreement import Int8AgreementScoring
from monailabel_app.lib.scoring.over_under import OverUnderScoring

__all__ = ["Int8AgreementScoring", "OverUnderScoring"]
