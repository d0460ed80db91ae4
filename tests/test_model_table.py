# Copyright MedAttnSlicer contributors. Apache-2.0.
"""The README's bundled-model table is the one ``python -m monailabel_app.model_table`` derives from
``monailabel_app/model/bundled_weights.json`` (one place for the figures), and it says what is served."""

from __future__ import annotations

import re
from pathlib import Path

from monailabel_app.lib.quality import below_floor
from monailabel_app.model_table import BUNDLED_DIR, model_table

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_readme_shows_the_table_derived_from_the_bundled_figures():
    readme = (REPO_ROOT / "README.md").read_text()
    shown = re.search(r"<!-- model-table:start -->\n(.*?)\n<!-- model-table:end -->", readme, re.S)
    assert shown, "README.md lost its model-table markers"
    assert shown.group(1) == model_table(), "README's model table is stale: python -m monailabel_app.model_table"


def test_every_row_says_whether_it_is_served_as_the_floor_decides():
    rows = [line.split(" | ") for line in model_table().splitlines()[2:]]
    assert {row[0].strip("| ") for row in rows} >= {"sadnn_seg", "unet_seg", "sadnn_cls", "hct_cls"}
    for row in rows:
        family, served = row[0].strip("| "), row[-1]
        assert served.startswith("no") == below_floor(family, BUNDLED_DIR), row
        assert re.match(r"\d\.\d{3}", row[2]), row  # a measured FP32 figure in every row
        # and the recipe's leave-one-volume-out range, its worst and best held-out volume named
        assert re.fullmatch(r"\d\.\d{3} \(\w+\)-\d\.\d{3} \(\w+\), 3 folds", row[5]), row
