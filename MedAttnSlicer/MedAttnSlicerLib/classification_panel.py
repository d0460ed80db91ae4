# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Classification part of the panel: per-class probabilities and the saliency heat map.
Slicer-side (``slicer``, Qt widgets): mixed into ``MedAttnSlicerWidget``.
"""

import slicer

from . import formatting, workflows
from .qt_tables import fillTable
from .scene_results import requireInScene

__all__ = ["ClassificationPanelMixin"]


class ClassificationPanelMixin:
    """Slots of the Classification section."""

    # ------------------------------------------------------------------ classification
    def onClassify(self):
        with self.userAction("Could not classify."):
            client = self.logic.requireClient()
            volumeNode = self._requireVolume()
            card = self.currentClsCard()
            sliceIndex = int(self.ui.sliceSpinBox.value)
            methodIndex = self.ui.explanationComboBox.currentIndex
            explain = card.explanations[methodIndex] if 0 <= methodIndex < len(card.explanations) else None
            jobDir = self._newJobDirectory()
            imageId, imageFile = self.logic.imageSource(volumeNode, jobDir)
            self.startJob(
                f"Classify with {card.name}",
                workflows.classify,
                client,
                card.name,
                image_id=imageId,
                image_file=imageFile,
                slice_index=None if sliceIndex < 0 else sliceIndex,
                dest_dir=jobDir,
                jobDir=jobDir,
                explain=explain,
                onFinished=lambda result: self.onClassified(result, volumeNode, card),
            )

    def onClassified(self, result, volumeNode, card):
        requireInScene(volumeNode, "input volume")
        rows = formatting.probability_rows(result.probabilities)
        fillTable(self.ui.probabilityTable, ["Class", "Probability", "Present"], rows)
        heatMapNode, heatMap = self.logic.showSaliency(
            result.label_path,
            volumeNode,
            result.explanation or "rise",
            result.params.get("slice"),
            float(self.ui.saliencyOpacitySlider.value),
        )
        self.parameters.lastHeatMap = heatMapNode
        self.ui.saliencyLabel.setText(formatting.saliency_text(heatMap, result.params))
        top = rows[0] if rows else ("-", "-", "-")
        self.showMessage(f"{card.name}: slice {result.params.get('slice', '?')}, most probable {top[0]} ({top[1]}).")

    def onSaliencyOpacityChanged(self, value):
        with self.userAction("Could not change the heat-map opacity."):
            compositeNodes = slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")
            for compositeNode in compositeNodes:
                compositeNode.SetForegroundOpacity(float(value))
