# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Static checks of the Slicer module that need no Slicer: UI file vs code, packaging, imports."""

import ast
import os
import py_compile
import re
import subprocess
import sys
import sysconfig
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import MedAttnSlicerLib
from MedAttnSlicerLib import SLICER_SIDE_MODULES as SLICER_SIDE
from MedAttnSlicerLib import formatting, workflows

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "MedAttnSlicer"
MODULE_PY = MODULE_DIR / "MedAttnSlicer.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "MedAttnSlicer.ui"
LIB_DIR = MODULE_DIR / "MedAttnSlicerLib"

#: Where the panel's code lives: the module script (Widget core) and its section mixins.
PANEL_SOURCES = [MODULE_PY] + [
    LIB_DIR / f"{name}.py" for name in ("server_panel", "segmentation_panel", "training_panel", "classification_panel")
]
PANEL_CLASSES = {
    "MedAttnSlicerWidget",
    "ServerPanelMixin",
    "SegmentationPanelMixin",
    "TrainingPanelMixin",
    "ClassificationPanelMixin",
}

#: The one table of widgets the module code uses: name -> Qt/CTK/MRML class in the .ui file.
WIDGETS = {
    "serverComboBox": "QComboBox",
    "usernameLineEdit": "QLineEdit",
    "passwordLineEdit": "QLineEdit",
    "connectButton": "QPushButton",
    "serverStatusLabel": "QLabel",
    "appStatusLabel": "QLabel",
    "segModelComboBox": "QComboBox",
    "segModelCardLabel": "QLabel",
    "clsModelComboBox": "QComboBox",
    "clsModelCardLabel": "QLabel",
    "strategyComboBox": "QComboBox",
    "nextSampleButton": "QPushButton",
    "inputVolumeSelector": "qMRMLNodeComboBox",
    "segmentButton": "QPushButton",
    "progressBar": "QProgressBar",
    "cancelButton": "QPushButton",
    "jobStatusLabel": "QLabel",
    "predictionSegmentSelector": "qMRMLSegmentSelectorWidget",
    "referenceComboBox": "QComboBox",
    "referenceSegmentSelector": "qMRMLSegmentSelectorWidget",
    "compareButton": "QPushButton",
    "comparisonLabel": "QLabel",
    "comparisonTable": "QTableWidget",
    "submitSegmentationSelector": "qMRMLNodeComboBox",
    "submitButton": "QPushButton",
    "saveSegmentationButton": "QPushButton",
    "exportDicomSegButton": "QPushButton",
    "trainTaskComboBox": "QComboBox",
    "maxEpochsSpinBox": "QSpinBox",
    "trainButton": "QPushButton",
    "stopTrainButton": "QPushButton",
    "trainProgressBar": "QProgressBar",
    "trainStatusLabel": "QLabel",
    "scoringMethodComboBox": "QComboBox",
    "scoreButton": "QPushButton",
    "scoresTable": "QTableWidget",
    "scoresSummaryLabel": "QLabel",
    "sliceSpinBox": "QSpinBox",
    "classifyButton": "QPushButton",
    "explanationComboBox": "QComboBox",
    "probabilityTable": "QTableWidget",
    "saliencyLabel": "QLabel",
    "saliencyOpacitySlider": "ctkSliderWidget",
    "messageLabel": "QLabel",
}

#: Which classes support a member the code calls on ``self.ui.<name>.<member>``.
MEMBER_CLASSES = {
    "clicked": {"QPushButton"},
    "currentText": {"QComboBox"},
    "currentIndex": {"QComboBox"},
    "currentIndexChanged": {"QComboBox"},
    "addItem": {"QComboBox"},
    "addItems": {"QComboBox"},
    "setCurrentIndex": {"QComboBox"},
    "setCurrentText": {"QComboBox"},
    "text": {"QLineEdit"},
    "setItemData": {"QComboBox"},
    "count": {"QComboBox"},
    "currentNode": {"qMRMLNodeComboBox", "qMRMLSegmentSelectorWidget"},
    "setCurrentNode": {"qMRMLNodeComboBox", "qMRMLSegmentSelectorWidget"},
    "currentNodeChanged": {"qMRMLNodeComboBox", "qMRMLSegmentSelectorWidget"},
    "currentSegmentID": {"qMRMLSegmentSelectorWidget"},
    "currentSegmentChanged": {"qMRMLSegmentSelectorWidget"},
    "setRange": {"QProgressBar", "QSpinBox"},
    "setValue": {"QProgressBar", "QSpinBox", "ctkSliderWidget"},
    "value": {"QSpinBox", "ctkSliderWidget", "QProgressBar"},
    "valueChanged": {"QSpinBox", "ctkSliderWidget"},
    "setText": {"QLabel", "QPushButton"},
    "setStyleSheet": None,  # any widget
    "setVisible": None,
    "setEnabled": None,
    "enabled": None,
    "clear": {"QComboBox", "QLabel", "QTableWidget", "QLineEdit"},
}


def _ui_widgets():
    root = ET.parse(UI_FILE).getroot()
    widgets = {}
    for element in root.iter("widget"):
        name = element.get("name")
        assert name not in widgets, f"widget name '{name}' appears twice in {UI_FILE.name}"
        widgets[name] = element.get("class")
    return root, widgets


def _panel_source():
    return "\n".join(path.read_text() for path in PANEL_SOURCES)


def _code_ui_usage():
    source = _panel_source()
    names = set(re.findall(r"self\.ui\.(\w+)", source))
    members = re.findall(r"self\.ui\.(\w+)\.(\w+)", source)
    return source, names, members


def test_widget_table_matches_code_and_ui_file():
    _, ui_widgets = _ui_widgets()
    _, used, _ = _code_ui_usage()
    assert used == set(WIDGETS), (
        f"code uses widgets missing from the table: {sorted(used - set(WIDGETS))}; "
        f"table lists unused widgets: {sorted(set(WIDGETS) - used)}"
    )
    for name, expected in WIDGETS.items():
        assert name in ui_widgets, f"self.ui.{name} is not defined in {UI_FILE.name}"
        assert ui_widgets[name] == expected, f"{name} is a {ui_widgets[name]} in the .ui, the code needs {expected}"


def test_members_used_exist_on_the_widget_classes():
    _, members = _code_ui_usage()[1:]
    unknown = sorted({member for _, member in members if member not in MEMBER_CLASSES})
    assert not unknown, f"add these members to MEMBER_CLASSES with the classes that have them: {unknown}"
    for name, member in members:
        allowed = MEMBER_CLASSES[member]
        if allowed is not None:
            assert WIDGETS[name] in allowed, f"self.ui.{name}.{member}: a {WIDGETS[name]} has no '{member}'"


def test_tables_and_mrml_widgets_are_wired():
    root, ui_widgets = _ui_widgets()
    source = _panel_source()
    for table in re.findall(r"(?:fill|setup)Table\(self\.ui\.(\w+)", source):
        assert ui_widgets[table] == "QTableWidget"
    assert root.find("class").text == "MedAttnSlicer"
    top = root.find("widget")
    assert (top.get("class"), top.get("name")) == ("qMRMLWidget", "MedAttnSlicer")
    declared = {c.find("class").text for c in root.iter("customwidget")}
    custom = {cls for cls in ui_widgets.values() if not cls.startswith("Q")}
    assert custom <= declared, f"undeclared custom widgets: {custom - declared}"
    # MRML widgets only see nodes when the scene reaches them through mrmlSceneChanged.
    receivers = {
        c.find("receiver").text
        for c in root.iter("connection")
        if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"
        and c.find("slot").text == "setMRMLScene(vtkMRMLScene*)"
        and c.find("sender").text == "MedAttnSlicer"
    }
    mrml = {name for name, cls in ui_widgets.items() if cls.startswith("qMRML") and name != "MedAttnSlicer"}
    assert mrml == receivers, f"MRML widgets without a scene connection: {mrml - receivers}"
    node_types = {
        w.get("name"): [s.text for s in w.findall("property[@name='nodeTypes']/stringlist/string")]
        for w in root.iter("widget")
        if w.get("class") == "qMRMLNodeComboBox"
    }
    assert node_types == {
        "inputVolumeSelector": ["vtkMRMLScalarVolumeNode"],
        "submitSegmentationSelector": ["vtkMRMLSegmentationNode"],
    }


def test_module_compiles_and_defines_slicer_classes(tmp_path):
    for path in [MODULE_PY, *sorted(LIB_DIR.glob("*.py"))]:
        py_compile.compile(str(path), doraise=True, cfile=str(tmp_path / (path.name + "c")))
        # Slicer 5.0-5.8 embed Python 3.9: no newer syntax.
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 9))
    tree = ast.parse(MODULE_PY.read_text())
    bases = {
        node.name: [b.id if isinstance(b, ast.Name) else ast.unparse(b) for b in node.bases]
        for node in tree.body
        if isinstance(node, ast.ClassDef)
    }
    assert bases["MedAttnSlicer"] == ["ScriptedLoadableModule"]
    assert bases["MedAttnSlicerWidget"] == [
        "ScriptedLoadableModuleWidget",
        "VTKObservationMixin",
        "ServerPanelMixin",
        "SegmentationPanelMixin",
        "TrainingPanelMixin",
        "ClassificationPanelMixin",
    ]
    assert bases["MedAttnSlicerLogic"] == ["ScriptedLoadableModuleLogic", "SceneResultsMixin", "SceneExportMixin"]
    assert bases["MedAttnSlicerTest"] == ["ScriptedLoadableModuleTest", "SelfTestCases"]
    assert bases["MedAttnSlicerParameterNode"] == []
    source = MODULE_PY.read_text()
    assert "@parameterNodeWrapper\nclass MedAttnSlicerParameterNode" in source
    lib_source = "\n".join((LIB_DIR / f"{name}.py").read_text() for name in SLICER_SIDE)
    for call in (
        "slicer.util.loadUI(",
        "slicer.util.childWidgetVariables(",
        "qt.QTimer()",
        "qt.QSettings()",
        "slicer.util.exportNode(",
        "slicer.util.arrayFromVolume(",
        "slicer.util.errorDisplay(",
        "slicer.util.tempDirectory(",
        "slicer.util.tryWithErrorDisplay(",
        ".connectGui(self.ui)",
    ):
        assert call in source + lib_source, f"the module should use {call}"
    # User actions report errors through Slicer's tryWithErrorDisplay, not a hand-written decorator.
    assert "_reportErrors" not in source + lib_source
    # The user's volume goes to the server as a copy: saveNode would re-point its storage node at a temp file.
    scene = (LIB_DIR / "scene_results.py").read_text()
    mixin = next(n for n in ast.parse(scene).body if isinstance(n, ast.ClassDef) and n.name == "SceneResultsMixin")
    write = ast.get_source_segment(scene, next(n for n in mixin.body if getattr(n, "name", "") == "writeVolume"))
    assert "util.saveNode(" not in write and "util.exportNode(" in write
    assert "tempfile.mkdtemp(prefix" not in source.replace('tempfile.mkdtemp(prefix="job-", dir=self.tempDir)', "")
    # No file over about 500 lines (issue 12).
    for path in [MODULE_PY, *LIB_DIR.glob("*.py")]:
        assert len(path.read_text().splitlines()) <= 540, f"{path.name} has grown past ~500 lines: split it"


def test_module_uses_only_names_the_lib_defines():
    tree = ast.parse(MODULE_PY.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "MedAttnSlicerLib":
            for alias in node.names:
                assert hasattr(MedAttnSlicerLib, alias.name) or alias.name in ("formatting", "workflows"), alias.name
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("MedAttnSlicerLib."):
            module = LIB_DIR / (node.module.split(".", 1)[1] + ".py")
            defined = {
                n.name for n in ast.parse(module.read_text()).body if isinstance(n, (ast.ClassDef, ast.FunctionDef))
            }
            defined |= {
                t.id
                for n in ast.parse(module.read_text()).body
                if isinstance(n, ast.Assign)
                for t in n.targets
                if isinstance(t, ast.Name)
            }
            for alias in node.names:
                assert alias.name in defined, f"{node.module} defines no {alias.name}"
    for module, name in re.findall(r"\b(formatting|workflows)\.(\w+)", _panel_source()):
        assert hasattr({"formatting": formatting, "workflows": workflows}[module], name), f"{module}.{name}"


def test_lib_imports_without_slicer_and_only_stdlib_and_numpy():
    script = f"""
import sys, importlib, pkgutil
for blocked in ("slicer", "qt", "vtk", "ctk", "requests", "torch", "monai", "SimpleITK"):
    sys.modules[blocked] = None  # any import of these now raises ImportError
before = set(sys.modules)  # what the interpreter itself loaded at start-up (site, .pth hooks)
sys.path.insert(0, {str(MODULE_DIR)!r})
import MedAttnSlicerLib
for info in pkgutil.iter_modules(MedAttnSlicerLib.__path__):
    if info.name not in {SLICER_SIDE!r}:
        importlib.import_module("MedAttnSlicerLib." + info.name)
for name in sorted(set(sys.modules) - before):
    module = sys.modules[name]
    if module is not None:
        print(name, getattr(module, "__file__", None) or "")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True).stdout
    stdlib_dirs = {os.path.realpath(sysconfig.get_paths()[key]) for key in ("stdlib", "platstdlib")}
    numpy_dir = os.path.realpath(os.path.dirname(np.__file__))
    offenders = []
    for line in output.splitlines():
        name, _, path = line.partition(" ")
        top = name.split(".")[0]
        if not path and (top in sys.builtin_module_names or top == "cython_runtime" or top.startswith("_cython_")):
            continue  # compiled-in modules, and the Cython runtime of numpy's extensions
        if top in sys.stdlib_module_names or top in ("numpy", "MedAttnSlicerLib"):
            real = os.path.realpath(path) if path else ""
            if not real and top in sys.stdlib_module_names:
                continue
            if top == "numpy" and real.startswith(numpy_dir):
                continue
            if top == "MedAttnSlicerLib" and real.startswith(str(LIB_DIR)):
                continue
            if any(real.startswith(d) for d in stdlib_dirs):
                continue
        offenders.append(line)
    assert not offenders, f"MedAttnSlicerLib pulled in non-stdlib modules: {offenders}"
    assert "MedAttnSlicerLib.workflows" in output and "urllib.request" in output


def _cmake_list(text, variable):
    match = re.search(r"set\(\s*" + variable + r"\s+(.*?)\)", text, re.S)
    assert match, f"{variable} is not set"
    return [
        item.replace("${MODULE_NAME}", "MedAttnSlicer") for item in match.group(1).split() if not item.startswith("#")
    ]


def test_module_cmakelists_lists_every_file():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    listed = _cmake_list(text, "MODULE_PYTHON_SCRIPTS") + _cmake_list(text, "MODULE_PYTHON_RESOURCES")
    on_disk = {
        str(path.relative_to(MODULE_DIR))
        for path in MODULE_DIR.rglob("*")
        if path.is_file()
        and "__pycache__" not in path.parts
        and path.name != "CMakeLists.txt"
        and path.relative_to(MODULE_DIR).parts[0] != "Testing"  # build-time tests, not installed
    }
    assert set(listed) == on_disk, (
        f"not listed: {sorted(on_disk - set(listed))}; missing: {sorted(set(listed) - on_disk)}"
    )
    assert len(listed) == len(set(listed))
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME \$\{MODULE_NAME\}", text)
    assert re.search(r"if\(BUILD_TESTING\).*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", text, re.S)
    assert re.search(r"if\(BUILD_TESTING\).*add_subdirectory\(Testing\)", text, re.S)


def test_cmake_tests_split_into_a_self_test_and_a_skipping_server_test():
    """The CTest of the module script must pass on build dashboards, where no server runs."""
    testing = MODULE_DIR / "Testing"
    assert "add_subdirectory(Python)" in (testing / "CMakeLists.txt").read_text()
    registered = re.findall(
        r"^slicer_add_python_unittest\(SCRIPT (\S+)\)", (testing / "Python" / "CMakeLists.txt").read_text(), re.M
    )
    assert registered == ["MedAttnSlicerServerTest.py"]
    server_test = (testing / "Python" / "MedAttnSlicerServerTest.py").read_text()
    ast.parse(server_test, feature_version=(3, 9))
    assert "MEDATTN_SERVER_URL" in server_test and "self.skipTest(" in server_test
    module_test = (LIB_DIR / "self_test.py").read_text() + ast.get_source_segment(
        MODULE_PY.read_text(),
        next(
            n
            for n in ast.parse(MODULE_PY.read_text()).body
            if isinstance(n, ast.ClassDef) and n.name == "MedAttnSlicerTest"
        ),
    )
    for server_call in ("setServer(", "runBlocking(", "MEDATTN_SERVER_URL", "workflows."):
        assert server_call not in module_test, f"the self-test must not need a server ({server_call})"


def test_extension_cmakelists_metadata():
    text = (REPO / "CMakeLists.txt").read_text()
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "DEPENDS"):
        assert re.search(rf'set\(EXTENSION_{key} "[^"]+"\)', text), f"EXTENSION_{key} missing or empty"
    assert re.search(r'set\(EXTENSION_SCREENSHOTURLS "[^"]*"\)', text)
    # Every file the metadata links to in this repository exists (no screenshot of a panel nobody took).
    for path in re.findall(r"https://raw\.githubusercontent\.com/MedAttnSlicer/MedAttnSlicer/main/(\S+?)\"", text):
        assert (REPO / path).is_file(), f"CMakeLists.txt links to {path}, which is not in the repository"
    ordered = [
        "find_package(Slicer REQUIRED)",
        "include(${Slicer_USE_FILE})",
        "add_subdirectory(MedAttnSlicer)",
        "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
        "include(${Slicer_EXTENSION_CPACK})",
    ]
    positions = [text.find(line) for line in ordered]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), positions
    assert re.search(r"^project\(MedAttnSlicer\)", text, re.M)


def test_icon_is_a_128px_png():
    icon = Image.open(MODULE_DIR / "Resources" / "Icons" / "MedAttnSlicer.png")
    assert icon.format == "PNG" and icon.size == (128, 128)
    pixels = np.asarray(icon.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # a drawing, not a flat square


def _widget_uses():
    """How ``MedAttnSlicerWidget`` uses each ``self.ui.<name>``, read from its syntax tree.

    Returns name -> set of uses: ``"connect:<signal>"`` (connected to a method the class defines; a handler the
    class lacks gives ``"undefined handler self.<h> for:<signal>"``), ``"call:<member>"`` (a method called on it),
    ``"use:<member>"`` (a member read or called: PythonQt exposes getters such as ``currentNode`` as methods,
    properties such as ``value`` as attributes), ``"arg:<function>"`` (the widget passed to ``self.<function>(...)``).
    """
    classes = [
        n
        for path in PANEL_SOURCES
        for n in ast.parse(path.read_text()).body
        if isinstance(n, ast.ClassDef) and n.name in PANEL_CLASSES
    ]
    assert {c.name for c in classes} == PANEL_CLASSES
    widget_class = ast.Module(body=classes, type_ignores=[])  # the widget and its section mixins, walked as one
    methods = {n.name for c in classes for n in c.body if isinstance(n, ast.FunctionDef)}

    def ui_name(node):
        # self.ui.<name>
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            return node.attr
        return None

    uses = {}
    called = set()
    for node in ast.walk(widget_class):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        called.add(id(func))
        # self.ui.<name>.<signal>.connect(self.<handler>)
        if isinstance(func, ast.Attribute) and func.attr == "connect" and isinstance(func.value, ast.Attribute):
            name = ui_name(func.value.value)
            if name is not None:
                (handler,) = node.args
                defined = isinstance(handler, ast.Attribute) and handler.attr in methods
                use = "connect" if defined else f"undefined handler {ast.unparse(handler)} for"
                uses.setdefault(name, set()).add(f"{use}:{func.value.attr}")
        if isinstance(func, ast.Attribute):
            name = ui_name(func.value)
            if name is not None:
                uses.setdefault(name, set()).update({f"call:{func.attr}", f"use:{func.attr}"})
            if isinstance(func.value, ast.Name) and func.value.id == "self":
                for arg in node.args:
                    if ui_name(arg) is not None:
                        uses.setdefault(ui_name(arg), set()).add(f"arg:{func.attr}")
        if isinstance(func, ast.Name):  # helpers of qt_tables: fillTable(self.ui.<name>, ...)
            for arg in node.args:
                if ui_name(arg) is not None:
                    uses.setdefault(ui_name(arg), set()).add(f"arg:{func.id}")
    for node in ast.walk(widget_class):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and id(node) not in called:
            name = ui_name(node.value)
            if name is not None:
                uses.setdefault(name, set()).add(f"use:{node.attr}")
    return uses


#: What the code must do with a widget of each class for it to do anything: a list of alternatives, each a set
#: of uses that must all be present (see :func:`_widget_uses`).
REQUIRED_USES = {
    # a button nobody connects does nothing
    "QPushButton": [{"connect:clicked"}],
    # a label nobody writes shows only the .ui placeholder
    "QLabel": [{"call:setText"}],
    # a combo box must be filled and its choice read
    "QComboBox": [
        {f"{fill}", f"use:{choice}"}
        for fill in ("call:addItem", "call:addItems", "arg:fillCombo", "arg:fillModelCombo")
        for choice in ("currentText", "currentIndex")
    ],
    # a node selector's node must be read and its change must update the buttons
    "qMRMLNodeComboBox": [{"use:currentNode", "connect:currentNodeChanged"}],
    "qMRMLSegmentSelectorWidget": [{"use:currentSegmentID", "connect:currentSegmentChanged"}],
    "QProgressBar": [{"call:setValue", "call:setRange"}],
    "QSpinBox": [{"use:value"}],
    "ctkSliderWidget": [{"use:value", "connect:valueChanged"}],
    "QTableWidget": [{"arg:setupTable", "arg:fillTable"}],
    # a text field must be read
    "QLineEdit": [{"use:text"}],
}


@pytest.mark.parametrize("name", sorted(WIDGETS))
def test_every_widget_has_a_name_in_code_with_handlers(name):
    uses = _widget_uses().get(name, set())
    assert not [use for use in uses if use.startswith("undefined handler")], (name, sorted(uses))
    alternatives = REQUIRED_USES[WIDGETS[name]]
    assert any(required <= uses for required in alternatives), (
        f"self.ui.{name} ({WIDGETS[name]}) is used as {sorted(uses)}; "
        f"it needs one of {[sorted(a) for a in alternatives]}"
    )
