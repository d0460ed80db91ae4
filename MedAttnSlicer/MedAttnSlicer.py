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
    DEFAULT_SERVER_URL,
    OVER_SEGMENTATION,
    SEGMENT_STYLES,
    SEGMENTATION,
    UNDER_SEGMENTATION,
    JobRunner,
    JobState,
    MedAttnClientError,
    MonaiLabelClient,
    OperationCancelled,
    ServerError,
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
POLL_INTERVAL_MS = 100

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
        self.tempDir = tempfile.mkdtemp(prefix="MedAttnSlicer-")

    def cleanup(self):
        """Cancel running jobs (stopping a training) and delete downloaded files."""
        self.runner.shutdown(timeout_s=5.0)
        shutil.rmtree(self.tempDir, ignore_errors=True)

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

    def writeVolume(self, volumeNode):
        """Save a volume as NIfTI in the temp folder (to send it to the server); returns the path."""
        path = os.path.join(self.tempDir, f"{_fileSafe(volumeNode.GetName())}-{int(time.time() * 1000)}.nii.gz")
        if not slicer.util.saveNode(volumeNode, path):
            raise MedAttnClientError(f"Could not write volume '{volumeNode.GetName()}' to {path}")
        return path

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
            segmentationNode = self._newSegmentationNode(name, volumeNode)
            for segment in segments:
                segmentId = segmentationNode.GetSegmentation().AddEmptySegment("", segment.name, list(segment.color))
                slicer.util.updateSegmentBinaryLabelmapFromArray(
                    (labelArray == segment.value).astype(np.uint8), segmentationNode, segmentId, labelNode
                )
        finally:
            _removeVolumeNode(labelNode)
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

    def showOverlay(self, overlay, geometryNode, name):
        """Agreement (white), Over-segmentation (green), Under-segmentation (red) as a segmentation node."""
        segmentationNode = self._newSegmentationNode(name, geometryNode)
        for segment in overlay.segments:
            segmentId = segmentationNode.GetSegmentation().AddEmptySegment("", segment.name, list(segment.color))
            slicer.util.updateSegmentBinaryLabelmapFromArray(
                segment.mask(overlay.comparison), segmentationNode, segmentId, geometryNode
            )
        displayNode = segmentationNode.GetDisplayNode()
        displayNode.SetOpacity2DFill(0.45)
        displayNode.SetOpacity2DOutline(1.0)
        return segmentationNode

    def exportSegmentationToLabelFile(self, segmentationNode, volumeNode, labels):
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
                self.tempDir, f"{_fileSafe(segmentationNode.GetName())}-{int(time.time() * 1000)}.nii.gz"
            )
            if not slicer.util.saveNode(labelNode, path):
                raise MedAttnClientError(f"Could not write the label map to {path}")
        finally:
            _removeVolumeNode(labelNode)
        return path

    def showSaliency(self, path, volumeNode, method="rise", sliceIndex=None, opacity=0.5):
        """The server's saliency map as a heat-map foreground over ``volumeNode``; jumps to its peak.

        MedAttnSlicerLib rescales the float map over the classified slice and turns it into colour-table
        indices (0 = not explained, kept transparent); here they only go into a volume and a colour node.
        Returns (heat-map volume node, HeatMap).
        """
        saliencyNode = slicer.util.loadVolume(path, {"name": f"{volumeNode.GetName()} saliency", "show": False})
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
        slicer.modules.markups.logic().JumpSlicesToLocation(ras[0], ras[1], ras[2], True)
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

    @staticmethod
    def _newSegmentationNode(name, geometryNode):
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(geometryNode)
        return segmentationNode


def _removeVolumeNode(volumeNode):
    if volumeNode is None or not slicer.mrmlScene.IsNodePresent(volumeNode):
        return
    storageNode = volumeNode.GetStorageNode()
    if storageNode:
        slicer.mrmlScene.RemoveNode(storageNode)
    slicer.mrmlScene.RemoveNode(volumeNode)


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
        self.pollTimer.setInterval(POLL_INTERVAL_MS)
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
    def startJob(self, name, function, *args, onFinished=None, **kwargs):
        """Run a foreground job (one at a time) with the shared progress bar and Cancel button."""
        if self._busy():
            raise MedAttnClientError(f"'{self.currentJob.name}' is still running; wait or press Cancel.")

        def finished(event):
            self._endJob()
            if onFinished is not None:
                onFinished(event.result)

        self.currentJob = self.logic.runner.submit(
            name,
            function,
            *args,
            on_progress=self.onJobProgress,
            on_finished=finished,
            on_failed=self.onJobFailed,
            on_cancelled=self.onJobCancelled,
            **kwargs,
        )
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.setRange(0, 0)  # busy until the first progress figure
        self.ui.jobStatusLabel.setText(f"{name}...")
        self.pollTimer.start()
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
    def _imageSource(self, volumeNode):
        """(image id, None) for datastore volumes, else (None, a NIfTI written for upload)."""
        imageId = self.logic.imageIdOf(volumeNode)
        return (imageId, None) if imageId else (None, self.logic.writeVolume(volumeNode))

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
        imageId, imageFile = self._imageSource(volumeNode)
        started = time.monotonic()
        self.startJob(
            f"Segment with {card.name}",
            workflows.segment,
            client,
            card.name,
            image_id=imageId,
            image_file=imageFile,
            dest_dir=self.logic.tempDir,
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
        self.startJob(
            f"Compare {card.name} with {reference}",
            workflows.compare_on_server,
            client,
            card.name,
            imageId,
            reference,
            dest_dir=self.logic.tempDir,
            onFinished=lambda result: self.onServerComparison(result, volumeNode, reference),
        )

    def onServerComparison(self, result, volumeNode, reference):
        _requireInScene(volumeNode, "input volume")
        overlay, labelNode = self.logic.overlayFromComparisonFile(result.label_path, result.comparison, reference)
        try:
            self.showComparison(overlay, labelNode, namePrefix=volumeNode.GetName())
        finally:
            _removeVolumeNode(labelNode)

    def showComparison(self, overlay, geometryNode, namePrefix=None):
        name = f"{namePrefix or geometryNode.GetName()} over-under vs {overlay.reference}"
        self.logic.showOverlay(overlay, geometryNode, name)
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
        labelPath = self.logic.exportSegmentationToLabelFile(segmentationNode, volumeNode, labels)
        imageId, imagePath = self._imageSource(volumeNode)
        self.startJob(
            "Submit label",
            workflows.submit_label,
            client,
            labelPath,
            image_id=imageId,
            image_path=imagePath,
            tag="final",
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
        )
        self.ui.trainProgressBar.setRange(0, 0)
        self.ui.trainStatusLabel.setText(f"Starting training '{task}'...")
        self.pollTimer.start()
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
            f"Scoring {method}", workflows.run_scoring, client, method, onFinished=lambda ds: self.onScored(ds, method)
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
        imageId, imageFile = self._imageSource(volumeNode)
        self.startJob(
            f"Classify with {card.name}",
            workflows.classify,
            client,
            card.name,
            image_id=imageId,
            image_file=imageFile,
            slice_index=None if sliceIndex < 0 else sliceIndex,
            dest_dir=self.logic.tempDir,
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
    """The whole annotation workflow inside Slicer against a running MedAttnSlicer server.

    Server URL: environment variable MEDATTN_SERVER_URL (default http://127.0.0.1:8000); start the
    server with ``make serve``. Mirrors tests/test_slicer_lib.py, with real nodes.
    """

    SEG_INT8 = "sadnn_seg_int8"
    SEG_FP32 = "sadnn_seg_fp32"
    CLS_INT8 = "sadnn_cls_int8"
    TRAIN_TASK = "sadnn_seg"

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_Workflow()

    def test_Workflow(self):
        url = os.environ.get("MEDATTN_SERVER_URL", DEFAULT_SERVER_URL)
        self.delayDisplay(f"Connecting to {url}")
        logic = MedAttnSlicerLogic()
        try:
            self._runWorkflow(logic, url)
        finally:
            logic.cleanup()
        self.delayDisplay("MedAttnSlicer workflow test passed")

    def _runWorkflow(self, logic, url):
        client = logic.setServer(url)
        logic.info = logic.runBlocking("connect", workflows.connect, client)
        segCards = {card.name: card for card in logic.modelCards(SEGMENTATION)}
        for name in (self.SEG_INT8, self.SEG_FP32):
            self.assertIn(name, segCards)
        self.assertEqual(segCards[self.SEG_INT8].precision, "int8")
        self.assertEqual(segCards[self.SEG_INT8].twin, self.SEG_FP32)
        self.assertIn("INT8", formatting.model_picker_text(segCards[self.SEG_INT8]))

        self.delayDisplay("Next sample")
        try:
            sample = logic.runBlocking("next", workflows.fetch_next_sample, client, "random", dest_dir=logic.tempDir)
        except MedAttnClientError:
            # every image is labelled already (e.g. a second run): the app's own strategy can pick among all
            sample = logic.runBlocking(
                "next", workflows.fetch_next_sample, client, "int8_disagreement", dest_dir=logic.tempDir,
                params={"images": "all", "max_slices": 8},
            )
        volumeNode = logic.loadImage(sample.image_path, sample.image_id)
        self.assertEqual(logic.imageIdOf(volumeNode), sample.image_id)

        segmentations = {}
        for name in (self.SEG_INT8, self.SEG_FP32):
            self.delayDisplay(f"Segment with {name}")
            result = logic.runBlocking(
                name, workflows.segment, client, name, image_id=sample.image_id, dest_dir=logic.tempDir
            )
            node = logic.segmentationFromLabelFile(result.label_path, volumeNode, segCards[name].labels, name)
            self.assertGreaterEqual(node.GetSegmentation().GetNumberOfSegments(), 1)
            segmentations[name] = node

        self.delayDisplay("Compare INT8 with FP32 in the scene and on the server")
        int8Node, fp32Node = segmentations[self.SEG_INT8], segmentations[self.SEG_FP32]
        local = logic.overlayFromSegments(
            int8Node, _firstSegmentId(int8Node), fp32Node, _firstSegmentId(fp32Node), volumeNode
        )
        self.assertTrue(0.0 <= local.dice <= 1.0)
        expectedColors = [SEGMENT_STYLES[v][1] for v in (AGREEMENT, OVER_SEGMENTATION, UNDER_SEGMENTATION)]
        self.assertEqual([segment.color for segment in local.segments], expectedColors)
        served = logic.runBlocking(
            "compare twin", workflows.compare_on_server, client, self.SEG_INT8, sample.image_id, self.SEG_FP32,
            dest_dir=logic.tempDir,
        )
        overlay, labelNode = logic.overlayFromComparisonFile(served.label_path, served.comparison, self.SEG_FP32)
        overlayNode = logic.showOverlay(overlay, labelNode, "over-under INT8 vs FP32")
        _removeVolumeNode(labelNode)
        self.assertEqual(overlayNode.GetSegmentation().GetNumberOfSegments(), 3)
        self.assertAlmostEqual(overlay.dice, float(served.comparison["dice"]), places=3)
        self.assertAlmostEqual(local.dice, overlay.dice, places=2)

        self.delayDisplay("Submit the FP32 segmentation as the final label")
        labelPath = logic.exportSegmentationToLabelFile(fp32Node, volumeNode, segCards[self.SEG_FP32].labels)
        answer = logic.runBlocking(
            "submit", workflows.submit_label, client, labelPath, image_id=sample.image_id, tag="final"
        )
        self.assertEqual(answer["image"], sample.image_id)
        final = logic.runBlocking(
            "compare final", workflows.compare_on_server, client, self.SEG_FP32, sample.image_id, "final",
            dest_dir=logic.tempDir,
        )
        self.assertGreater(float(final.comparison["dice"]), 0.99)

        self.delayDisplay("Train briefly, then stop")
        job = logic.runner.submit(
            "train", workflows.run_training, client, self.TRAIN_TASK, {"max_epochs": 50, "num_samples": 2},
            poll_interval_s=1.0,
        )
        deadline = time.monotonic() + 120.0
        while time.monotonic() < deadline and not job.done and job.message.find("epoch") < 0:
            slicer.app.processEvents()
            logic.runner.poll()
            time.sleep(0.1)
        job.cancel("Stopped by the module test.")
        logic.runner.wait(job, timeout_s=60.0)
        self.assertEqual(job.state, JobState.CANCELLED, job.message)
        self.assertIn("stopped on the server", job.message)
        self.assertIsNone(client.train_status(check_if_running=True))

        clsCard = {card.name: card for card in logic.modelCards(CLASSIFICATION)}[self.CLS_INT8]
        self.assertIn(clsCard.default_explanation, clsCard.explanations)
        for method in clsCard.explanations:  # every explanation the server offers (RISE when it lists none)
            self.delayDisplay(f"Classify with a {method} heat map")
            result = logic.runBlocking(
                "classify", workflows.classify, client, self.CLS_INT8, image_id=sample.image_id,
                dest_dir=logic.tempDir, explain=method, params={"rise_masks": 64},
            )
            self.assertEqual(result.explanation, method)
            rows = formatting.probability_rows(result.probabilities)
            self.assertEqual(len(rows), len(clsCard.labels))
            heatNode, heatMap = logic.showSaliency(result.label_path, volumeNode, method, result.params.get("slice"))
            heatArray = slicer.util.arrayFromVolume(heatNode)
            self.assertEqual(heatArray.shape, slicer.util.arrayFromVolume(volumeNode).shape)
            self.assertEqual(int(heatArray.max()), HEAT_MAP_COLORS - 1)
            self.assertEqual(heatMap.slice_index, result.params.get("slice"))
            self.assertEqual(heatNode.GetDisplayNode().GetColorNodeID(), logic.heatMapColorNode().GetID())
            for compositeNode in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"):  # every slice view
                self.assertEqual(compositeNode.GetForegroundVolumeID(), heatNode.GetID())
            self.assertIn(heatMap.title, formatting.saliency_text(heatMap, result.params))

        self.delayDisplay("Errors are readable")
        with self.assertRaises(ServerError) as raised:
            client.infer("no_such_model", image_id=sample.image_id)
        # docs/server_api.md: an unknown model is a 404 whose detail names it.
        self.assertEqual(raised.exception.status, 404)
        self.assertIn("no_such_model", formatting.error_text(raised.exception))


def _firstSegmentId(segmentationNode):
    return segmentationNode.GetSegmentation().GetNthSegmentID(0)
