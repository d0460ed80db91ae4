# Copyright MedAttnSlicer contributors. Apache-2.0.
"""The app loads the way MONAI Label loads it, without torchvision or the MONAI Label modules that need it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
APP_DIR = REPO_ROOT / "monailabel_app"

_PROBE = r"""
import json, sys
from monailabel.utils.others.class_utils import get_class_of_subclass_from_file
app_class = get_class_of_subclass_from_file("main", sys.argv[1] + "/main.py", "MONAILabelApp")
forbidden = [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")
             or m.startswith("monailabel.transform.post") or m.startswith("monailabel.deepedit")]
print(json.dumps({"app": app_class.__name__ if app_class else None, "forbidden": forbidden}))
"""


def test_app_imports_without_torchvision_or_monailabel_post():
    """MONAI Label finds the MONAILabelApp subclass in main.py; torchvision, monailabel.transform.post and
    monailabel.deepedit are never imported (they cannot work here)."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(APP_DIR)], capture_output=True, text=True, timeout=300, cwd=str(REPO_ROOT)
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["app"] == "MedAttnSlicerApp"
    assert result["forbidden"] == []


def test_app_package_imports_cleanly():
    """Importing every app module (tasks, trainers, strategies, scoring, RISE) keeps torchvision out too."""
    probe = (
        "import sys, importlib, pkgutil, json\n"
        "import monailabel_app, monailabel_app.lib\n"
        "names = [m.name for m in pkgutil.walk_packages(monailabel_app.__path__, 'monailabel_app.')]\n"
        "for n in names: importlib.import_module(n)\n"
        "bad = [m for m in sys.modules if m == 'torchvision' or m.startswith('monailabel.transform.post')"
        " or m.startswith('monailabel.deepedit')]\n"
        "print(json.dumps({'n': len(names), 'bad': bad}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=str(REPO_ROOT))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n"] > 20
    assert result["bad"] == []
