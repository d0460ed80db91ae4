# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Cases of the module's self-test (``MedAttnSlicerTest`` in MedAttnSlicer.py runs them): the panel builds, its
state lives in the parameter node, results look and sit where they should, save as .seg.nrrd, and the user's scene
is left as it was. Needs Slicer, not a server (the extension build dashboards run none). Slicer-side.
"""

import os

import numpy as np
import qt
import slicer
import vtk

from .overlay import AGREEMENT, OVER_SEGMENTATION, SEGMENT_STYLES, UNDER_SEGMENTATION, overlay_from_masks

__all__ = ["SelfTestCases"]


class SelfTestCases:
    """Mixed into a ScriptedLoadableModuleTest that sets ``logicClass`` (MedAttnSlicerLogic)."""

    logicClass = None

    #: Widgets the panel code reaches through self.ui (tests/test_slicer_module_ui.py keeps the full table).
    UI_NAMES = (
        "serverComboBox",
        "usernameLineEdit",
        "passwordLineEdit",
        "connectButton",
        "segModelComboBox",
        "inputVolumeSelector",
        "segmentButton",
        "compareButton",
        "submitButton",
        "saveSegmentationButton",
        "exportDicomSegButton",
        "trainButton",
        "stopTrainButton",
        "classifyButton",
        "messageLabel",
    )

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (
            self.test_WidgetBuilds,
            self.test_ParameterNodeFollowsTheWidgets,
            self.test_UploadCopyLeavesVolumeAlone,
            self.test_ResultsFollowTransform,
            self.test_OverlayColours,
            self.test_SegmentationSavesAsSegNrrd,
            self.test_TemporaryNodesLeaveNothing,
        ):
            self.setUp()
            test()

    def _volume(self, name="input", saved=True):
        array = np.zeros((6, 8, 10), dtype=np.int16)
        array[2:4, 3:6, 4:8] = 100
        volumeNode = slicer.util.addVolumeFromArray(array, name=name)
        volumeNode.SetSpacing(0.8, 0.8, 2.0)
        if saved:  # like a volume the user loaded from disk: a storage node and nothing unsaved
            self.assertTrue(slicer.util.saveNode(volumeNode, os.path.join(slicer.util.tempDirectory(), "input.nrrd")))
        return volumeNode

    def test_WidgetBuilds(self):
        widget = slicer.util.getModuleWidget("MedAttnSlicer")
        for name in self.UI_NAMES:
            self.assertTrue(hasattr(widget.ui, name), name)
        self.assertFalse(widget.ui.segmentButton.enabled)  # not connected
        self.assertFalse(widget.ui.stopTrainButton.enabled)
        self.assertEqual(widget.ui.passwordLineEdit.echoMode, qt.QLineEdit.Password)

    def test_ParameterNodeFollowsTheWidgets(self):
        """The panel's state lives in the scene's parameter node: widgets write it, and it is saved with the scene."""
        widget = slicer.util.getModuleWidget("MedAttnSlicer")
        widget.initializeParameterNode()
        volumeNode = self._volume(saved=False)
        widget.ui.inputVolumeSelector.setCurrentNode(volumeNode)
        widget.ui.maxEpochsSpinBox.value = 7
        parameters = widget.logic.getParameterNode()
        self.assertEqual(parameters.inputVolume, volumeNode)
        self.assertEqual(parameters.maxEpochs, 7)
        self.assertTrue(slicer.mrmlScene.IsNodePresent(parameters.parameterNode))
        self.assertTrue(parameters.parameterNode.GetSaveWithScene())

    def test_UploadCopyLeavesVolumeAlone(self):
        volumeNode = self._volume()
        storageNode = volumeNode.GetStorageNode()
        fileName = storageNode.GetFileName()
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        logic = self.logicClass()
        try:
            jobDir = logic.newJobDirectory()
            imageId, path = logic.imageSource(volumeNode, jobDir)
            self.assertIsNone(imageId)
            self.assertTrue(os.path.isfile(path))
            self.assertIs(volumeNode.GetStorageNode(), storageNode)
            self.assertEqual(storageNode.GetFileName(), fileName)
            self.assertFalse(volumeNode.GetModifiedSinceRead())
            self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
            logic.removeJobDirectory(jobDir)
            self.assertFalse(os.path.exists(jobDir))
        finally:
            logic.cleanup()

    def test_ResultsFollowTransform(self):
        volumeNode = self._volume(saved=False)
        transformNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        matrix = vtk.vtkMatrix4x4()
        matrix.SetElement(0, 3, 25.0)
        transformNode.SetMatrixTransformToParent(matrix)
        logic = self.logicClass()
        try:
            for parent in (None, transformNode):
                volumeNode.SetAndObserveTransformNodeID(parent.GetID() if parent else None)
                labelPath = os.path.join(logic.newJobDirectory(), "label.nii.gz")
                labelNode = slicer.util.addVolumeFromArray(
                    (slicer.util.arrayFromVolume(volumeNode) > 0).astype(np.uint8),
                    nodeClassName="vtkMRMLLabelMapVolumeNode",
                )
                labelNode.CopyOrientation(volumeNode)
                self.assertTrue(slicer.util.exportNode(labelNode, labelPath, {}))
                logic.removeNode(labelNode)
                segmentationNode = logic.segmentationFromLabelFile(labelPath, volumeNode, None, "result")
                self.assertEqual(segmentationNode.GetTransformNodeID(), volumeNode.GetTransformNodeID())
        finally:
            logic.cleanup()

    def test_OverlayColours(self):
        volumeNode = self._volume(saved=False)
        prediction = slicer.util.arrayFromVolume(volumeNode) > 0
        reference = np.roll(prediction, 1, axis=2)
        overlay = overlay_from_masks(prediction, reference, self.logicClass.spacingOf(volumeNode))
        overlayNode = self.logicClass().showOverlay(overlay, volumeNode, "overlay")
        segmentation = overlayNode.GetSegmentation()
        styles = [SEGMENT_STYLES[value] for value in (AGREEMENT, OVER_SEGMENTATION, UNDER_SEGMENTATION)]
        expected = {name: color for name, color, *_ in styles}
        shown = {}
        for index in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(index)
            shown[segment.GetName()] = tuple(round(c, 3) for c in segment.GetColor())
        self.assertEqual(shown, {name: tuple(round(c, 3) for c in color) for name, color in expected.items()})

    def test_SegmentationSavesAsSegNrrd(self):
        """A result saved as .seg.nrrd opens again with its named, coloured segments (what the Segment Editor edits)."""
        volumeNode = self._volume(saved=False)
        labels = {"liver": 1, "tumour": 2}
        labelArray = (slicer.util.arrayFromVolume(volumeNode) > 0).astype(np.uint8)
        labelArray[3] *= 2
        logic = self.logicClass()
        try:
            labelNode = slicer.util.addVolumeFromArray(labelArray, nodeClassName="vtkMRMLLabelMapVolumeNode")
            labelNode.CopyOrientation(volumeNode)
            labelPath = os.path.join(logic.newJobDirectory(), "label.nii.gz")
            self.assertTrue(slicer.util.exportNode(labelNode, labelPath, {}))
            logic.removeNode(labelNode)
            segmentationNode = logic.segmentationFromLabelFile(labelPath, volumeNode, labels, "result")
            path = logic.saveSegmentation(segmentationNode, os.path.join(logic.newJobDirectory(), "result"))
            self.assertTrue(path.endswith(".seg.nrrd") and os.path.isfile(path))
            reloaded = slicer.util.loadSegmentation(path)
            segmentation, original = reloaded.GetSegmentation(), segmentationNode.GetSegmentation()
            self.assertEqual(segmentation.GetNumberOfSegments(), original.GetNumberOfSegments())
            for index in range(original.GetNumberOfSegments()):
                segment = original.GetNthSegment(index)
                again = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(segment.GetName()))
                self.assertIsNotNone(again, segment.GetName())
                self.assertEqual([round(c, 3) for c in again.GetColor()], [round(c, 3) for c in segment.GetColor()])
            self.assertFalse(logic.dicomInstanceUids(volumeNode))  # not from the DICOM database: no DICOM SEG
        finally:
            logic.cleanup()

    def test_TemporaryNodesLeaveNothing(self):
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        labelNode = slicer.util.addVolumeFromArray(
            np.ones((2, 3, 4), np.uint8), nodeClassName="vtkMRMLLabelMapVolumeNode"
        )
        labelNode.CreateDefaultDisplayNodes()
        labelNode.CreateDefaultStorageNode()
        self.assertGreater(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.logicClass.removeNode(labelNode)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)  # no orphan display/storage nodes
