# Copyright MedAttnSlicer contributors. Apache-2.0.
"""MedAttnSlicerLogic (MedAttnSlicer.py) run without Slicer, against a small stand-in for the MRML
scene and the few slicer.util calls it makes. The stand-in behaves like Slicer where it matters here:
saveNode points the node's storage node at the file and marks it saved; exportNode writes a copy and
leaves the node alone (Base/Python/slicer/util.py, v5.0.0-v5.12.0 and main)."""

import importlib.util
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from MedAttnSlicerLib import SLICER_SIDE_MODULES as SLICER_SIDE
from MedAttnSlicerLib import overlay_from_masks

MODULE_PY = Path(__file__).resolve().parents[1] / "MedAttnSlicer" / "MedAttnSlicer.py"


class Node:
    def __init__(self, scene, className, name=""):
        self.scene, self.className, self.name = scene, className, name
        self.id = None
        self.attributes = {}
        self.storageNodeId = None
        self.transformNodeId = None
        self.displayNodeIds = []
        self.modifiedSinceRead = True
        self.fileName = None
        self.array = None
        self.ijkToRas = np.eye(4)
        self.segments = []  # (id, name, colour) of a segmentation node

    # names, attributes, references
    def GetID(self):
        return self.id

    def GetName(self):
        return self.name

    def SetName(self, name):
        self.name = name

    def SetAttribute(self, key, value):
        self.attributes[key] = value

    def GetAttribute(self, key):
        return self.attributes.get(key)

    def GetStorageNode(self):
        return self.scene.GetNodeByID(self.storageNodeId)

    def SetAndObserveStorageNodeID(self, nodeId):
        self.storageNodeId = nodeId

    def GetModifiedSinceRead(self):
        return self.modifiedSinceRead

    def GetFileName(self):
        return self.fileName

    def GetTransformNodeID(self):
        return self.transformNodeId

    def SetAndObserveTransformNodeID(self, nodeId):
        self.transformNodeId = nodeId
        return True

    def GetNumberOfDisplayNodes(self):
        return len(self.displayNodeIds)

    def GetNthDisplayNode(self, n):
        return self.scene.GetNodeByID(self.displayNodeIds[n])

    def GetDisplayNode(self):
        return self.GetNthDisplayNode(0) if self.displayNodeIds else None

    def CreateDefaultDisplayNodes(self):
        if not self.displayNodeIds:
            self.displayNodeIds.append(self.scene.AddNewNodeByClass(self.className + "Display").GetID())

    # volume geometry
    def GetSpacing(self):
        return tuple(np.linalg.norm(self.ijkToRas[:3, :3], axis=0))

    def CopyOrientation(self, other):
        self.ijkToRas = other.ijkToRas.copy()

    def GetIJKToRASMatrix(self, matrix):
        matrix.m = self.ijkToRas.copy()

    def GetIJKToRASDirectionMatrix(self, matrix):
        matrix.m = np.eye(4)
        matrix.m[:3, :3] = self.ijkToRas[:3, :3] / np.linalg.norm(self.ijkToRas[:3, :3], axis=0)

    def TransformPointToWorld(self, local, world):
        offset = self.scene.GetNodeByID(self.transformNodeId).offset if self.transformNodeId else np.zeros(3)
        world[:] = list(np.asarray(local, float) + offset)

    # segmentation node: it is its own vtkSegmentation here
    def GetSegmentation(self):
        return self

    def SetReferenceImageGeometryParameterFromVolumeNode(self, node):
        pass

    def GetNumberOfSegments(self):
        return len(self.segments)

    def GetNthSegmentID(self, n):
        return self.segments[n][0]

    def GetSegment(self, segmentId):
        return types.SimpleNamespace(GetName=lambda: dict((s[0], s[1]) for s in self.segments)[segmentId])

    def AddEmptySegment(self, segmentId, name, color):
        self.segments.append((f"segment_{len(self.segments)}", name, tuple(color)))
        return self.segments[-1][0]

    def __getattr__(self, name):  # display and colour settings the tests do not look at
        if name[:1].isupper():
            return lambda *args, **kwargs: None
        raise AttributeError(name)


class Scene:
    def __init__(self):
        self.nodes = {}
        self.count = 0

    def AddNewNodeByClass(self, className, name=""):
        self.count += 1
        node = Node(self, className, name)
        node.id = f"{className}{self.count}"
        self.nodes[node.id] = node
        return node

    def GetNodeByID(self, nodeId):
        return self.nodes.get(nodeId) if nodeId else None

    def IsNodePresent(self, node):
        return node is not None and self.nodes.get(node.id) is node

    def RemoveNode(self, node):
        self.nodes.pop(node.id, None)

    def GetFirstNodeByName(self, name):
        return next((n for n in self.nodes.values() if n.name == name), None)


class Util:
    """The slicer.util functions the Logic calls."""

    def __init__(self, scene, tmp_path):
        self.scene, self.tmp_path, self.jumps = scene, tmp_path, []

    def tempDirectory(self, key="__SlicerTemp__"):
        path = self.tmp_path / (key + "dated")
        path.mkdir(exist_ok=True)
        return str(path)

    def _write(self, node, filename):
        with open(filename, "wb") as f:  # np.save(path) would append ".npy"
            np.save(f, node.array)
        return True

    def saveNode(self, node, filename, properties={}):  # noqa: B006 - Slicer's signature
        # Slicer: the node's storage node now points at ``filename`` and the node counts as saved.
        storage = node.GetStorageNode() or self.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.fileName = filename
        node.storageNodeId, node.modifiedSinceRead = storage.id, False
        return self._write(node, filename)

    def exportNode(self, node, filename, properties={}, world=False):  # noqa: B006 - Slicer's signature
        assert properties == {}, "pass a fresh dict: exportNode stores the file format in it"
        return self._write(node, filename)

    def _load(self, className, filename, properties):
        node = self.scene.AddNewNodeByClass(className, properties.get("name", ""))
        node.array = np.load(filename)
        storage = self.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.fileName, node.storageNodeId, node.modifiedSinceRead = filename, storage.id, False
        node.CreateDefaultDisplayNodes()
        return node

    def loadLabelVolume(self, filename, properties={}):  # noqa: B006
        return self._load("vtkMRMLLabelMapVolumeNode", filename, properties)

    def loadVolume(self, filename, properties={}):  # noqa: B006
        return self._load("vtkMRMLScalarVolumeNode", filename, properties)

    def arrayFromVolume(self, node):
        return node.array

    def updateVolumeFromArray(self, node, array):
        node.array, node.modifiedSinceRead = np.asarray(array), True

    def updateSegmentBinaryLabelmapFromArray(self, array, segmentationNode, segmentId, reference):
        pass

    def arrayFromSegmentBinaryLabelmap(self, segmentationNode, segmentId, reference):
        return reference.array > 0

    def setSliceViewerLayers(self, **kwargs):
        pass


class Matrix4x4:
    def __init__(self):
        self.m = np.eye(4)

    def GetElement(self, row, column):
        return self.m[row, column]

    def MultiplyPoint(self, point):
        return tuple(self.m @ np.asarray(point, float))


class SubjectHierarchy:
    """vtkMRMLSubjectHierarchyNode: items are data nodes here; a volume's parent item is its study."""

    def __init__(self):
        self.parents = {}

    def GetItemByDataNode(self, node):
        return node

    def GetItemParent(self, item):
        return self.parents.get(item.id, f"study of {item.name}")

    def SetItemParent(self, item, parent):
        self.parents[item.id] = parent


class DicomDatabase:
    def __init__(self, files):
        self.files, self.isOpen = files, True

    def fileForInstance(self, uid):
        return self.files.get(uid, "")


class ParameterNode:
    """What slicer.parameterNodeWrapper gives: typed attributes over ScriptedLoadableModuleLogic's parameter node.
    The stand-in keeps the annotated defaults; node-typed attributes start as None."""

    def __init__(self, wrapped_class):
        for name in wrapped_class.__annotations__:
            setattr(self, name, getattr(wrapped_class, name, None))


def _parameter_node_wrapper(cls):
    def make(parameterNode):
        return ParameterNode(cls)

    make.__annotations__ = dict(cls.__annotations__)
    make.wrapped_class = cls
    return make


@pytest.fixture
def slicer_standin(tmp_path, monkeypatch):
    """Import MedAttnSlicer.py with stand-ins for slicer, qt and vtk; returns (module, scene, util)."""
    scene = Scene()
    util = Util(scene, tmp_path)
    markups = types.SimpleNamespace(
        logic=lambda: types.SimpleNamespace(JumpSlicesToLocation=lambda *a: util.jumps.append(a[:3]))
    )
    base = type("Base", (), {"__init__": lambda self, *args: None, "getParameterNode": lambda self: None})
    slicer = types.ModuleType("slicer")
    slicer.mrmlScene, slicer.util, slicer.modules = scene, util, types.SimpleNamespace(markups=markups)
    slicer.vtkMRMLScalarVolumeNode = type("vtkMRMLScalarVolumeNode", (), {})
    slicer.vtkMRMLSegmentationNode = type("vtkMRMLSegmentationNode", (), {})
    slicer.subjectHierarchy = SubjectHierarchy()
    slicer.vtkMRMLSubjectHierarchyNode = types.SimpleNamespace(
        GetSubjectHierarchyNode=lambda scene_: slicer.subjectHierarchy
    )
    slicer.dicomDatabase = DicomDatabase({})
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in (
        "ScriptedLoadableModule",
        "ScriptedLoadableModuleLogic",
        "ScriptedLoadableModuleTest",
        "ScriptedLoadableModuleWidget",
    ):
        setattr(scripted, name, type(name, (base,), {}))
    utilModule = types.ModuleType("slicer.util")
    utilModule.VTKObservationMixin = type("VTKObservationMixin", (base,), {})
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = _parameter_node_wrapper
    wrapper.WithinRange = lambda low, high: ("WithinRange", low, high)
    vtk = types.ModuleType("vtk")
    vtk.vtkMatrix4x4 = Matrix4x4
    for name, module in {
        "slicer": slicer,
        "slicer.ScriptedLoadableModule": scripted,
        "slicer.util": utilModule,
        "slicer.parameterNodeWrapper": wrapper,
        "qt": types.ModuleType("qt"),
        "vtk": vtk,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    # The Slicer-side modules of MedAttnSlicerLib bind slicer/qt/vtk when imported: import them afresh.
    for name in [n for n in sys.modules if n.startswith("MedAttnSlicerLib.")]:
        if name.split(".")[1] in SLICER_SIDE:
            monkeypatch.delitem(sys.modules, name)
    spec = importlib.util.spec_from_file_location("MedAttnSlicer_under_test", MODULE_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, scene, util


def _user_volume(scene, util, tmp_path, transform=None):
    """A volume as the user loaded it from disk: a storage node, nothing unsaved, maybe under a transform."""
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "patient CT")
    volume.array = np.zeros((4, 5, 6), np.int16)
    volume.array[1:3, 2:4, 2:5] = 7
    volume.ijkToRas = np.diag([0.8, 0.8, 2.0, 1.0])
    util.saveNode(volume, str(tmp_path / "patient.nrrd"))
    volume.CreateDefaultDisplayNodes()
    if transform is not None:
        volume.SetAndObserveTransformNodeID(transform.GetID())
    return volume


def _label_file(path, volume):
    with open(path, "wb") as f:
        np.save(f, (volume.array > 0).astype(np.uint8))
    return str(path)


def _saliency_file(path, volume):
    saliency = np.zeros(volume.array.shape, np.float32)
    saliency[1] = np.linspace(0.0, 1.0, saliency[1].size).reshape(saliency[1].shape)  # axial slice 1 only
    with open(path, "wb") as f:
        np.save(f, saliency)
    return str(path)


def _storage_state(volume):
    storage = volume.GetStorageNode()
    return storage.GetID(), storage.GetFileName(), volume.GetModifiedSinceRead()


def test_segment_classify_submit_leave_the_users_volume_alone(slicer_standin, tmp_path):
    module, scene, util = slicer_standin
    logic = module.MedAttnSlicerLogic()
    volume = _user_volume(scene, util, tmp_path)
    before = _storage_state(volume)
    assert before == (volume.storageNodeId, str(tmp_path / "patient.nrrd"), False)

    # Segment: upload a copy, load the returned label map as a segmentation.
    jobDir = logic.newJobDirectory()
    imageId, upload = logic.imageSource(volume, jobDir)
    assert imageId is None and np.array_equal(np.load(upload), volume.array)
    logic.segmentationFromLabelFile(_label_file(Path(jobDir) / "label.npy", volume), volume, None, "seg")
    assert _storage_state(volume) == before
    # Classify: upload a copy, show the saliency map.
    _, upload = logic.imageSource(volume, jobDir)
    saliency, _ = logic.showSaliency(_saliency_file(Path(jobDir) / "saliency.npy", volume), volume, "rise", 1)
    assert _storage_state(volume) == before
    assert saliency.GetStorageNode() is None  # the result does not refer to a job file that is deleted next
    # Submit: the segmentation as a label file, plus the image copy.
    segmentation = scene.GetFirstNodeByName("seg")
    labelPath = logic.exportSegmentationToLabelFile(segmentation, volume, None, jobDir)
    _, upload = logic.imageSource(volume, jobDir)
    assert os.path.isfile(labelPath) and os.path.isfile(upload)
    assert _storage_state(volume) == before

    logic.removeJobDirectory(jobDir)
    assert not os.path.exists(jobDir)  # each job's files go when the job ends
    assert os.path.isfile(tmp_path / "patient.nrrd")


@pytest.mark.parametrize("transformed", [False, True])
def test_results_sit_under_the_volumes_parent_transform(slicer_standin, tmp_path, transformed):
    module, scene, util = slicer_standin
    logic = module.MedAttnSlicerLogic()
    transform = None
    if transformed:
        transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
        transform.offset = np.array([25.0, 0.0, -4.0])
    volume = _user_volume(scene, util, tmp_path, transform)
    expected = transform.GetID() if transformed else None

    segmentation = logic.segmentationFromLabelFile(_label_file(tmp_path / "label.npy", volume), volume, None, "seg")
    assert segmentation.GetTransformNodeID() == expected

    prediction = volume.array > 0
    overlay = overlay_from_masks(prediction, np.roll(prediction, 1, axis=2), logic.spacingOf(volume))
    assert logic.showOverlay(overlay, volume, "overlay").GetTransformNodeID() == expected
    comparisonGeometry = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "comparison")  # server map, untransformed
    assert logic.showOverlay(overlay, comparisonGeometry, "served", volume).GetTransformNodeID() == expected

    saliency, heatMap = logic.showSaliency(_saliency_file(tmp_path / "saliency.npy", volume), volume, "rise", 1)
    assert saliency.GetTransformNodeID() == expected
    local = saliency.ijkToRas @ np.array([*reversed(heatMap.peak), 1.0])
    offset = transform.offset if transformed else np.zeros(3)
    assert util.jumps[-1] == pytest.approx(tuple(local[:3] + offset))  # slice views jump in world coordinates


def test_remove_node_takes_its_display_and_storage_nodes(slicer_standin, tmp_path):
    module, scene, util = slicer_standin
    volume = _user_volume(scene, util, tmp_path)
    before = set(scene.nodes)
    label = util.loadLabelVolume(_label_file(tmp_path / "label.npy", volume), {"name": "temporary"})
    assert label.GetNumberOfDisplayNodes() == 1 and label.GetStorageNode() is not None
    module.MedAttnSlicerLogic.removeNode(label)
    assert set(scene.nodes) == before, f"left behind: {sorted(set(scene.nodes) - before)}"


def test_temporary_files_live_in_slicers_temp_folder(slicer_standin, tmp_path):
    module, scene, util = slicer_standin
    logic = module.MedAttnSlicerLogic()
    assert logic.tempDir == util.tempDirectory("MedAttnSlicer-")
    jobs = [logic.newJobDirectory() for _ in range(2)]
    assert all(Path(job).parent == Path(logic.tempDir) for job in jobs) and jobs[0] != jobs[1]
    logic.cleanup()  # removes what a job still held when the module closed
    assert not any(os.path.exists(job) for job in jobs)


def test_parameter_node_holds_the_panel_state(slicer_standin):
    """Server URL, model choices, reference, input volume and the last results live in the scene's parameter node."""
    module, scene, util = slicer_standin
    fields = module.MedAttnSlicerParameterNode.__annotations__
    for name in (
        "serverUrl",
        "segmentationModel",
        "classificationModel",
        "reference",
        "inputVolume",
        "submitSegmentation",
        "lastSegmentation",
        "lastOverlay",
        "lastHeatMap",
    ):
        assert name in fields, name
    parameters = module.MedAttnSlicerLogic().getParameterNode()
    assert parameters.reference == "segment" and parameters.inputVolume is None and parameters.serverUrl == ""


def test_save_segmentation_as_seg_nrrd(slicer_standin, tmp_path):
    module, scene, util = slicer_standin
    logic = module.MedAttnSlicerLogic()
    volume = _user_volume(scene, util, tmp_path)
    segmentation = logic.segmentationFromLabelFile(_label_file(tmp_path / "label.npy", volume), volume, None, "seg")
    path = logic.saveSegmentation(segmentation, str(tmp_path / "liver result"))
    assert path == str(tmp_path / "liver result.seg.nrrd") and os.path.isfile(path)
    assert segmentation.GetStorageNode().GetFileName() == path  # saved as the user asked: the node refers to it
    assert logic.saveSegmentation(segmentation, str(tmp_path / "b.seg.nrrd")).endswith("b.seg.nrrd")
    with pytest.raises(ValueError, match="does not exist"):
        logic.saveSegmentation(segmentation, str(tmp_path / "missing" / "c.seg.nrrd"))
    with pytest.raises(ValueError, match="Choose the segmentation"):
        logic.saveSegmentation(None, str(tmp_path / "d"))


class _DicomSegPlugin:
    """Slicer's DICOMSegmentationPlugin as far as the Logic uses it (examineForExport, exportable.directory, export)."""

    def __init__(self, error=""):
        self.error, self.exported = error, []

    def module(self):
        plugin = self

        class DICOMSegmentationPluginClass:
            def examineForExport(self, item):
                return [types.SimpleNamespace(subjectHierarchyItemID=item, directory=None)]

            def export(self, exportables):
                plugin.exported.extend(exportables)
                return plugin.error

        return types.SimpleNamespace(DICOMSegmentationPluginClass=DICOMSegmentationPluginClass)


def test_dicom_seg_export_only_for_volumes_from_the_dicom_database(slicer_standin, tmp_path, monkeypatch):
    module, scene, util = slicer_standin
    slicer = sys.modules["slicer"]
    logic = module.MedAttnSlicerLogic()
    volume = _user_volume(scene, util, tmp_path)
    segmentation = logic.segmentationFromLabelFile(_label_file(tmp_path / "label.npy", volume), volume, None, "seg")
    # A volume read from a NIfTI/NRRD file: no DICOM SEG, and the message says what to do instead.
    assert logic.dicomInstanceUids(volume) == []
    with pytest.raises(ValueError, match=r"DICOM database.*\.seg\.nrrd"):
        logic.exportDicomSeg(segmentation, volume, str(tmp_path))
    # Loaded from the DICOM database, but a file left it: still no.
    volume.SetAttribute("DICOM.instanceUIDs", "1.2.3 1.2.4")
    slicer.dicomDatabase = DicomDatabase({"1.2.3": "/db/a.dcm"})
    assert logic.dicomInstanceUids(volume) == []
    slicer.dicomDatabase = DicomDatabase({"1.2.3": "/db/a.dcm", "1.2.4": "/db/b.dcm"})
    assert logic.dicomInstanceUids(volume) == ["1.2.3", "1.2.4"]
    # Slicer 5.4-5.10 without QuantitativeReporting: no exporter, a message naming what to install.
    monkeypatch.setitem(sys.modules, "DICOMSegmentationPlugin", None)
    with pytest.raises(module.MedAttnClientError, match="5.12.*QuantitativeReporting"):
        logic.exportDicomSeg(segmentation, volume, str(tmp_path))
    plugin = _DicomSegPlugin()
    monkeypatch.setitem(sys.modules, "DICOMSegmentationPlugin", plugin.module())
    assert logic.exportDicomSeg(segmentation, volume, str(tmp_path / "seg")) == str(tmp_path / "seg")
    assert [e.directory for e in plugin.exported] == [str(tmp_path / "seg")]
    assert plugin.exported[0].subjectHierarchyItemID is segmentation
    assert slicer.subjectHierarchy.GetItemParent(segmentation) == "study of patient CT"  # the volume's study
    plugin.error = "Referenced volume is not found"
    with pytest.raises(module.MedAttnClientError, match="Referenced volume is not found"):
        logic.exportDicomSeg(segmentation, volume, str(tmp_path))


def test_logic_owns_the_server_info_and_keeps_no_password(slicer_standin):
    """Logic.connect (the Connect job) logs in when the server asks, keeps /info/ itself, and the password it was
    given is nowhere in the Logic or its client afterwards (only the server's token, in memory)."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    module, scene, util = slicer_standin
    answers = {"/auth/": {"enabled": True}, "/info/": {"name": "MedAttnSlicer", "models": {}}}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, payload):
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._send(answers[self.path])

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send({"access_token": "token-of-the-day", "token_type": "bearer"})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    logic = module.MedAttnSlicerLogic()
    try:
        logic.setServer(f"http://127.0.0.1:{server.server_address[1]}")
        assert logic.info is None and not logic.loggedIn
        job = logic.runner.wait(logic.runner.submit("connect", logic.connect, "annotator", "s3cret-pw"), 30)
        assert job.state == "finished", job.error
    finally:
        server.shutdown()
        logic.cleanup()
    assert logic.info == answers["/info/"] and job.result is logic.info
    assert logic.loggedIn and logic.client.auth_token == "token-of-the-day"
    kept = repr(vars(logic)) + repr(vars(logic.client))
    assert "s3cret-pw" not in kept
    logic.setServer("http://127.0.0.1:1")  # another server: the log-in does not carry over
    assert not logic.loggedIn and logic.info is None
