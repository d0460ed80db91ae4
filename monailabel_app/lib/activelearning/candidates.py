# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Which images a strategy chooses from, and storing per-image figures in the datastore."""

from __future__ import annotations

from typing import Any

from monailabel.interfaces.datastore import Datastore

from monailabel_app.lib.errors import BadInputError

__all__ = ["candidate_images", "store_score"]


def candidate_images(request: dict[str, Any], datastore: Datastore) -> list[str]:
    """Image ids for ``request["images"]``: ``"unlabeled"`` (default: no ``final`` label), ``"labeled"`` or
    ``"all"``."""
    which = str(request.get("images") or "unlabeled").lower()
    if which == "unlabeled":
        return sorted(datastore.get_unlabeled_images())
    if which == "labeled":
        return sorted(datastore.get_labeled_images())
    if which == "all":
        return sorted(datastore.list_images())
    raise BadInputError(f"images must be 'unlabeled', 'labeled' or 'all', got {which!r}.")


def store_score(datastore: Datastore, image_id: str, method: str, figures: dict[str, Any]) -> None:
    """Save ``figures`` as the image info ``scores[method]``, keeping the other methods' scores."""
    if hasattr(datastore, "update_scores"):
        datastore.update_scores(image_id, method, figures)
        return
    scores = dict(datastore.get_image_info(image_id).get("scores") or {})
    scores[method] = figures
    datastore.update_image_info(image_id, {"scores": scores})
