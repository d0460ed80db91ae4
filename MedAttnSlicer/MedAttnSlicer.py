# Copyright MedAttnSlicer contributors. Apache-2.0.
"""MedAttnSlicer: 3D Slicer panel for the MedAttnSlicer MONAI Label app.

Self-attentive networks (SaDNN, HCT, Scopeformer, PatchConvNet) served with INT8 inference on ordinary CPUs.
Laid out like Slicer's scripted-module template: this file holds the module, the parameter node (the panel's state,
saved with the scene), the Logic (server connection, background jobs; MRML work in MedAttnSlicerLib.scene_results
and scene_export) and the Widget (setup, parameter node, jobs, connection); the panel's sections are in
MedAttnSlicerLib's *_panel modules. Server round trips, maths and text are Slicer-free MedAttnSlicerLib modules,
tested with plain pytest.

Needs Slicer 5.4 or newer (slicer.parameterNodeWrapper).
"""

import contextlib
import logging
import shutil
import tempfile
import time
import traceback
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:
    from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
except ImportError as error:  # Slicer 5.0-5.2
    raise ImportError("MedAttnSlicer needs Slicer 5.4 or newer (slicer.parameterNodeWrapper).") from error

from MedAttnSlicerLib import (
    IDLE_POLL_INTERVAL_MS,
    JobRunner,
    JobState,
    MedAttnClientError,
    MonaiLabelClient,
    OperationCancelled,
    ServerUrlHistory,
    formatting,
    model_cards,
    workflows,
)
from MedAttnSlicerLib.classification_panel import ClassificationPanelMixin
from MedAttnSlicerLib.qt_tables import fillCombo, setupTable
from MedAttnSlicerLib.scene_export import SceneExportMixin
from MedAttnSlicerLib.scene_results import HEAT_MAP_COLORS, IMAGE_ID_ATTRIBUTE, MODEL_ATTRIBUTE, SceneResultsMixin
from MedAttnSlicerLib.segmentation_panel import REFERENCE_CHOICES, SegmentationPanelMixin
from MedAttnSlicerLib.self_test import SelfTestCases
from MedAttnSlicerLib.server_panel import SETTINGS_SERVER_URLS, ServerPanelMixin
from MedAttnSlicerLib.training_panel import TrainingPanelMixin

#: Also what scripts and the server test import from here.
__all__ = [
    "MedAttnSlicer",
    "MedAttnSlicerLogic",
    "MedAttnSlicerParameterNode",
    "MedAttnSlicerWidget",
    "MedAttnSlicerTest",
    "HEAT_MAP_COLORS",
    "IMAGE_ID_ATTRIBUTE",
    "MODEL_ATTRIBUTE",
    "SETTINGS_SERVER_URLS",
]


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
with INT8 models that run on ordinary CPUs. Connect to the server (log in when it asks), pick a model
(precision, parameters, file size and energy per pass are shown), load the next image chosen by active
learning, segment it, compare the result with a reference (over-segmentation green, under-segmentation red),
correct it in the Segment Editor, submit it as the final label or save it (.seg.nrrd, DICOM SEG), then train
and score. Classification shows per-class probabilities and a saliency heat map.
"""
        self.parent.acknowledgementText = """
Built on 3D Slicer, MONAI and MONAI Label. SaDNN after Sathish, Khare and Sheet (quantised
self-attentive deep neural networks).
"""


#
# MedAttnSlicerParameterNode
#


@parameterNodeWrapper
class MedAttnSlicerParameterNode:
    """The panel's state, saved with the scene (server, models and reference by name; nodes by reference).

    serverUrl - the server last connected to (the log-in is never stored: the token lives in memory only).
    segmentationModel, classificationModel - chosen model names (selected again when the server offers them).
    reference - what Compare compares with: "segment", "final" or "twin".
    inputVolume, submitSegmentation - the volume worked on and the segmentation to submit or save.
    lastSegmentation, lastOverlay, lastHeatMap - the latest results.
    maxEpochs, sliceIndex, saliencyOpacity - training length, classified slice (-1: middle), heat-map opacity.
    """

    serverUrl: str = ""
    segmentationModel: str = ""
    classificationModel: str = ""
    reference: str = workflows.REFERENCE_SEGMENT
    inputVolume: vtkMRMLScalarVolumeNode
    submitSegmentation: vtkMRMLSegmentationNode
    lastSegmentation: vtkMRMLSegmentationNode
    lastOverlay: vtkMRMLSegmentationNode
    lastHeatMap: vtkMRMLScalarVolumeNode
    maxEpochs: Annotated[int, WithinRange(1, 1000)] = 10
    sliceIndex: Annotated[int, WithinRange(-1, 100000)] = -1
    saliencyOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5


#
# MedAttnSlicerLogic
#


class MedAttnSlicerLogic(ScriptedLoadableModuleLogic, SceneResultsMixin, SceneExportMixin):
    """Server connection, background jobs and results in the scene. Every method runs on the main thread,
    except the job functions (``connect``), which run in a worker."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.runner = JobRunner()
        self.client = None
        self.info = None
        # Slicer's temporary folder (Application Settings > General), not the system one. Images of
        # Next sample stay here after cleanup: the volumes loaded from them refer to these files.
        self.tempDir = slicer.util.tempDirectory("MedAttnSlicer-")
        self._jobDirs = set()

    def getParameterNode(self):
        return MedAttnSlicerParameterNode(super().getParameterNode())

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
        """Create the client for ``url`` (normalised; the previous log-in is dropped); ValueError when malformed."""
        self.client = MonaiLabelClient(url, download_dir=self.tempDir, client_id="slicer")
        self.info = None
        return self.client

    def connect(self, ctx, username="", password=""):
        """Job function: log in when the server asks for it, read ``/info/`` and keep it; returns it."""
        client = self.client
        if client is None:
            raise MedAttnClientError("Enter the server URL first.")
        info = workflows.connect(ctx, client, username, password)
        if client is self.client:  # not replaced by another Connect meanwhile
            self.info = info
        return info

    @property
    def loggedIn(self):
        return bool(self.client is not None and self.client.auth_token)

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
            time.sleep(0.005)
        if job.state == JobState.FAILED:
            raise job.error
        if job.state == JobState.CANCELLED:
            raise OperationCancelled(job.message)
        return job.result


#
# MedAttnSlicerWidget
#


class MedAttnSlicerWidget(
    ScriptedLoadableModuleWidget,
    VTKObservationMixin,
    ServerPanelMixin,
    SegmentationPanelMixin,
    TrainingPanelMixin,
    ClassificationPanelMixin,
):
    """The panel. Thin: reads widgets, starts lib jobs, shows their results through the Logic.

    The sections' slots live in MedAttnSlicerLib (server_panel, segmentation_panel, training_panel,
    classification_panel).
    """

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # parameter node and scene observation
        self.logic = None
        self.ui = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
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
        fillCombo(self.ui.serverComboBox, self.urlHistory.urls)
        fillCombo(self.ui.referenceComboBox, [text for text, _ in REFERENCE_CHOICES])
        setupTable(self.ui.comparisonTable, ["Segment", "Voxels", "Volume"])
        setupTable(self.ui.probabilityTable, ["Class", "Probability", "Present"])
        setupTable(self.ui.scoresTable, formatting.score_headers("over_under"))
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
        self.ui.saveSegmentationButton.clicked.connect(self.onSaveSegmentation)
        self.ui.exportDicomSegButton.clicked.connect(self.onExportDicomSeg)
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
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self):
        if self.pollTimer:
            self.pollTimer.stop()
        if self.logic:
            self.logic.cleanup()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        # Results of a running job would refer to nodes that are about to disappear.
        if self.currentJob is not None and not self.currentJob.done:
            self.currentJob.cancel("The scene was closed.")
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------ parameter node
    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        parameters = self._parameterNode
        if parameters.serverUrl:  # the server this scene was worked on
            self.ui.serverComboBox.setCurrentText(parameters.serverUrl)
        choices = [choice for _, choice in REFERENCE_CHOICES]
        if parameters.reference in choices:
            self.ui.referenceComboBox.setCurrentIndex(choices.index(parameters.reference))

    def setParameterNode(self, parameterNode):
        """Observe ``parameterNode`` and connect the widgets marked with SlicerParameterName in the .ui file."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self.updateButtons()

    @property
    def parameters(self):
        """The parameter node (created when the scene has none yet)."""
        if self._parameterNode is None:
            self.initializeParameterNode()
        return self._parameterNode

    # ------------------------------------------------------------------ messages and state
    @contextlib.contextmanager
    def userAction(self, failure):
        """A user's action (a slot): an error is shown by slicer.util.tryWithErrorDisplay (message box with
        details; none while Slicer runs tests) and in the panel's message line, and the slot returns."""
        try:
            with slicer.util.tryWithErrorDisplay(failure, waitCursor=True):
                yield
        except Exception as error:  # noqa: BLE001 - already shown; the slot must return to Qt
            self.ui.messageLabel.setStyleSheet("color: #c0392b;")
            self.ui.messageLabel.setText(f"{failure} {formatting.error_text(error)}")
            logging.error(f"MedAttnSlicer: {failure}\n{traceback.format_exc()}")

    def showMessage(self, text):
        self.ui.messageLabel.setStyleSheet("")
        self.ui.messageLabel.setText(text)
        logging.info(f"MedAttnSlicer: {text}")

    def showError(self, error, details=""):
        """A background job's error (its slot has long returned): panel line and message box."""
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
        volumeNode = self.ui.inputVolumeSelector.currentNode()
        hasVolume = volumeNode is not None
        hasSegmentation = self.ui.submitSegmentationSelector.currentNode() is not None
        choice = REFERENCE_CHOICES[max(0, self.ui.referenceComboBox.currentIndex)][1]
        localCompare = choice == workflows.REFERENCE_SEGMENT
        self.ui.connectButton.enabled = not busy
        self.ui.nextSampleButton.enabled = connected and not busy and self.ui.strategyComboBox.count > 0
        self.ui.segmentButton.enabled = connected and not busy and hasVolume and bool(self.segCards)
        self.ui.classifyButton.enabled = connected and not busy and hasVolume and bool(self.clsCards)
        self.ui.compareButton.enabled = (
            (not busy)
            and hasVolume
            and (
                bool(self.ui.predictionSegmentSelector.currentSegmentID())
                and bool(self.ui.referenceSegmentSelector.currentSegmentID())
                if localCompare
                else connected and bool(self.segCards)
            )
        )
        self.ui.submitButton.enabled = connected and not busy and hasVolume and hasSegmentation
        self.ui.saveSegmentationButton.enabled = hasSegmentation
        self.ui.exportDicomSegButton.enabled = hasSegmentation and bool(self.logic.dicomInstanceUids(volumeNode))
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

    def onCancel(self):
        with self.userAction("Could not cancel."):
            if self._busy():
                self.currentJob.cancel()
                self.ui.jobStatusLabel.setText("Cancelling...")


#
# MedAttnSlicerTest
#


class MedAttnSlicerTest(ScriptedLoadableModuleTest, SelfTestCases):
    """Self-test needing no server, run by CTest and Reload and Test; its cases are in MedAttnSlicerLib.self_test.
    The server workflow test is Testing/Python/MedAttnSlicerServerTest.py."""

    logicClass = MedAttnSlicerLogic
