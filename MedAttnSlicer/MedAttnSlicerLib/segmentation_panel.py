# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Segmentation part of the panel: next sample, segment, compare with a reference, submit the label.
Slicer-side (``slicer``, Qt widgets): mixed into ``MedAttnSlicerWidget``, which provides ``self.ui``, ``self.logic``,
``startJob``, ``userAction``, ``showMessage`` and the model choice.
"""

import os
import time

import qt
import slicer

from . import formatting, workflows
from .qt_tables import fillTable
from .scene_export import SEGMENTATION_FILE_SUFFIX
from .scene_results import IMAGE_ID_ATTRIBUTE, MODEL_ATTRIBUTE, fileSafe, requireInScene

__all__ = ["SegmentationPanelMixin", "REFERENCE_CHOICES"]

#: (text in the Reference combo box, workflows choice)
REFERENCE_CHOICES = [
    ("Segment in the scene", workflows.REFERENCE_SEGMENT),
    ("Stored final label (server)", workflows.REFERENCE_FINAL),
    ("Twin model in the other precision, e.g. FP32 of INT8 (server)", workflows.REFERENCE_TWIN),
]


class SegmentationPanelMixin:
    """Slots of the Active learning, Segmentation, Compare and Submit/Save sections."""

    # ------------------------------------------------------------------ active learning
    def onNextSample(self):
        with self.userAction("Could not load the next sample."):
            client = self.logic.requireClient()
            strategy = self.ui.strategyComboBox.currentText
            self.startJob(
                f"Next sample ({strategy})",
                workflows.fetch_next_sample,
                client,
                strategy,
                dest_dir=self.logic.tempDir,
                onFinished=self.onSampleFetched,
            )

    def onSampleFetched(self, sample):
        volumeNode = self.logic.loadImage(sample.image_path, sample.image_id)
        self.ui.inputVolumeSelector.setCurrentNode(volumeNode)
        self.showMessage(f"Loaded '{sample.image_id}' chosen by '{sample.strategy}'.")

    # ------------------------------------------------------------------ segment
    def _requireVolume(self):
        volumeNode = self.ui.inputVolumeSelector.currentNode()
        if volumeNode is None:
            raise ValueError("Choose an input volume first (or press Next sample).")
        return volumeNode

    def onSegment(self):
        with self.userAction("Could not segment."):
            client = self.logic.requireClient()
            volumeNode = self._requireVolume()
            card = self.currentSegCard()
            jobDir = self._newJobDirectory()
            imageId, imageFile = self.logic.imageSource(volumeNode, jobDir)
            started = time.monotonic()
            self.startJob(
                f"Segment with {card.name}",
                workflows.segment,
                client,
                card.name,
                image_id=imageId,
                image_file=imageFile,
                dest_dir=jobDir,
                jobDir=jobDir,
                onFinished=lambda result: self.onSegmented(result, volumeNode, card, time.monotonic() - started),
            )

    def onSegmented(self, result, volumeNode, card, seconds):
        requireInScene(volumeNode, "input volume")
        segmentationNode = self.logic.segmentationFromLabelFile(
            result.label_path, volumeNode, card.labels, f"{volumeNode.GetName()} {card.name}"
        )
        segmentationNode.SetAttribute(MODEL_ATTRIBUTE, card.name)
        self.parameters.lastSegmentation = segmentationNode
        self.ui.predictionSegmentSelector.setCurrentNode(segmentationNode)
        self.ui.submitSegmentationSelector.setCurrentNode(segmentationNode)
        self.showMessage(f"Segmented with {card.name} ({card.precision.upper() or '?'}) in {seconds:.1f} s.")

    # ------------------------------------------------------------------ compare
    def onReferenceChanged(self, *unused):
        with self.userAction("Could not change the reference."):
            choice = REFERENCE_CHOICES[max(0, self.ui.referenceComboBox.currentIndex)][1]
            self.ui.referenceSegmentSelector.setEnabled(choice == workflows.REFERENCE_SEGMENT)
            if self._parameterNode is not None:
                self._parameterNode.reference = choice
            self.updateButtons()

    def onCompare(self):
        with self.userAction("Could not compare."):
            volumeNode = self._requireVolume()
            choice = REFERENCE_CHOICES[self.ui.referenceComboBox.currentIndex][1]
            if choice == workflows.REFERENCE_SEGMENT:
                overlay = self.logic.overlayFromSegments(
                    self.ui.predictionSegmentSelector.currentNode(),
                    self.ui.predictionSegmentSelector.currentSegmentID(),
                    self.ui.referenceSegmentSelector.currentNode(),
                    self.ui.referenceSegmentSelector.currentSegmentID(),
                    volumeNode,
                )
                self.showComparison(overlay, volumeNode)
                return
            client = self.logic.requireClient()
            card = self.currentSegCard()
            reference = workflows.server_reference(choice, card)
            imageId = self.logic.imageIdOf(volumeNode)
            if not imageId:
                raise ValueError(
                    "This volume is not in the server's datastore: load it with Next sample, or submit a label first."
                )
            jobDir = self._newJobDirectory()
            self.startJob(
                f"Compare {card.name} with {reference}",
                workflows.compare_on_server,
                client,
                card.name,
                imageId,
                reference,
                dest_dir=jobDir,
                jobDir=jobDir,
                onFinished=lambda result: self.onServerComparison(result, volumeNode, reference),
            )

    def onServerComparison(self, result, volumeNode, reference):
        requireInScene(volumeNode, "input volume")
        overlay, labelNode = self.logic.overlayFromComparisonFile(result.label_path, result.comparison, reference)
        try:
            self.showComparison(overlay, labelNode, namePrefix=volumeNode.GetName(), transformSource=volumeNode)
        finally:
            self.logic.removeNode(labelNode)

    def showComparison(self, overlay, geometryNode, namePrefix=None, transformSource=None):
        name = f"{namePrefix or geometryNode.GetName()} over-under vs {overlay.reference}"
        self.parameters.lastOverlay = self.logic.showOverlay(overlay, geometryNode, name, transformSource)
        self.ui.comparisonLabel.setText(formatting.comparison_text(overlay))
        rows = [(name_, voxels, volume) for name_, _, voxels, volume in formatting.comparison_rows(overlay)]
        colors = [color for _, color, _, _ in formatting.comparison_rows(overlay)]
        fillTable(self.ui.comparisonTable, ["Segment", "Voxels", "Volume"], rows, colors)
        self.showMessage(formatting.comparison_text(overlay))

    # ------------------------------------------------------------------ submit
    def onSubmit(self):
        with self.userAction("Could not submit the label."):
            client = self.logic.requireClient()
            volumeNode = self._requireVolume()
            segmentationNode = self.ui.submitSegmentationSelector.currentNode()
            labels = self._labelsFor(segmentationNode)
            jobDir = self._newJobDirectory()
            labelPath = self.logic.exportSegmentationToLabelFile(segmentationNode, volumeNode, labels, jobDir)
            imageId, imagePath = self.logic.imageSource(volumeNode, jobDir)
            self.startJob(
                "Submit label",
                workflows.submit_label,
                client,
                labelPath,
                image_id=imageId,
                image_path=imagePath,
                tag="final",
                jobDir=jobDir,
                onFinished=lambda answer: self.onSubmitted(answer, volumeNode),
            )

    def _labelsFor(self, segmentationNode):
        """Label names/values of the model that produced the segmentation (else the selected model)."""
        modelName = segmentationNode.GetAttribute(MODEL_ATTRIBUTE) if segmentationNode else None
        for card in self.segCards:
            if card.name == modelName:
                return card.labels
        return self.currentSegCard().labels if self.segCards else None

    def onSubmitted(self, answer, volumeNode):
        imageId = answer.get("image")
        if imageId and slicer.mrmlScene.IsNodePresent(volumeNode):
            volumeNode.SetAttribute(IMAGE_ID_ATTRIBUTE, imageId)
        self.showMessage(f"Saved the final label of '{imageId}'.")

    # ------------------------------------------------------------------ save
    def onSaveSegmentation(self):
        with self.userAction("Could not save the segmentation."):
            segmentationNode = self.ui.submitSegmentationSelector.currentNode()
            if segmentationNode is None:
                raise ValueError("Choose the segmentation to save.")
            fileName = fileSafe(segmentationNode.GetName()) + SEGMENTATION_FILE_SUFFIX
            suggested = os.path.join(slicer.app.defaultScenePath, fileName)
            path = qt.QFileDialog.getSaveFileName(
                slicer.util.mainWindow(), "Save segmentation", suggested, f"Segmentation (*{SEGMENTATION_FILE_SUFFIX})"
            )
            if path:  # empty when the user cancelled the dialog
                saved = self.logic.saveSegmentation(segmentationNode, path)
                self.showMessage(f"Saved '{segmentationNode.GetName()}' to {saved}.")

    def onExportDicomSeg(self):
        with self.userAction("Could not export DICOM SEG."):
            segmentationNode = self.ui.submitSegmentationSelector.currentNode()
            jobDir = self._newJobDirectory()
            try:  # the DICOM database keeps its own copy of the file
                self.logic.exportDicomSeg(segmentationNode, self._requireVolume(), jobDir)
            finally:
                self.logic.removeJobDirectory(jobDir)
            self.showMessage(f"Added '{segmentationNode.GetName()}' to the DICOM database as a DICOM SEG.")
