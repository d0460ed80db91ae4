"""MedAttnSlicer: 3D Slicer panel for the MedAttnSlicer MONAI Label app.

Self-attentive networks (SaDNN, HCT, Scopeformer, PatchConvNet) served with INT8 inference on
ordinary CPUs. This file only draws and connects: server round trips, maths and text live in
MedAttnSlicerLib (importable and tested without Slicer); the Logic class moves data between the lib
and MRML nodes; the Widget wires Qt widgets to both.
"""

import functools
import inspect
import logging
import os
import shutil
import tempfile
import time
import traceback

import numpy as np
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from MedAttnSlicerLib import (
    AGREEMENT,
    CLASSIFICATION,
    IDLE_POLL_INTERVAL_MS,
    OVER_SEGMENTATION,
    SEGMENT_STYLES,
    SEGMENTATION,
    UNDER_SEGMENTATION,
    JobRunner,
    JobState,
    MedAttnClientError,
    MonaiLabelClient,
    OperationCancelled,
    ServerUrlHistory,
    compose_label_map,
    default_model,
    explanation_title,
    heat_map_colors,
    heat_map_from_saliency,
    heat_map_indices,
    model_cards,
    overlay_from_comparison_map,
    overlay_from_masks,
    split_label_map,
)
from MedAttnSlicerLib import formatting, workflows

SETTINGS_SERVER_URLS = "MedAttnSlicer/serverUrls"
IMAGE_ID_ATTRIBUTE = "MedAttnSlicer.ImageId"
MODEL_ATTRIBUTE = "MedAttnSlicer.Model"

#: (text in the Reference combo box, workflows choice)
REFERENCE_CHOICES = [
    ("Segment in the scene", workflows.REFERENCE_SEGMENT),
    ("Stored final label (server)", workflows.REFERENCE_FINAL),
    ("Twin model in the other precision, e.g. FP32 of INT8 (server)", workflows.REFERENCE_TWIN),
]

#: The heat-map colour node (cold-to-hot from MedAttnSlicerLib.heatmap; entry 0 = not explained, transparent).
HEAT_MAP_COLOR_NODE_NAME = "MedAttnSlicer heat map"
HEAT_MAP_COLORS = 256


#
# MedAttnSlicer
#


class MedAttnSlicer(ScriptedLoadableModule):
    """Module description shown by Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedAttnSlicer"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedAttnSlicer contributors"]
        self.parent.helpText = """
Segment and classify with self-attentive networks served by a MedAttnSlicer MONAI Label server,
with INT8 models that run on ordinary CPUs. Connect to the server, pick a model (precision,
parameters, file size and energy per pass are shown), load the next image chosen by active learning,
segment it, compare the result with a reference (over-segmentation green, under-segmentation red),
correct it and submit it as the final label, then train and score. Classification shows per-class
probabilities and a saliency heat map.
"""
        self.parent.acknowledgementText = """
Built on 3D Slicer, MONAI and MONAI Label. SaDNN after Sathish, Khare and Sheet (quantised
self-attentive deep neural networks).
"""


#
# MedAttnSlicerLogic
#


class MedAttnSlicerLogic(ScriptedLoadableModuleLogic):
    """Moves data between MedAttnSlicerLib and MRML nodes. Every method runs on the main thread."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.runner = JobRunner()
        self.client = None
        self.info = None
        # Slicer's temporary folder (Application Settings > General), not the system one. Images of
        # Next sample stay here after cleanup: the volumes loaded from them refer to these files.
        self.tempDir = slicer.util.tempDirectory("MedAttnSlicer-")
        self._jobDirs = set()

    def cleanup(self):
        """Stop following running jobs and delete their files.

        Server tasks (a training, a scoring run) keep running: closing Slicer or reloading the module
        must not end a task on a server other annotators may share. Only Stop training does that.
        """
        self.runner.shutdown(timeout_s=5.0)
        for directory in list(self._jobDirs):
            self.removeJobDirectory(directory)

    def newJobDirectory(self):
        """A folder for one job's uploads and downloads; remove it with removeJobDirectory when the job ends."""
        directory = tempfile.mkdtemp(prefix="job-", dir=self.tempDir)
        self._jobDirs.add(directory)
        return directory

    def removeJobDirectory(self, directory):
        shutil.rmtree(directory, ignore_errors=True)
        self._jobDirs.discard(directory)

    # ------------------------------------------------------------------ server
    def setServer(self, url):
        """Create the client for ``url`` (normalised); raises ValueError for a malformed URL."""
        self.client = MonaiLabelClient(url, download_dir=self.tempDir, client_id="slicer")
        self.info = None
        return self.client

    def requireClient(self):
        if self.client is None or self.info is None:
            raise MedAttnClientError("Not connected: enter the server URL and press Connect first.")
        return self.client

    def modelCards(self, task):
        if not self.info:
            return []
        return model_cards(self.info, task)

    def runBlocking(self, name, function, *args, timeout_s=1800.0, **kwargs):
        """Run a job to its end while keeping Slicer responsive (scripts and the module test).

        Returns the job's result; raises its error, or OperationCancelled.
        """
        job = self.runner.submit(name, function, *args, **kwargs)
        deadline = time.monotonic() + timeout_s
        while not job.done:
            if time.monotonic() > deadline:
                job.cancel(f"'{name}' took longer than {timeout_s:g} s")
                deadline = time.monotonic() + 30.0
            slicer.app.processEvents()
            self.runner.poll()
            time.sleep(0.02)
        if job.state == JobState.FAILED:
            raise job.error
        if job.state == JobState.CANCELLED:
            raise OperationCancelled(job.message)
        return job.result

    # ------------------------------------------------------------------ volumes
    def loadImage(self, path, imageId, name=None):
        """Load a downloaded datastore image, remember its id, show it."""
        volumeNode = slicer.util.loadVolume(path, {"name": name or imageId, "show": False})
        volumeNode.SetAttribute(IMAGE_ID_ATTRIBUTE, imageId)
        slicer.util.setSliceViewerLayers(background=volumeNode, foreground=None, fit=True)
        return volumeNode

    @staticmethod
    def imageIdOf(volumeNode):
        """Datastore id of a volume loaded by Next sample or submitted before, else None."""
        return volumeNode.GetAttribute(IMAGE_ID_ATTRIBUTE) if volumeNode else None

    def writeVolume(self, volumeNode, directory=None):
        """Write a copy of a volume as NIfTI (to send it to the server); returns the path.

        The node is left alone: saveNode would point the user's volume at this temporary file and mark
        it saved, so the next scene save would skip it and refer to a deleted file. exportNode writes
        through a temporary scene instead. Local (untransformed) coordinates: results are placed under
        the volume's parent transform (placeUnderTransformOf).
        """
        path = os.path.join(
            directory or self.tempDir, f"{_fileSafe(volumeNode.GetName())}-{int(time.time() * 1000)}.nii.gz"
        )
        # A fresh properties dict: exportNode stores the file format in it, and its default {} is shared.
        if not slicer.util.exportNode(volumeNode, path, {}, world=False):
            raise MedAttnClientError(f"Could not write volume '{volumeNode.GetName()}' to {path}")
        return path

    def imageSource(self, volumeNode, directory=None):
        """(image id, None) for datastore volumes, else (None, a NIfTI copy written for upload)."""
        imageId = self.imageIdOf(volumeNode)
        return (imageId, None) if imageId else (None, self.writeVolume(volumeNode, directory))

    @staticmethod
    def placeUnderTransformOf(node, sourceNode):
        """Put a result under the parent transform of the volume it was computed from.

        The server works in the volume's local coordinates, so results only line up with the volume
        when they share its transform (linear or not).
        """
        node.SetAndObserveTransformNodeID(sourceNode.GetTransformNodeID() if sourceNode is not None else None)
        return node

    @staticmethod
    def spacingOf(volumeNode):
        """Voxel spacing in numpy (K, J, I) axis order, as the lib expects."""
        return tuple(reversed(volumeNode.GetSpacing()))

    # ------------------------------------------------------------------ segmentations
    def segmentationFromLabelFile(self, labelPath, volumeNode, labels, name):
        """Load a server label map as a segmentation node, one named segment per model label."""
        labelNode = slicer.util.loadLabelVolume(labelPath, {"name": "__MedAttnSlicer_label__", "show": False})
        try:
            labelArray = slicer.util.arrayFromVolume(labelNode)
            segments = split_label_map(labelArray, labels, include_absent=True)
            segmentationNode = self._newSegmentationNode(name, volumeNode, volumeNode)
            for segment in segments:
                segmentId = segmentationNode.GetSegmentation().AddEmptySegment("", segment.name, list(segment.color))
                slicer.util.updateSegmentBinaryLabelmapFromArray(
                    (labelArray == segment.value).astype(np.uint8), segmentationNode, segmentId, labelNode
                )
        finally:
            self.removeNode(labelNode)
        return segmentationNode

    def overlayFromSegments(self, predictionNode, predictionSegmentId, referenceNode, referenceSegmentId, volumeNode):
        """Over/under overlay of two segments in the scene, on the grid of ``volumeNode``."""
        if not predictionNode or not predictionSegmentId:
            raise ValueError("Choose the prediction segment to compare.")
        if not referenceNode or not referenceSegmentId:
            raise ValueError("Choose the reference segment to compare with.")
        if volumeNode is None:
            raise ValueError("Choose the input volume (it sets the grid the segments are compared on).")
        if predictionNode == referenceNode and predictionSegmentId == referenceSegmentId:
            raise ValueError("The prediction and the reference are the same segment.")
        prediction = slicer.util.arrayFromSegmentBinaryLabelmap(predictionNode, predictionSegmentId, volumeNode)
        reference = slicer.util.arrayFromSegmentBinaryLabelmap(referenceNode, referenceSegmentId, volumeNode)
        referenceName = referenceNode.GetSegmentation().GetSegment(referenceSegmentId).GetName()
        return overlay_from_masks(
            prediction, reference, self.spacingOf(volumeNode), reference_name=f"segment '{referenceName}'"
        )

    def overlayFromComparisonFile(self, path, figures, referenceName):
        """Load the server's comparison map; returns (overlay, labelNode holding its geometry)."""
        labelNode = slicer.util.loadLabelVolume(path, {"name": "__MedAttnSlicer_comparison__", "show": False})
        overlay = overlay_from_comparison_map(
            slicer.util.arrayFromVolume(labelNode), self.spacingOf(labelNode), referenceName, figures
        )
        return overlay, labelNode

    def showOverlay(self, overlay, geometryNode, name, transformSource=None):
        """Agreement (white), Over-segmentation (green), Under-segmentation (red) as a segmentation node.

        Placed under the parent transform of ``transformSource`` (default ``geometryNode``).
        """
        segmentationNode = self._newSegmentationNode(name, geometryNode, transformSource or geometryNode)
        for segment in overlay.segments:
            segmentId = segmentationNode.GetSegmentation().AddEmptySegment("", segment.name, list(segment.color))
            slicer.util.updateSegmentBinaryLabelmapFromArray(
                segment.mask(overlay.comparison), segmentationNode, segmentId, geometryNode
            )
        displayNode = segmentationNode.GetDisplayNode()
        displayNode.SetOpacity2DFill(0.45)
        displayNode.SetOpacity2DOutline(1.0)
        return segmentationNode

    def exportSegmentationToLabelFile(self, segmentationNode, volumeNode, labels, directory=None):
        """Write every segment into one NIfTI label map on the volume's grid (model label values)."""
        if segmentationNode is None:
            raise ValueError("Choose the segmentation to submit.")
        if volumeNode is None:
            raise ValueError("Choose the input volume the segmentation belongs to.")
        segmentation = segmentationNode.GetSegmentation()
        masks = []
        for index in range(segmentation.GetNumberOfSegments()):
            segmentId = segmentation.GetNthSegmentID(index)
            masks.append(
                (
                    segmentation.GetSegment(segmentId).GetName(),
                    slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode),
                )
            )
        labelArray = compose_label_map(masks, labels)
        labelNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__MedAttnSlicer_export__")
        try:
            labelNode.CopyOrientation(volumeNode)
            slicer.util.updateVolumeFromArray(labelNode, labelArray)
            path = os.path.join(
                directory or self.tempDir, f"{_fileSafe(segmentationNode.GetName())}-{int(time.time() * 1000)}.nii.gz"
            )
            # saveNode is fine here: the label node is ours and removed right after.
            if not slicer.util.saveNode(labelNode, path):
                raise MedAttnClientError(f"Could not write the label map to {path}")
        finally:
            self.removeNode(labelNode)
        return path

    def showSaliency(self, path, volumeNode, method="rise", sliceIndex=None, opacity=0.5):
        """The server's saliency map as a heat-map foreground over ``volumeNode``; jumps to its peak.

        MedAttnSlicerLib rescales the float map over the classified slice and turns it into colour-table
        indices (0 = not explained, kept transparent); here they only go into a volume and a colour node.
        Returns (heat-map volume node, HeatMap).
        """
        saliencyNode = slicer.util.loadVolume(path, {"name": f"{volumeNode.GetName()} saliency", "show": False})
        # The file goes with its job folder: the node must not refer to it (a scene save then writes it anew).
        storageNode = saliencyNode.GetStorageNode()
        if storageNode is not None:
            saliencyNode.SetAndObserveStorageNodeID(None)
            slicer.mrmlScene.RemoveNode(storageNode)
        self.placeUnderTransformOf(saliencyNode, volumeNode)
        directions = vtk.vtkMatrix4x4()
        saliencyNode.GetIJKToRASDirectionMatrix(directions)
        direction = [directions.GetElement(row, column) for row in range(3) for column in range(3)]
        heatMap = heat_map_from_saliency(slicer.util.arrayFromVolume(saliencyNode), method, direction, sliceIndex)
        slicer.util.updateVolumeFromArray(saliencyNode, heat_map_indices(heatMap, HEAT_MAP_COLORS))
        saliencyNode.SetName(f"{volumeNode.GetName()} {explanation_title(heatMap.method)}")

        displayNode = saliencyNode.GetDisplayNode()
        displayNode.SetAndObserveColorNodeID(self.heatMapColorNode().GetID())
        displayNode.AutoWindowLevelOff()
        displayNode.SetWindowLevelMinMax(0, HEAT_MAP_COLORS - 1)
        displayNode.SetInterpolate(False)
        displayNode.AutoThresholdOff()
        displayNode.SetThreshold(0.5, HEAT_MAP_COLORS)  # index 0 (not explained) stays transparent
        displayNode.ApplyThresholdOn()
        slicer.util.setSliceViewerLayers(background=volumeNode, foreground=saliencyNode, foregroundOpacity=opacity)

        ijkToRas = vtk.vtkMatrix4x4()
        saliencyNode.GetIJKToRASMatrix(ijkToRas)
        ras = ijkToRas.MultiplyPoint([float(index) for index in reversed(heatMap.peak)] + [1.0])
        world = [0.0, 0.0, 0.0]
        saliencyNode.TransformPointToWorld(list(ras[:3]), world)  # slice views show world coordinates
        slicer.modules.markups.logic().JumpSlicesToLocation(world[0], world[1], world[2], True)
        return saliencyNode, heatMap

    @staticmethod
    def heatMapColorNode():
        """The cold-to-hot colour table of heat maps (created once per scene)."""
        colorNode = slicer.mrmlScene.GetFirstNodeByName(HEAT_MAP_COLOR_NODE_NAME)
        if colorNode is not None:
            return colorNode
        colorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", HEAT_MAP_COLOR_NODE_NAME)
        colorNode.SetTypeToUser()
        colorNode.HideFromEditorsOn()
        colors = heat_map_colors(HEAT_MAP_COLORS)
        colorNode.SetNumberOfColors(len(colors))
        for index, (red, green, blue, alpha) in enumerate(colors):
            colorNode.SetColor(index, str(index), float(red), float(green), float(blue), float(alpha))
        return colorNode

    @classmethod
    def _newSegmentationNode(cls, name, geometryNode, transformSource):
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(geometryNode)
        return cls.placeUnderTransformOf(segmentationNode, transformSource)

    @staticmethod
    def removeNode(node):
        """Remove a node we added (a temporary label map) with its display and storage nodes.

        Removing only the node would leave its display nodes in the scene as orphans.
        """
        if node is None or not slicer.mrmlScene.IsNodePresent(node):
            return
        helpers = [node.GetNthDisplayNode(index) for index in range(node.GetNumberOfDisplayNodes())]
        helpers.append(node.GetStorageNode())
        slicer.mrmlScene.RemoveNode(node)
        for helper in helpers:
            if helper is not None and slicer.mrmlScene.IsNodePresent(helper):
                slicer.mrmlScene.RemoveNode(helper)


def _fileSafe(text):
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in (text or "volume")) or "volume"


def _reportErrors(method):
    """Slot decorator: any exception becomes a readable message in the panel, never a bare traceback.

    Qt signals pass arguments (clicked(bool), currentIndexChanged(int)); only as many as the slot
    declares are forwarded.
    """
    parameters = list(inspect.signature(method).parameters.values())[1:]
    accepts = len([p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])

    @functools.wraps(method)
    def wrapper(self, *args):
        try:
            return method(self, *args[:accepts])
        except Exception as error:  # noqa: BLE001 - shown to the user
            self.showError(error, traceback.format_exc())
        return None

    return wrapper


#
# MedAttnSlicerWidget
#


class MedAttnSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Thin: reads widgets, starts lib jobs, shows their results through the Logic."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.ui = None
        self.currentJob = None
        self.trainJob = None
        self.urlHistory = None
        self.segCards = []
        self.clsCards = []
        self.pollTimer = None
        self._polling = False

    # ------------------------------------------------------------------ setup
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedAttnSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MedAttnSlicerLogic()
        self.logic.runner.callback_error_handler = lambda event, error: self.showError(
            error, "".join(traceback.format_exception(type(error), error, error.__traceback__))
        )
        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(IDLE_POLL_INTERVAL_MS)
        self.pollTimer.connect("timeout()", self.onPollTimer)

        self.urlHistory = ServerUrlHistory.from_setting(qt.QSettings().value(SETTINGS_SERVER_URLS))
        self.ui.serverComboBox.clear()
        self.ui.serverComboBox.addItems(self.urlHistory.urls)

        self.ui.referenceComboBox.clear()
        for text, _ in REFERENCE_CHOICES:
            self.ui.referenceComboBox.addItem(text)
        self._setupTable(self.ui.comparisonTable, ["Segment", "Voxels", "Volume"])
        self._setupTable(self.ui.probabilityTable, ["Class", "Probability", "Present"])
        self._setupTable(self.ui.scoresTable, formatting.score_headers("over_under"))
        self.ui.progressBar.setVisible(False)
        self.ui.trainProgressBar.setRange(0, 100)
        self.ui.trainProgressBar.setValue(0)

        self.ui.connectButton.clicked.connect(self.onConnect)
        self.ui.segModelComboBox.currentIndexChanged.connect(self.onSegModelChanged)
        self.ui.clsModelComboBox.currentIndexChanged.connect(self.onClsModelChanged)
        self.ui.nextSampleButton.clicked.connect(self.onNextSample)
        self.ui.segmentButton.clicked.connect(self.onSegment)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.referenceComboBox.currentIndexChanged.connect(self.onReferenceChanged)
        self.ui.compareButton.clicked.connect(self.onCompare)
        self.ui.submitButton.clicked.connect(self.onSubmit)
        self.ui.trainButton.clicked.connect(self.onTrain)
        self.ui.stopTrainButton.clicked.connect(self.onStopTrain)
        self.ui.scoreButton.clicked.connect(self.onScore)
        self.ui.classifyButton.clicked.connect(self.onClassify)
        self.ui.saliencyOpacitySlider.valueChanged.connect(self.onSaliencyOpacityChanged)
        self.ui.inputVolumeSelector.currentNodeChanged.connect(self.updateButtons)
        self.ui.predictionSegmentSelector.currentSegmentChanged.connect(self.updateButtons)
        self.ui.referenceSegmentSelector.currentSegmentChanged.connect(self.updateButtons)
        self.ui.submitSegmentationSelector.currentNodeChanged.connect(self.updateButtons)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.onReferenceChanged()
        self.updateButtons()

    def cleanup(self):
        if self.pollTimer:
            self.pollTimer.stop()
        if self.logic:
            self.logic.cleanup()
        self.removeObservers()

    def onSceneStartClose(self, caller, event):
        # Results of a running job would refer to nodes that are about to disappear.
        if self.currentJob is not None and not self.currentJob.done:
            self.currentJob.cancel("The scene was closed.")

    @staticmethod
    def _setupTable(table, headers):
        table.setColumnCount(len(headers))
        table.setHorizontalHeaderLabels(headers)
        table.setRowCount(0)
        table.horizontalHeader().setStretchLastSection(True)
        table.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)

    @staticmethod
    def _fillTable(table, headers, rows, colors=None):
        table.clearContents()
        table.setColumnCount(len(headers))
        table.setHorizontalHeaderLabels(headers)
        table.setRowCount(len(rows))
        for rowIndex, row in enumerate(rows):
            for columnIndex, text in enumerate(row):
                item = qt.QTableWidgetItem(str(text))
                if colors and columnIndex == 0 and colors[rowIndex] is not None:
                    r, g, b = colors[rowIndex]
                    item.setBackground(qt.QBrush(qt.QColor(int(255 * r), int(255 * g), int(255 * b))))
                    item.setForeground(qt.QBrush(qt.QColor("black")))
                table.setItem(rowIndex, columnIndex, item)
        table.resizeColumnsToContents()

    # ------------------------------------------------------------------ messages and state
    def showMessage(self, text):
        self.ui.messageLabel.setStyleSheet("")
        self.ui.messageLabel.setText(text)
        logging.info(f"MedAttnSlicer: {text}")

    def showError(self, error, details=""):
        text = formatting.error_text(error)
        self.ui.messageLabel.setStyleSheet("color: #c0392b;")
        self.ui.messageLabel.setText(text)
        logging.error(f"MedAttnSlicer: {text}\n{details}")
        if not isinstance(error, OperationCancelled):
            slicer.util.errorDisplay(text, windowTitle="MedAttnSlicer", detailedText=details or None)

    def _busy(self):
        return self.currentJob is not None and not self.currentJob.done

    def updateButtons(self, *unused):
        connected = self.logic is not None and self.logic.info is not None
        busy = self._busy()
        hasVolume = self.ui.inputVolumeSelector.currentNode() is not None
        choice = REFERENCE_CHOICES[max(0, self.ui.referenceComboBox.currentIndex)][1]
        localCompare = choice == workflows.REFERENCE_SEGMENT
        self.ui.connectButton.enabled = not busy
        self.ui.nextSampleButton.enabled = connected and not busy and self.ui.strategyComboBox.count > 0
        self.ui.segmentButton.enabled = connected and not busy and hasVolume and bool(self.segCards)
        self.ui.classifyButton.enabled = connected and not busy and hasVolume and bool(self.clsCards)
        self.ui.compareButton.enabled = (not busy) and hasVolume and (
            bool(self.ui.predictionSegmentSelector.currentSegmentID())
            and bool(self.ui.referenceSegmentSelector.currentSegmentID())
            if localCompare
            else connected and bool(self.segCards)
        )
        self.ui.submitButton.enabled = (
            connected and not busy and hasVolume and self.ui.submitSegmentationSelector.currentNode() is not None
        )
        self.ui.scoreButton.enabled = connected and not busy and self.ui.scoringMethodComboBox.count > 0
        training = self.trainJob is not None and not self.trainJob.done
        self.ui.trainButton.enabled = connected and not training and self.ui.trainTaskComboBox.count > 0
        self.ui.stopTrainButton.enabled = training
        self.ui.cancelButton.enabled = busy

    # ------------------------------------------------------------------ jobs
    def _requireIdle(self):
        if self._busy():
            raise MedAttnClientError(f"'{self.currentJob.name}' is still running; wait or press Cancel.")

    def _newJobDirectory(self):
        self._requireIdle()  # before creating anything a refused job would leave behind
        return self.logic.newJobDirectory()

    def _startPolling(self):
        # Often while data moves (each poll lends the GIL to the worker, see MedAttnSlicerLib.jobs), else relaxed.
        self.pollTimer.setInterval(self.logic.runner.poll_interval_ms)
        self.pollTimer.start()

    def startJob(self, name, function, *args, onFinished=None, jobDir=None, **kwargs):
        """Run a foreground job (one at a time) with the shared progress bar and Cancel button.

        ``jobDir`` (from _newJobDirectory) is removed when the job ends, after its results are loaded.
        """
        self._requireIdle()

        def release():
            if jobDir:
                self.logic.removeJobDirectory(jobDir)

        def finished(event):
            self._endJob()
            try:
                if onFinished is not None:
                    onFinished(event.result)
            finally:
                release()

        def failed(event):
            release()
            self.onJobFailed(event)

        def cancelled(event):
            release()
            self.onJobCancelled(event)

        self.currentJob = self.logic.runner.submit(
            name,
            function,
            *args,
            on_progress=self.onJobProgress,
            on_finished=finished,
            on_failed=failed,
            on_cancelled=cancelled,
            **kwargs,
        )
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.setRange(0, 0)  # busy until the first progress figure
        self.ui.jobStatusLabel.setText(f"{name}...")
        self._startPolling()
        self.updateButtons()
        return self.currentJob

    def _endJob(self):
        self.ui.progressBar.setVisible(False)
        self.ui.jobStatusLabel.setText("")
        self.updateButtons()

    def onPollTimer(self):
        # An error dialog opened by a callback runs a nested event loop in which this timer fires
        # again; the outer poll is still delivering, so the nested call does nothing.
        if self._polling:
            return
        self._polling = True
        try:
            self.logic.runner.poll()
        finally:
            self._polling = False
        if not self.logic.runner.busy:
            self.pollTimer.stop()
        else:
            self.pollTimer.setInterval(self.logic.runner.poll_interval_ms)
        self.updateButtons()

    def onJobProgress(self, event):
        if event.job is self.trainJob:
            return
        if event.fraction is None:
            self.ui.progressBar.setRange(0, 0)
        else:
            self.ui.progressBar.setRange(0, 100)
            self.ui.progressBar.setValue(int(round(100 * event.fraction)))
        if event.message:
            self.ui.jobStatusLabel.setText(event.message)

    def onJobFailed(self, event):
        self._endJob()
        self.showError(event.error, event.traceback)

    def onJobCancelled(self, event):
        self._endJob()
        self.showMessage(event.message or "Cancelled.")

    @_reportErrors
    def onCancel(self):
        if self._busy():
            self.currentJob.cancel()
            self.ui.jobStatusLabel.setText("Cancelling...")

    # ------------------------------------------------------------------ connect
    @_reportErrors
    def onConnect(self):
        url = self.urlHistory.add(self.ui.serverComboBox.currentText)
        client = self.logic.setServer(url)
        self.startJob("Connect", workflows.connect, client, onFinished=lambda info: self.onConnected(url, info))

    def onConnected(self, url, info):
        self.logic.info = info
        qt.QSettings().setValue(SETTINGS_SERVER_URLS, self.urlHistory.to_setting())
        self.ui.serverComboBox.clear()
        self.ui.serverComboBox.addItems(self.urlHistory.urls)
        self.ui.serverStatusLabel.setText(f"Connected to {url}")
        self.ui.appStatusLabel.setText(formatting.app_status_text(info))

        self.segCards = self.logic.modelCards(SEGMENTATION)
        self.clsCards = self.logic.modelCards(CLASSIFICATION)
        self._fillModelCombo(self.ui.segModelComboBox, self.segCards, SEGMENTATION)
        self._fillModelCombo(self.ui.clsModelComboBox, self.clsCards, CLASSIFICATION)
        self._fillCombo(self.ui.strategyComboBox, (info.get("strategies") or {}).keys())
        self._fillCombo(self.ui.trainTaskComboBox, (info.get("trainers") or {}).keys())
        self._fillCombo(self.ui.scoringMethodComboBox, (info.get("scoring") or {}).keys())
        self.onSegModelChanged()
        self.onClsModelChanged()
        self._showTrainStats(info)
        self.showMessage(f"Connected: {formatting.app_status_text(info)}")

    @staticmethod
    def _fillCombo(combo, names):
        combo.clear()
        combo.addItems(list(names))

    @staticmethod
    def _fillModelCombo(combo, cards, task):
        combo.clear()
        for card in cards:
            combo.addItem(formatting.model_picker_text(card))
            combo.setItemData(combo.count - 1, formatting.model_card_text(card), qt.Qt.ToolTipRole)
        chosen = default_model(cards, task)
        if chosen is not None:
            combo.setCurrentIndex(cards.index(chosen))

    def _showTrainStats(self, info):
        stats = info.get("train_stats") or {}
        task = self.ui.trainTaskComboBox.currentText
        if task and stats.get(task):
            self.ui.trainStatusLabel.setText(formatting.training_text(task, "last run", stats[task]))

    def currentSegCard(self):
        index = self.ui.segModelComboBox.currentIndex
        if not self.segCards or index < 0:
            raise MedAttnClientError("The server offers no segmentation model.")
        return self.segCards[index]

    def currentClsCard(self):
        index = self.ui.clsModelComboBox.currentIndex
        if not self.clsCards or index < 0:
            raise MedAttnClientError("The server offers no classification model.")
        return self.clsCards[index]

    @_reportErrors
    def onSegModelChanged(self):
        index = self.ui.segModelComboBox.currentIndex
        card = self.segCards[index] if 0 <= index < len(self.segCards) else None
        self.ui.segModelCardLabel.setText(formatting.model_card_text(card) if card else "")
        self.updateButtons()

    @_reportErrors
    def onClsModelChanged(self):
        index = self.ui.clsModelComboBox.currentIndex
        card = self.clsCards[index] if 0 <= index < len(self.clsCards) else None
        self.ui.clsModelCardLabel.setText(formatting.model_card_text(card) if card else "")
        # the methods this classifier offers (/info/ "explanations"; RISE when the server lists none)
        self.ui.explanationComboBox.clear()
        for method in card.explanations if card else []:
            self.ui.explanationComboBox.addItem(explanation_title(method))
        if card and card.default_explanation in card.explanations:
            self.ui.explanationComboBox.setCurrentIndex(card.explanations.index(card.default_explanation))
        self.updateButtons()

    # ------------------------------------------------------------------ active learning
    @_reportErrors
    def onNextSample(self):
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

    @_reportErrors
    def onSegment(self):
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
        _requireInScene(volumeNode, "input volume")
        segmentationNode = self.logic.segmentationFromLabelFile(
            result.label_path, volumeNode, card.labels, f"{volumeNode.GetName()} {card.name}"
        )
        segmentationNode.SetAttribute(MODEL_ATTRIBUTE, card.name)
        self.ui.predictionSegmentSelector.setCurrentNode(segmentationNode)
        self.ui.submitSegmentationSelector.setCurrentNode(segmentationNode)
        self.showMessage(f"Segmented with {card.name} ({card.precision.upper() or '?'}) in {seconds:.1f} s.")

    # ------------------------------------------------------------------ compare
    @_reportErrors
    def onReferenceChanged(self, *unused):
        choice = REFERENCE_CHOICES[max(0, self.ui.referenceComboBox.currentIndex)][1]
        self.ui.referenceSegmentSelector.setEnabled(choice == workflows.REFERENCE_SEGMENT)
        self.updateButtons()

    @_reportErrors
    def onCompare(self):
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
        _requireInScene(volumeNode, "input volume")
        overlay, labelNode = self.logic.overlayFromComparisonFile(result.label_path, result.comparison, reference)
        try:
            self.showComparison(overlay, labelNode, namePrefix=volumeNode.GetName(), transformSource=volumeNode)
        finally:
            self.logic.removeNode(labelNode)

    def showComparison(self, overlay, geometryNode, namePrefix=None, transformSource=None):
        name = f"{namePrefix or geometryNode.GetName()} over-under vs {overlay.reference}"
        self.logic.showOverlay(overlay, geometryNode, name, transformSource)
        self.ui.comparisonLabel.setText(formatting.comparison_text(overlay))
        rows = [(name_, voxels, volume) for name_, _, voxels, volume in formatting.comparison_rows(overlay)]
        colors = [color for _, color, _, _ in formatting.comparison_rows(overlay)]
        self._fillTable(self.ui.comparisonTable, ["Segment", "Voxels", "Volume"], rows, colors)
        self.showMessage(formatting.comparison_text(overlay))

    # ------------------------------------------------------------------ submit
    @_reportErrors
    def onSubmit(self):
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

    # ------------------------------------------------------------------ training
    @_reportErrors
    def onTrain(self):
        client = self.logic.requireClient()
        task = self.ui.trainTaskComboBox.currentText
        params = {"max_epochs": int(self.ui.maxEpochsSpinBox.value)}
        self.trainJob = self.logic.runner.submit(
            f"Train {task}",
            workflows.run_training,
            client,
            task,
            params,
            on_progress=self.onTrainProgress,
            on_finished=self.onTrainFinished,
            on_failed=self.onTrainEnded,
            on_cancelled=self.onTrainEnded,
            transfers=False,  # follows the server's training for minutes: relaxed polling
        )
        self.ui.trainProgressBar.setRange(0, 0)
        self.ui.trainStatusLabel.setText(f"Starting training '{task}'...")
        self._startPolling()
        self.updateButtons()

    @_reportErrors
    def onStopTrain(self):
        if self.trainJob is not None and not self.trainJob.done:
            self.trainJob.cancel("Training stopped by the user.")
            self.ui.trainStatusLabel.setText("Stopping training on the server...")

    def onTrainProgress(self, event):
        if event.fraction is None:
            self.ui.trainProgressBar.setRange(0, 0)
        else:
            self.ui.trainProgressBar.setRange(0, 100)
            self.ui.trainProgressBar.setValue(int(round(100 * event.fraction)))
        self.ui.trainStatusLabel.setText(event.message)

    def onTrainFinished(self, event):
        outcome = event.result
        self.ui.trainProgressBar.setRange(0, 100)
        self.ui.trainProgressBar.setValue(100)
        text = formatting.training_text(outcome.task, outcome.status, outcome.stats)
        self.ui.trainStatusLabel.setText(text)
        self.showMessage(f"Training finished: {text}. The server republished the FP32 and INT8 models.")
        self.updateButtons()

    def onTrainEnded(self, event):
        self.ui.trainProgressBar.setRange(0, 100)
        self.ui.trainProgressBar.setValue(0)
        if event.kind == "failed":
            self.ui.trainStatusLabel.setText(formatting.error_text(event.error))
            self.showError(event.error, event.traceback)
        else:
            self.ui.trainStatusLabel.setText(event.message)
            self.showMessage(event.message)
        self.updateButtons()

    # ------------------------------------------------------------------ scoring
    @_reportErrors
    def onScore(self):
        client = self.logic.requireClient()
        method = self.ui.scoringMethodComboBox.currentText
        self.ui.scoresSummaryLabel.setText(f"Scoring {method} on every image...")
        self.startJob(
            f"Scoring {method}",
            workflows.run_scoring,
            client,
            method,
            onFinished=lambda ds: self.onScored(ds, method),
            transfers=False,
        )

    def onScored(self, datastore, method):
        rows = formatting.score_rows(datastore, method)
        self._fillTable(self.ui.scoresTable, formatting.score_headers(method), rows)
        summary = formatting.score_summary_text(datastore, method)
        self.ui.scoresSummaryLabel.setText(summary)
        self.showMessage(f"Scoring done: {summary}.")

    # ------------------------------------------------------------------ classification
    @_reportErrors
    def onClassify(self):
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
        _requireInScene(volumeNode, "input volume")
        rows = formatting.probability_rows(result.probabilities)
        self._fillTable(self.ui.probabilityTable, ["Class", "Probability", "Present"], rows)
        _, heatMap = self.logic.showSaliency(
            result.label_path,
            volumeNode,
            result.explanation or "rise",
            result.params.get("slice"),
            float(self.ui.saliencyOpacitySlider.value),
        )
        self.ui.saliencyLabel.setText(formatting.saliency_text(heatMap, result.params))
        top = rows[0] if rows else ("-", "-", "-")
        self.showMessage(f"{card.name}: slice {result.params.get('slice', '?')}, most probable {top[0]} ({top[1]}).")

    @_reportErrors
    def onSaliencyOpacityChanged(self, value):
        compositeNodes = slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")
        for compositeNode in compositeNodes:
            compositeNode.SetForegroundOpacity(float(value))


def _requireInScene(node, what):
    if node is None or not slicer.mrmlScene.IsNodePresent(node):
        raise MedAttnClientError(f"The {what} was removed from the scene while the server was working.")


#
# MedAttnSlicerTest
#


class MedAttnSlicerTest(ScriptedLoadableModuleTest):
    """Self-test needing no server (CTest and Reload and Test): the panel builds, results look and sit
    where they should, and the user's scene is left as it was.

    The server workflow test is Testing/Python/MedAttnSlicerServerTest.py.
    """

    #: Widgets the panel code reaches through self.ui (tests/test_slicer_module_ui.py keeps the full table).
    UI_NAMES = ("serverComboBox", "connectButton", "segModelComboBox", "inputVolumeSelector", "segmentButton",
                "compareButton", "submitButton", "trainButton", "stopTrainButton", "classifyButton", "messageLabel")

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_WidgetBuilds, self.test_UploadCopyLeavesVolumeAlone, self.test_ResultsFollowTransform,
                     self.test_OverlayColours, self.test_TemporaryNodesLeaveNothing):
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

    def test_UploadCopyLeavesVolumeAlone(self):
        volumeNode = self._volume()
        storageNode = volumeNode.GetStorageNode()
        fileName = storageNode.GetFileName()
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        logic = MedAttnSlicerLogic()
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
        logic = MedAttnSlicerLogic()
        try:
            for parent in (None, transformNode):
                volumeNode.SetAndObserveTransformNodeID(parent.GetID() if parent else None)
                labelPath = os.path.join(logic.newJobDirectory(), "label.nii.gz")
                labelNode = slicer.util.addVolumeFromArray(
                    (slicer.util.arrayFromVolume(volumeNode) > 0).astype(np.uint8), nodeClassName="vtkMRMLLabelMapVolumeNode"
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
        overlay = overlay_from_masks(prediction, reference, MedAttnSlicerLogic.spacingOf(volumeNode))
        overlayNode = MedAttnSlicerLogic().showOverlay(overlay, volumeNode, "overlay")
        segmentation = overlayNode.GetSegmentation()
        expected = {SEGMENT_STYLES[v][0]: SEGMENT_STYLES[v][1] for v in (AGREEMENT, OVER_SEGMENTATION, UNDER_SEGMENTATION)}
        shown = {}
        for index in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(index)
            shown[segment.GetName()] = tuple(round(c, 3) for c in segment.GetColor())
        self.assertEqual(shown, {name: tuple(round(c, 3) for c in color) for name, color in expected.items()})

    def test_TemporaryNodesLeaveNothing(self):
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        labelNode = slicer.util.addVolumeFromArray(np.ones((2, 3, 4), np.uint8), nodeClassName="vtkMRMLLabelMapVolumeNode")
        labelNode.CreateDefaultDisplayNodes()
        labelNode.CreateDefaultStorageNode()
        self.assertGreater(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        MedAttnSlicerLogic.removeNode(labelNode)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)  # no orphan display/storage nodes
