# Copyright MedAttnSlicer contributors. Apache-2.0.
"""The Slicer panel's library (MedAttnSlicerLib) on a PACS: Slicer -> server -> Orthanc -> server.

Workstation A (its own server and cache) asks for the next series, segments it with the INT8 model, corrects the
label and submits it as final; the server stores it in Orthanc as a DICOM SEG. Workstation B (another server with an
empty cache on the same PACS) then downloads that label, equal voxel for voxel, and its active learning offers only
the series nobody labelled. The lib's error for a series no model takes names the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from MedAttnSlicerLib import JobRunner, MonaiLabelClient, ServerError, compose_label_map, workflows
from scripts.local_pacs import prepare_sample_series
from tests.image_checks import assert_same_grid, read_array
from tests.orthanc import PacsHandle, orthanc_pacs, start_pacs_server  # noqa: F401  (fixture)
from tests.slicer_jobs import run_workflow

pytestmark = pytest.mark.slow

SEG_INT8 = "sadnn_seg_int8"


def _seg_series(pacs: PacsHandle) -> list[dict]:
    answer = pacs.orthanc.get("/dicom-web/series", params={"Modality": "SEG"})
    answer.raise_for_status()
    return answer.json() if answer.content else []


@pytest.fixture(scope="module")
def runner():
    jobs = JobRunner()
    yield jobs
    jobs.shutdown(timeout_s=30.0)


def test_label_from_slicer_reaches_the_pacs_and_the_next_workstation(
    orthanc_pacs: PacsHandle, runner: JobRunner, tmp_path: Path
) -> None:
    files = prepare_sample_series(tmp_path / "second_ct", copy_name="slicer-second")
    orthanc_pacs.orthanc.upload(files)
    second = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    segs_before = len(_seg_series(orthanc_pacs))

    # workstation A
    with start_pacs_server(orthanc_pacs.url, tmp_path / "server_a") as server_a:
        client = MonaiLabelClient(server_a.url, timeout_s=120.0, client_id="slicer-a", download_dir=str(tmp_path / "a"))
        info = run_workflow(runner, workflows.connect, client)
        assert info["default_model"] == SEG_INT8
        sample = run_workflow(runner, workflows.fetch_next_sample, client, "first", dest_dir=str(tmp_path / "a_image"))
        image_id = sample.image_id
        assert image_id in (orthanc_pacs.ct_series, second)
        image = sitk.ReadImage(sample.image_path)
        assert image.GetSize() == (512, 512, 20)
        result = run_workflow(
            runner, workflows.segment, client, SEG_INT8, image_id=image_id, dest_dir=str(tmp_path / "a_seg")
        )
        auto, grid = read_array(result.label_path)
        assert_same_grid(grid, image)
        assert np.count_nonzero(auto == 1) > 1000
        edited_mask = auto == 1
        edited_mask[: edited_mask.shape[0] // 2] = False  # the annotator erased the lower slices
        edited = compose_label_map([("Liver", edited_mask)], {"liver": 1})
        label_image = sitk.GetImageFromArray(edited)
        label_image.CopyInformation(grid)
        sitk.WriteImage(label_image, str(tmp_path / "edited.nii.gz"))
        answer = run_workflow(
            runner, workflows.submit_label, client, str(tmp_path / "edited.nii.gz"), image_id=image_id
        )
        assert answer["image"] == image_id
        # a series no model takes: the lib's error carries the server's 422 and its reason
        with pytest.raises(ServerError) as refused:
            client.infer(SEG_INT8, image_id=orthanc_pacs.sc_series, dest_dir=str(tmp_path / "a_sc"))
        assert refused.value.status == 422 and "modality OT" in str(refused.value)

    # the PACS holds the label as a DICOM SEG of that series
    segs = _seg_series(orthanc_pacs)
    assert len(segs) == segs_before + 1

    # workstation B: an empty cache; the label comes from the PACS
    with start_pacs_server(orthanc_pacs.url, tmp_path / "server_b") as server_b:
        client = MonaiLabelClient(server_b.url, timeout_s=120.0, client_id="slicer-b", download_dir=str(tmp_path / "b"))
        run_workflow(runner, workflows.connect, client)
        back, back_image = read_array(client.download_label(image_id, "final", dest_dir=str(tmp_path / "b_label")))
        assert_same_grid(back_image, grid)
        assert np.array_equal(back, edited)
        listed = client.datastore("all")["objects"]
        assert "final" in listed[image_id]["labels"]
        other = ({orthanc_pacs.ct_series, second} - {image_id}).pop()
        assert {uid for uid, entry in listed.items() if "final" not in entry["labels"]} == {other}
        following = run_workflow(
            runner, workflows.fetch_next_sample, client, "first", dest_dir=str(tmp_path / "b_image")
        )
        assert following.image_id == other
