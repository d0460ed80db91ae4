# Copyright MedAttnSlicer contributors. Apache-2.0.
"""The PACS round trip (issue 13) against a real Orthanc with its DICOMweb plugin and the real server started with
``--studies <DICOMweb URL>`` and no route to the internet: list, infer, submit a final label, find it in Orthanc as
a DICOM SEG on the source geometry, read it back with highdicom voxel for voxel, active learning skips the series;
and the bad inputs: PACS unreachable or refusing credentials at start-up, a series no model takes, a STOW the PACS
rejects, a PACS that goes down."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from scripts.local_pacs import Orthanc, prepare_sample_series
from tests.orthanc import (  # noqa: F401  (fixtures)
    PACS_PASSWORD,
    PACS_USER,
    PacsHandle,
    orthanc_pacs,
    pacs_server,
    require_orthanc,
    start_pacs,
    start_pacs_server,
)
from tests.server_fixture import REPO_ROOT, ServerStartError

pytestmark = pytest.mark.slow


def _qido_series(pacs: PacsHandle, **filters: str) -> list[dict]:
    answer = pacs.orthanc.get("/dicom-web/series", params=filters)
    answer.raise_for_status()
    return answer.json() if answer.content else []


def _uid(item: dict, tag: str) -> str:
    return item[tag]["Value"][0]


def _segs_of(pacs: PacsHandle, series_uid: str) -> list[pydicom.Dataset]:
    """Every DICOM SEG instance in Orthanc that references ``series_uid`` (fetched with WADO-RS)."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(pacs.url)
    found = []
    for item in _qido_series(pacs, Modality="SEG"):
        for ds in client.retrieve_series(_uid(item, "0020000D"), _uid(item, "0020000E")):
            if ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid:
                found.append(ds)
    return found


def _source_uids_on_volume_grid(files: list[Path], volume: sitk.Image) -> list[str]:
    """SOP Instance UIDs of the CT files for each slice ``k`` of ``volume``, matched by physical position (the file
    whose Image Position (Patient) is nearest to voxel (0, 0, k)): independent of the server's own ordering."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    uids = []
    for k in range(volume.GetSize()[2]):
        point = np.array(volume.TransformIndexToPhysicalPoint((0, 0, k)))
        nearest = int(np.argmin(np.linalg.norm(positions - point, axis=1)))
        assert np.linalg.norm(positions[nearest] - point) < 1e-3, f"slice {k} lies on no CT instance"
        uids.append(str(headers[nearest].SOPInstanceUID))
    return uids


def _nifti(content: bytes, tmp_path: Path, name: str) -> sitk.Image:
    path = tmp_path / name
    path.write_bytes(content)
    return sitk.ReadImage(str(path))


def _put_label(server, image_id: str, path: Path, tag: str = "final", params: dict | None = None):
    """``PUT /datastore/label`` of the label file ``path`` for ``image_id`` (the server's answer)."""
    data = {"params": json.dumps(params)} if params else None
    with open(path, "rb") as handle:
        return server.put(
            "/datastore/label", params={"image": image_id, "tag": tag}, data=data, files={"label": (path.name, handle)}
        )


@pytest.fixture(scope="module")
def second_ct(orthanc_pacs: PacsHandle, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A second CT series in the PACS (the sample images under new UIDs): active learning then has a choice."""
    files = prepare_sample_series(tmp_path_factory.mktemp("second_ct"), copy_name="second")
    orthanc_pacs.orthanc.upload(files)
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def test_lists_the_ct_series_not_the_secondary_capture(pacs_server, orthanc_pacs, second_ct) -> None:
    listing = pacs_server.get("/datastore/", params={"output": "all"})
    assert listing.status_code == 200, listing.text
    objects = listing.json()["objects"]
    assert orthanc_pacs.ct_series in objects and second_ct in objects
    assert orthanc_pacs.sc_series not in objects  # modality OT: no served model takes it
    assert objects[orthanc_pacs.ct_series]["image"]["info"]["Modality"] == "CT"
    stats = pacs_server.get("/datastore/").json()
    assert stats["total"] == len(objects) and stats["pacs"] == orthanc_pacs.url


def test_infer_fetches_the_stored_transfer_syntax(pacs_server, orthanc_pacs, tmp_path) -> None:
    """Plain Orthanc cannot transcode the series' JPEG 2000: only a fetch of the stored syntax works."""
    plain = orthanc_pacs.orthanc.get(
        f"/dicom-web/studies/{orthanc_pacs.ct_study}/series/{orthanc_pacs.ct_series}",
        headers={"Accept": 'multipart/related; type="application/dicom"'},
    )
    assert plain.status_code >= 400  # the PACS really cannot transcode
    answer = pacs_server.post(f"/infer/sadnn_seg_int8?image={orthanc_pacs.ct_series}&output=image")
    assert answer.status_code == 200, answer.text
    label = _nifti(answer.content, tmp_path, "liver.nii.gz")
    assert label.GetSize() == (512, 512, 20)
    image = pacs_server.get("/datastore/image", params={"image": orthanc_pacs.ct_series})
    assert image.status_code == 200
    volume = _nifti(image.content, tmp_path, "ct.nii.gz")
    assert np.allclose(label.GetOrigin(), volume.GetOrigin()) and np.allclose(label.GetSpacing(), volume.GetSpacing())
    hu = sitk.GetArrayFromImage(volume)
    assert hu.min() < -900 and hu.max() > 500  # Hounsfield units, decoded from JPEG 2000
    assert np.count_nonzero(sitk.GetArrayFromImage(label)) > 1000  # the liver is in these slices


def test_final_label_goes_to_the_pacs_as_seg_and_reads_back_voxel_for_voxel(
    pacs_server, orthanc_pacs, second_ct, tmp_path
) -> None:
    first = pacs_server.post("/activelearning/first", json={}).json()
    assert first["id"] in (orthanc_pacs.ct_series, second_ct)
    unlabelled_before = {orthanc_pacs.ct_series, second_ct}

    # the annotator's final label: the INT8 model's liver, corrected by hand (a second structure added as value 2)
    answer = pacs_server.post(f"/infer/sadnn_seg_int8?image={orthanc_pacs.ct_series}&output=image")
    assert answer.status_code == 200, answer.text
    label_image = _nifti(answer.content, tmp_path, "auto.nii.gz")
    values = sitk.GetArrayFromImage(label_image).astype(np.uint8)
    values[5:9, 300:340, 100:160] = 2
    corrected = sitk.GetImageFromArray(values)
    corrected.CopyInformation(label_image)
    path = tmp_path / "final.nii.gz"
    sitk.WriteImage(corrected, str(path))
    saved = _put_label(pacs_server, orthanc_pacs.ct_series, path)
    assert saved.status_code == 200, saved.text

    segs = _segs_of(orthanc_pacs, orthanc_pacs.ct_series)
    assert len(segs) == 1
    seg = hd.seg.Segmentation.from_dataset(segs[0], copy=False)
    ct = [pydicom.dcmread(f, stop_before_pixels=True) for f in orthanc_pacs.ct_files]
    # geometry: same frame of reference, pixel spacing, rows/columns; one frame per CT slice at its position
    assert seg.FrameOfReferenceUID == ct[0].FrameOfReferenceUID
    assert (seg.Rows, seg.Columns) == (ct[0].Rows, ct[0].Columns)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert np.allclose([float(v) for v in measures.PixelSpacing], [float(v) for v in ct[0].PixelSpacing])
    ct_positions = {tuple(round(float(v), 3) for v in h.ImagePositionPatient) for h in ct}
    seg_positions = {
        tuple(round(float(v), 3) for v in frame.PlanePositionSequence[0].ImagePositionPatient)
        for frame in seg.PerFrameFunctionalGroupsSequence
    }
    assert seg_positions <= ct_positions and len(seg_positions) == len(ct_positions)
    assert str(seg.StudyInstanceUID) == orthanc_pacs.ct_study
    # segments: names and colours of the label map
    names = {d.SegmentNumber: str(d.SegmentLabel) for d in seg.SegmentSequence}
    assert sorted(names.values()) == ["label 2", "liver"]
    liver = next(d for d in seg.SegmentSequence if d.SegmentLabel == "liver")
    assert str(liver.SegmentedPropertyTypeCodeSequence[0].CodeValue) == "10200004"  # SNOMED CT liver
    assert len(liver.RecommendedDisplayCIELabValue) == 3

    # read back with highdicom on the source grid: equal to the submitted label voxel for voxel
    uids = _source_uids_on_volume_grid(orthanc_pacs.ct_files, label_image)
    number_of = {name: number for number, name in names.items()}
    stack = seg.get_pixels_by_source_instance(uids, segment_numbers=[number_of["liver"], number_of["label 2"]])
    read_back = np.zeros(values.shape, np.uint8)
    read_back[stack[..., 0] > 0] = 1
    read_back[stack[..., 1] > 0] = 2
    assert np.array_equal(read_back, values)

    # the next active-learning choice skips the labelled series
    chosen = pacs_server.post("/activelearning/random", json={}).json()
    assert chosen["id"] == second_ct
    assert pacs_server.post("/activelearning/first", json={}).json()["id"] == second_ct
    objects = pacs_server.get("/datastore/", params={"output": "all"}).json()["objects"]
    assert "final" in objects[orthanc_pacs.ct_series]["labels"]
    assert unlabelled_before - {orthanc_pacs.ct_series} == {second_ct}


def test_training_on_the_pacs_labels_publishes_new_weights(pacs_server, orthanc_pacs) -> None:
    """``POST /train/sadnn_seg``: the training subprocess opens the PACS datastore itself, trains on the series whose
    SEG is in the PACS, re-quantises and publishes; the served INT8 model changes without a restart."""
    if not _segs_of(orthanc_pacs, orthanc_pacs.ct_series):
        pytest.skip("needs the final label submitted by the round-trip test of this module")
    before = pacs_server.get("/model/info/sadnn_seg_int8").json()["checksum"]
    request = {"max_epochs": 1, "num_samples": 2, "train_batch_size": 2, "val_split": 0.0, "calibration_slices": 8}
    started = pacs_server.post("/train/sadnn_seg", json=request)
    assert started.status_code == 200, started.text
    status = pacs_server.wait_for_training()
    assert status["status"] == "DONE", "\n".join(status.get("details", []))
    stats = pacs_server.get("/info/").json()["train_stats"]["sadnn_seg"]
    assert stats["status"] == "PUBLISHED" and stats["train_images"] == [orthanc_pacs.ct_series]
    assert pacs_server.get("/model/info/sadnn_seg_int8").json()["checksum"] != before
    answer = pacs_server.post(f"/infer/sadnn_seg_int8?image={orthanc_pacs.ct_series}&output=json")
    assert (
        answer.status_code == 200 and answer.json()["model_version"]["sha256"] == stats["published"]["int8"]["sha256"]
    )


def test_original_label_stays_local(pacs_server, orthanc_pacs, second_ct, tmp_path) -> None:
    answer = pacs_server.post(f"/infer/sadnn_seg_int8?image={second_ct}&output=image")
    assert answer.status_code == 200, answer.text
    path = tmp_path / "original.nii.gz"
    path.write_bytes(answer.content)
    before = len(_qido_series(orthanc_pacs, Modality="SEG"))
    saved = _put_label(pacs_server, second_ct, path, tag="original")
    assert saved.status_code == 200, saved.text
    assert len(_qido_series(orthanc_pacs, Modality="SEG")) == before
    assert pacs_server.post("/activelearning/first", json={}).json()["id"] == second_ct  # still unlabelled


def test_a_series_no_model_takes_is_422_with_the_reason(pacs_server, orthanc_pacs) -> None:
    answer = pacs_server.post(f"/infer/sadnn_seg_int8?image={orthanc_pacs.sc_series}&output=image")
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert orthanc_pacs.sc_series in detail and "modality OT" in detail and "CT" in detail
    unknown = pacs_server.post("/infer/sadnn_seg_int8?image=1.2.3.4.5&output=image")
    assert unknown.status_code == 404 and "1.2.3.4.5" in unknown.json()["detail"]
    assert pacs_server.get("/info/").status_code == 200


def test_a_submitted_label_off_the_series_grid_is_422(pacs_server, orthanc_pacs, tmp_path) -> None:
    wrong = sitk.Image(64, 64, 20, sitk.sitkUInt8)
    path = tmp_path / "wrong.nii.gz"
    sitk.WriteImage(wrong, str(path))
    before = len(_qido_series(orthanc_pacs, Modality="SEG"))
    answer = _put_label(pacs_server, orthanc_pacs.ct_series, path)
    assert answer.status_code == 422 and "size" in answer.json()["detail"]
    assert len(_qido_series(orthanc_pacs, Modality="SEG")) == before


def test_training_fetches_labelled_series_and_their_segs(orthanc_pacs, tmp_path) -> None:
    """A second workstation (a fresh cache) sees the label submitted above: the datastore's training list holds the
    series with its SEG converted back to the submitted label map."""
    from monailabel_app.lib.dicomweb import PacsDatastore

    segs = _segs_of(orthanc_pacs, orthanc_pacs.ct_series)
    if not segs:
        pytest.skip("needs the final label submitted by the round-trip test of this module")
    store = PacsDatastore(orthanc_pacs.url, str(tmp_path / "cache"), ("CT",), {"liver": 1})
    datalist = store.datalist()
    assert [Path(d["image"]).name for d in datalist] == [f"{orthanc_pacs.ct_series}.nii.gz"]
    label = sitk.ReadImage(datalist[0]["label"])
    image = sitk.ReadImage(datalist[0]["image"])
    assert label.GetSize() == image.GetSize() and np.allclose(label.GetOrigin(), image.GetOrigin())
    seg = hd.seg.Segmentation.from_dataset(segs[-1], copy=False)
    uids = _source_uids_on_volume_grid(orthanc_pacs.ct_files, image)
    numbers = {str(d.SegmentLabel): int(d.SegmentNumber) for d in seg.SegmentSequence}
    stack = seg.get_pixels_by_source_instance(uids, segment_numbers=[numbers["liver"], numbers["label 2"]])
    expected = np.where(stack[..., 1] > 0, 2, np.where(stack[..., 0] > 0, 1, 0))
    assert np.array_equal(sitk.GetArrayFromImage(label), expected)


def test_comparison_map_as_seg_with_its_colours(pacs_server, orthanc_pacs, tmp_path) -> None:
    """An over/under map submitted with ``{"comparison": true}`` becomes a SEG of agreement/over/under segments in
    white, green and red; the server never deletes a SEG from the PACS."""
    from monailabel_app.lib.comparison import COMPARISON_COLOURS
    from monailabel_app.lib.dicomweb.seg import rgb_to_dicom_lab

    files = prepare_sample_series(tmp_path / "third_ct", copy_name="third")
    orthanc_pacs.orthanc.upload(files)
    series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    answer = pacs_server.post(
        f"/infer/sadnn_seg_int8?image={orthanc_pacs.ct_series}&output=image",
    )
    grid = _nifti(answer.content, tmp_path, "grid.nii.gz")
    values = np.zeros(sitk.GetArrayFromImage(grid).shape, np.uint8)
    values[2:5, 100:200, 100:200] = 1
    values[6:8, 100:200, 100:200] = 2
    values[9:12, 300:350, 300:350] = 3
    comparison = sitk.GetImageFromArray(values)
    comparison.CopyInformation(grid)
    sitk.WriteImage(comparison, str(tmp_path / "over_under.nii.gz"))
    saved = _put_label(pacs_server, series, tmp_path / "over_under.nii.gz", params={"comparison": True})
    assert saved.status_code == 200, saved.text
    (seg,) = _segs_of(orthanc_pacs, series)
    colours = {str(d.SegmentLabel): list(d.RecommendedDisplayCIELabValue) for d in seg.SegmentSequence}
    assert colours == {name: rgb_to_dicom_lab(c["rgb"]) for name, c in COMPARISON_COLOURS.items()}
    assert colours["agreement"][0] == 65535  # white: full lightness
    refused = pacs_server.delete("/datastore/label", params={"id": series, "tag": "final"})
    assert refused.status_code == 422 and "PACS" in refused.json()["detail"]
    assert len(_segs_of(orthanc_pacs, series)) == 1


def test_unreachable_pacs_stops_start_up_naming_the_url(tmp_path) -> None:
    from tests.server_fixture import free_port

    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    with pytest.raises(ServerStartError) as failed:
        start_pacs_server(url, tmp_path, timeout=180)
    message = str(failed.value)
    assert f"cannot use the PACS datastore {url}" in message and "cannot be reached" in message


def test_pacs_refusing_credentials_and_then_failing(tmp_path) -> None:
    """An Orthanc that needs a password: no credentials -> start-up fails naming the URL and the setting;
    credentials from MONAI Label's settings -> works. Then a STOW the PACS rejects (its filter refuses SEG objects)
    keeps the label on the server and says so, and a PACS that goes down answers 503 while the server stays up."""
    require_orthanc()
    pacs = start_pacs(tmp_path / "pacs", users={PACS_USER: PACS_PASSWORD})
    try:
        with pytest.raises(ServerStartError) as refused:
            start_pacs_server(pacs.url, tmp_path / "no_credentials", timeout=180)
        assert pacs.url in str(refused.value) and "MONAI_LABEL_DATASTORE_USERNAME" in str(refused.value)
    finally:
        pacs.orthanc.stop()
    # the same PACS again, now refusing SEG objects (an Orthanc Lua filter), with the server given the credentials
    lua = tmp_path / "refuse_seg.lua"
    lua.write_text(
        "function ReceivedInstanceFilter(dicom, origin, info)\n"
        "  if dicom.Modality == 'SEG' then return false end\n"
        "  return true\nend\n"
    )
    orthanc = Orthanc(tmp_path / "pacs" / "orthanc", port=pacs.orthanc.port, users={PACS_USER: PACS_PASSWORD})
    orthanc.config["LuaScripts"] = [str(lua)]
    orthanc.start()
    workdir = tmp_path / "server"
    env = {"MONAI_LABEL_DATASTORE_USERNAME": PACS_USER, "MONAI_LABEL_DATASTORE_PASSWORD": PACS_PASSWORD}
    try:
        server = start_pacs_server(pacs.url, workdir, env=env)
    except Exception:
        orthanc.stop()
        raise
    try:
        assert pacs.ct_series in server.get("/datastore/", params={"output": "all"}).json()["objects"]
        image = server.get("/datastore/image", params={"image": pacs.ct_series})
        assert image.status_code == 200
        volume = _nifti(image.content, tmp_path, "ct.nii.gz")
        values = (sitk.GetArrayFromImage(volume) > 200).astype(np.uint8)
        label = sitk.GetImageFromArray(values)
        label.CopyInformation(volume)
        sitk.WriteImage(label, str(tmp_path / "bone.nii.gz"))
        rejected = _put_label(server, pacs.ct_series, tmp_path / "bone.nii.gz")
        assert rejected.status_code == 502, rejected.text
        detail = rejected.json()["detail"]
        assert "kept on this server" in detail and pacs.url in detail
        kept = server.get("/datastore/label", params={"label": pacs.ct_series, "tag": "final"})
        assert kept.status_code == 200
        assert np.array_equal(sitk.GetArrayFromImage(_nifti(kept.content, tmp_path, "kept.nii.gz")), values)
        assert server.post("/activelearning/first", json={}).json() == {}  # labelled, though only here

        orthanc.stop()  # the PACS goes down
        time.sleep(2.5)  # past the datastore's reuse of its last listing
        listing = server.get("/datastore/", params={"output": "all"})
        assert listing.status_code == 503, listing.text
        assert pacs.url in listing.json()["detail"]
        infer = server.post("/infer/sadnn_seg_int8?image=1.2.3&output=image")
        assert infer.status_code == 503 and "cannot be reached" in infer.json()["detail"]
        assert server.get("/info/").status_code == 200 and server.alive()
        # the series fetched before still works from the cache
        cached = server.post(f"/infer/sadnn_seg_int8?image={pacs.ct_series}&output=json")
        assert cached.status_code == 200, cached.text
    finally:
        server.stop()
        orthanc.stop()


def test_batch_infer_segments_series_straight_from_the_pacs(orthanc_pacs, tmp_path) -> None:
    """``python -m monailabel_app.batch_infer --studies <DICOMweb URL>``: the series are fetched from the PACS (stored
    transfer syntax) and each gets a label on its own grid in ``--out``; the secondary capture is not listed."""
    import subprocess
    import sys

    out = tmp_path / "labels"
    env = {**os.environ, "MONAI_LABEL_DATASTORE_CACHE_PATH": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "monailabel_app.batch_infer", "--studies", orthanc_pacs.url,
         "--model", "sadnn_seg_int8", "--out", str(out)],  # fmt: skip
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads((out / "batch_report.json").read_text())
    assert orthanc_pacs.ct_series in json.dumps(report) and orthanc_pacs.sc_series not in json.dumps(report)
    label = sitk.ReadImage(str(out / f"{orthanc_pacs.ct_series}.nii.gz"))
    assert label.GetSize()[2] == len(orthanc_pacs.ct_files)
    assert int(sitk.GetArrayViewFromImage(label).max()) >= 1  # the liver is found on this abdomen CT
