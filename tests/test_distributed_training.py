# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Data-parallel training on CPU with the real ``torchrun`` launcher on 127.0.0.1 (issue 14, items 1 and 4).

Two ranks of one thread each train on a two-image copy of the sample datastore (each rank its own image), for a few
steps: rank 0 publishes FP32 + INT8, which load and segment; both ranks end with the same weights, which are the
published ones; a rank killed mid-run fails the run with a message naming it and leaves the published checkpoint
as it was; wrong rendezvous settings fail at once, naming the setting; and ``POST /train`` with ``workers: 2`` does
the same through a real server. Item 2: 2 ranks x 1 thread end with the weights of 1 process x 1 thread on the
same global batch (``seed_per_image`` and ``freeze_batchnorm``), and a different global batch ends elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from monailabel_app.lib.trainers.distributed import LaunchSettings, parameter_digest, rank_share, threads_per_rank
from tests.server_fixture import copy_sample_datastore, free_port, start_server

REPO_ROOT = Path(__file__).resolve().parent.parent

IMAGES = ("example_ct_sm", "example_mr_sm")
BUNDLED = REPO_ROOT / "monailabel_app" / "model"
FEW_STEPS = ["--set", "num_samples=2", "--set", "train_batch_size=1", "--set", "val_split=0",
             "--set", "calibration_slices=8"]  # fmt: skip


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_sample_datastore(tmp_path_factory.mktemp("ddp_studies"), images=IMAGES)


def _train_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "monailabel_app.train", *args]


def _train_args(studies: Path, model_dir: Path, *more: str) -> list[str]:
    """``monailabel_app.train`` arguments: SaDNN-seg on ``studies``, published into ``model_dir``, then ``more``."""
    return ["--studies", str(studies), "--model", "sadnn_seg", "--conf", "model_dir", str(model_dir), *more]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=str(REPO_ROOT))


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _seed_published(model_dir: Path) -> dict[str, bytes]:
    """Publish the bundled SaDNN-seg pair into ``model_dir`` (what a server would serve) and return its bytes."""
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in ("sadnn_seg.pt", "sadnn_seg_int8.pt"):
        shutil.copy2(BUNDLED / name, model_dir / name)
    return {name: (model_dir / name).read_bytes() for name in ("sadnn_seg.pt", "sadnn_seg_int8.pt")}


# ------------------------------------------------------------------------------------------------ units
def test_rank_shares_split_the_images_and_pad_evenly():
    items = ["a", "b", "c"]
    assert rank_share(items, 0, 2, even=True) == ["a", "c"]
    assert rank_share(items, 1, 2, even=True) == ["b", "a"]  # padded: both ranks take two steps
    assert rank_share(items, 1, 2, even=False) == ["b"]
    assert rank_share(["a"], 1, 2, even=True) == ["a"]  # fewer images than ranks: every rank gets them all
    assert threads_per_rank(2, cores=2) == 1 and threads_per_rank(4, cores=2) == 1 and threads_per_rank(2, cores=8) == 4


@pytest.mark.parametrize(
    "settings, named",
    [
        (dict(workers=0), "workers"),
        (dict(workers="two"), "workers"),
        (dict(workers=2, nnodes=2), "rdzv_endpoint"),  # several machines need the first one's address
        (dict(workers=2, rdzv_endpoint="127.0.0.1"), "HOST:PORT"),
        (dict(workers=2, rdzv_endpoint="127.0.0.1:70000"), "outside 1..65535"),
        (dict(workers=2, nnodes=2, rdzv_endpoint="no-such-host.invalid:29400"), "cannot be resolved"),
        (dict(workers=2, join_timeout=0), "join_timeout"),
    ],
)
def test_wrong_launch_settings_are_named(settings, named):
    with pytest.raises(ValueError, match=named):
        LaunchSettings(**settings).validated()


def test_rendezvous_port_in_use_is_named():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=f"port {port} is already in use"):
            LaunchSettings(workers=2, rdzv_endpoint=f"127.0.0.1:{port}").validated()


# ------------------------------------------------------------------------------------------- torchrun
def _check_published_pair(studies: Path, model_dir: Path, stats: dict, before: dict[str, bytes]) -> None:
    """All-reduced gradients: both replicas hold bit-identical weights, they are the published FP32 ones, the INT8
    twin was re-quantised from them, and the pair loads the way the server loads it and segments a real slice alike."""
    from monailabel_app.lib.model_store import load_network
    from networks.checkpoint import load_checkpoint
    from networks.kernels import load_kernels

    digests = stats["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    published_fp32, metadata = load_checkpoint(str(model_dir / "sadnn_seg.pt"))
    assert parameter_digest(published_fp32) == digests[0]
    bundled, _ = load_checkpoint(str(BUNDLED / "sadnn_seg.pt"))
    assert parameter_digest(bundled) != digests[0]  # training changed the weights it started from
    assert metadata["app"]["trained"]["world_size"] == 2
    assert (model_dir / "sadnn_seg_int8.pt").read_bytes() != before["sadnn_seg_int8.pt"]  # re-quantised

    load_kernels()
    fp32, _ = load_network(str(model_dir / "sadnn_seg.pt"), "fp32")
    int8, int8_meta = load_network(str(model_dir / "sadnn_seg_int8.pt"), "int8")
    assert int8_meta["trained"]["run_id"] == metadata["app"]["trained"]["run_id"]
    import SimpleITK as sitk

    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(studies / "example_ct_sm.nii.gz"))).astype("float32")
    ct = torch.from_numpy(volume[volume.shape[0] // 2]).clamp(-160, 240)
    ct = (ct - ct.min()) / (ct.max() - ct.min())
    x = torch.nn.functional.interpolate(ct[None, None], size=(256, 256), mode="bilinear")
    with torch.no_grad():
        a, b = fp32(x).argmax(1), int8(x).argmax(1)
    assert a.shape == b.shape == (1, 256, 256)
    assert (a == b).float().mean() > 0.9


@pytest.mark.slow
def test_a_killed_rank_fails_the_run_and_leaves_the_published_checkpoint(studies: Path, tmp_path: Path):
    model_dir = tmp_path / "models"
    before = _seed_published(model_dir)
    stats_path = model_dir / "sadnn_seg_train_stats.json"
    args = _train_args(studies, model_dir, "--set", "max_epochs=1000", *FEW_STEPS, "--workers", "2")
    proc = subprocess.Popen(_train_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline, victim = time.time() + 300, None
        while time.time() < deadline and proc.poll() is None:
            stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
            if stats.get("status") == "RUNNING" and (stats.get("epoch") or 0) >= 1 and stats.get("distributed"):
                victim = next(r for r in stats["distributed"]["ranks"] if r["rank"] == 1)
                break
            time.sleep(0.5)
        assert victim is not None, f"training never started: {proc.poll()}"
        os.kill(victim["pid"], signal.SIGKILL)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, out[-2000:] + err[-2000:]
    message = err.strip().splitlines()[-1]
    assert "rank 1 of 2" in message and "SIGKILL" in message and "nothing was published" in message, message
    assert {name: (model_dir / name).read_bytes() for name in before} == before
    assert not list(model_dir.glob(".*.staged"))
    stats = json.loads(stats_path.read_text())
    assert stats["status"] == "FAILED" and "rank 1 of 2" in stats["error"]


@pytest.mark.slow
def test_a_machine_that_never_joins_fails_within_the_join_timeout(studies: Path, tmp_path: Path):
    endpoint = f"127.0.0.1:{free_port()}"
    args = _train_args(studies, tmp_path / "models", "--workers", "1", "--nnodes", "2", "--rdzv-endpoint", endpoint,
                       "--join-timeout", "3")  # fmt: skip
    start = time.time()
    result = _run(_train_cli(*args), timeout=240)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    assert f"rdzv_endpoint {endpoint}" in message and "nnodes 2" in message and "join_timeout 3 s" in message, message
    assert time.time() - start < 120
    assert not (tmp_path / "models" / "sadnn_seg.pt").exists()


def test_cli_names_a_wrong_setting_before_starting_anything(studies: Path, tmp_path: Path):
    args = _train_args(studies, tmp_path / "models", "--workers", "2", "--rdzv-endpoint", "127.0.0.1:notaport")
    result = _run(_train_cli(*args), timeout=240)
    assert result.returncode == 2
    assert "rdzv_endpoint '127.0.0.1:notaport' must be HOST:PORT" in result.stderr


# ---------------------------------------------------------------------------------------------- server
@pytest.mark.slow
def test_train_with_two_workers_through_the_server(tmp_path_factory: pytest.TempPathFactory):
    server_studies = copy_sample_datastore(tmp_path_factory.mktemp("ddp_server_studies"), images=IMAGES)
    model_dir = tmp_path_factory.mktemp("ddp_server_models")
    log = tmp_path_factory.mktemp("ddp_server_log") / "server.log"
    conf = {"models": "sadnn_cls", "model_dir": str(model_dir)}
    with start_server(server_studies, conf, log_path=log) as server:
        # wrong settings: 422 naming the setting, before any process starts; nothing runs or is published
        for bad, named in (
            (dict(workers=0), "workers must be at least 1"),
            (dict(workers=2, rdzv_endpoint="x"), "HOST:PORT"),
        ):
            r = server.post("/train/sadnn_cls", json={**bad, "max_epochs": 1})
            assert r.status_code == 422 and named in r.json()["detail"], r.text
        assert not list(model_dir.glob("sadnn_cls*.pt"))

        request = {"workers": 2, "max_epochs": 1, "num_samples": 2, "train_batch_size": 1, "val_split": 0,
                   "calibration_slices": 8}  # fmt: skip
        assert server.post("/train/sadnn_cls", json=request).status_code == 200
        status = server.wait_for_training()
        assert status["status"] == "DONE", "\n".join(status.get("details", []))
        stats = server.get("/info/").json()["train_stats"]["sadnn_cls"]
        assert stats["status"] == "PUBLISHED" and stats["distributed"]["world_size"] == 2
        assert stats["replica_digests"][0] == stats["replica_digests"][1]
        ranks = stats["distributed"]["ranks"]
        assert sorted(sum((r["train_images"] for r in ranks), [])) == sorted(IMAGES)
        # the server serves what rank 0 published, without a restart
        multipart = {"params": (None, json.dumps({"rise_masks": 16}))}
        r = server.post("/infer/sadnn_cls_int8", params={"image": "example_mr_sm", "output": "json"}, files=multipart)
        assert r.status_code == 200, r.text
        assert r.json()["model_version"]["sha256"] == stats["published"]["int8"]["sha256"]

        # DELETE /train stops every rank of a running distributed run; nothing is published
        published = {p.name: p.read_bytes() for p in model_dir.glob("sadnn_cls*.pt")}
        assert server.post("/train/sadnn_cls", json={**request, "max_epochs": 1000}).status_code == 200
        deadline, ranks = time.time() + 300, None
        while time.time() < deadline and ranks is None:
            stats = server.get("/info/").json()["train_stats"]["sadnn_cls"]
            if stats.get("status") == "RUNNING" and (stats.get("epoch") or 0) >= 1 and stats.get("distributed"):
                ranks = stats["distributed"]["ranks"]
            time.sleep(0.5)
        assert ranks is not None, server.log_tail()
        assert server.delete("/train/").json()["status"] == "STOPPED"
        gone_by = time.time() + 30
        while time.time() < gone_by and any(_running(r["pid"]) for r in ranks):
            time.sleep(0.5)
        assert [r["pid"] for r in ranks if _running(r["pid"])] == []
        assert server.get("/info/").json()["train_stats"]["sadnn_cls"]["status"] == "STOPPED"
        assert {p.name: p.read_bytes() for p in model_dir.glob("sadnn_cls*.pt")} == published


def _run_machines(launcher_args: list[list[str]]) -> list[tuple[int, str, str]]:
    """One training launcher per argument list, run at once (as on separate machines): ``(returncode, stdout,
    stderr)`` of each; a launcher still alive after 600 s or an error is killed."""
    machines = [
        subprocess.Popen(_train_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        for args in launcher_args
    ]
    try:
        outputs = [m.communicate(timeout=600) for m in machines]
    finally:
        for m in machines:
            if m.poll() is None:
                m.kill()
    return [(m.returncode, out, err) for m, (out, err) in zip(machines, outputs, strict=True)]


def _report(results: list[tuple[int, str, str]]) -> str:
    """Every launcher's exit code and output tail: the root cause of a failed run is often on another machine than
    the one whose assertion failed (its agent loses the rendezvous store when the first machine's agent exits)."""
    return "\n".join(
        f"--- launcher {i}: exit code {code}\n{out[-3000:]}\n{err[-3000:]}"
        for i, (code, out, err) in enumerate(results)
    )


@pytest.mark.slow
def test_two_machines_meet_at_the_rendezvous_endpoint(studies: Path, tmp_path: Path):
    """``--nnodes 2``: two launchers (two torchrun agents, as on two machines; here both on 127.0.0.1) meet at one
    ``--rdzv-endpoint``, train one rank each on its own image, and one of them publishes the pair both replicas hold.
    (2 ranks on one machine: the server test, the killed-rank test and the same-global-batch test.)"""
    model_dir = tmp_path / "models"
    before = _seed_published(model_dir)
    endpoint = f"127.0.0.1:{free_port()}"
    args = _train_args(studies, model_dir, "--set", "max_epochs=1", *FEW_STEPS, "--workers", "1", "--nnodes", "2",
                       "--rdzv-endpoint", endpoint, "--rdzv-id", "two_machines", "--join-timeout", "120")  # fmt: skip
    results = _run_machines([args, args])
    assert [code for code, _, _ in results] == [0, 0], _report(results)
    stats = json.loads((model_dir / "sadnn_seg_train_stats.json").read_text())
    assert stats["status"] == "PUBLISHED" and stats["distributed"]["world_size"] == 2
    assert stats["distributed"]["backend"] == "gloo"
    ranks = sorted(stats["distributed"]["ranks"], key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["pid"] != ranks[1]["pid"]
    # the datastore split between the ranks: each trained on its own image
    assert sorted(ranks[0]["train_images"] + ranks[1]["train_images"]) == sorted(IMAGES)
    assert ranks[0]["train_images"] != ranks[1]["train_images"]
    assert all(r["threads"] == threads_per_rank(1) for r in ranks)
    assert [r["publishes"] for r in ranks] == [True, False]
    _check_published_pair(studies, model_dir, stats, before)


@pytest.mark.slow
def test_machines_with_different_datastores_fail_at_the_start(studies: Path, tmp_path: Path):
    """Ranks split the images by position: two machines whose datastores differ would overlap and miss images, so
    the run stops right after the rendezvous, naming the ranks that differ, and publishes nothing."""
    other = copy_sample_datastore(tmp_path / "other_studies", images=IMAGES[:1])
    endpoint = f"127.0.0.1:{free_port()}"
    common = ["--set", "max_epochs=1", *FEW_STEPS, "--workers", "1", "--nnodes", "2", "--rdzv-endpoint", endpoint,
              "--rdzv-id", "differ", "--join-timeout", "120"]  # fmt: skip
    results = _run_machines([_train_args(folder, tmp_path / "models", *common) for folder in (studies, other)])
    assert [code for code, _, _ in results] == [1, 1], _report(results)
    for _, _, err in results:
        message = err.strip().splitlines()[-1]
        assert "exited with code 1" in message and "see different labelled images than rank 0" in message, message
        assert "every machine needs the same datastore" in message
    assert not (tmp_path / "models" / "sadnn_seg.pt").exists()


# ------------------------------------------------------------------------------------- same training
# the same run whatever the number of ranks: samples drawn per image (not per rank) and BatchNorm on its running
# statistics (DDP keeps BN batch statistics per rank; SyncBatchNorm refuses CPU tensors), so that a global step's
# gradient is the mean of per-slice gradients whichever process computed them (see lib/trainers/reproducible.py)
SAME_RUN = ["--model", "sadnn_cls", "--set", "max_epochs=3", "--set", "num_samples=2", "--set", "val_split=0",
            "--set", "calibration_slices=8", "--set", "seed_per_image=true", "--set", "freeze_batchnorm=true",
            "--threads", "1"]  # fmt: skip


def _state(path: Path) -> dict[str, torch.Tensor]:
    from networks.checkpoint import load_checkpoint

    model, _ = load_checkpoint(str(path))
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_samples_follow_the_image_not_the_process_and_frozen_batchnorm_keeps_its_statistics():
    from monai.data import Dataset
    from monai.transforms import Compose, RandGaussianNoised

    from monailabel_app.lib.trainers.reproducible import ImageSeededDataset, freeze_batchnorm

    items = [{"image": f"/d/{name}.nii.gz", "x": torch.zeros(4)} for name in ("a", "b")]

    def dataset(datalist):
        return ImageSeededDataset(Dataset(datalist, Compose([RandGaussianNoised("x", prob=1.0)])), datalist, seed=0)

    both, only_b = dataset(items), dataset(items[1:])
    first_b = both[1]["x"]
    assert torch.equal(first_b, only_b[0]["x"])  # image b's 1st draw, whichever dataset (rank) holds it
    assert not torch.equal(first_b, both[1]["x"])  # its 2nd draw (next epoch) differs
    assert not torch.equal(both[0]["x"], first_b)  # and image a draws its own

    network = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)).train()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    hooks = freeze_batchnorm(network)
    x = torch.randn(2, 1, 8, 8)
    frozen = network(x)
    assert all(torch.equal(v, network.state_dict()[k]) for k, v in before.items())  # running statistics untouched
    assert torch.allclose(frozen, network.eval()(x))  # normalised as at inference
    for hook in hooks:
        hook.remove()
    network.train()(x)
    assert not torch.equal(before["1.running_mean"], network.state_dict()["1.running_mean"])  # undone


@pytest.mark.slow
def test_two_ranks_end_with_the_weights_of_one_process_on_the_same_global_batch(studies: Path, tmp_path: Path):
    """2 ranks x 1 volume per step and 1 process x 2 volumes per step (same global batch, seeds, 3 steps) publish the
    same weights within float tolerance; 1 process x 1 volume per step (another global batch) does not."""
    runs = {  # name: (ranks, volumes per rank per step)
        "two_ranks": (2, 1),
        "one_process": (1, 2),
        "other_batch": (1, 1),
    }
    launchers = [
        ["--studies", str(studies), *SAME_RUN, "--conf", "model_dir", str(tmp_path / name),
         "--set", f"train_batch_size={batch}", "--workers", str(ranks), "--output", str(tmp_path / f"{name}.json")]
        for name, (ranks, batch) in runs.items()
    ]  # fmt: skip
    results = _run_machines(launchers)
    assert [code for code, _, _ in results] == [0] * len(launchers), _report(results)
    stats = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in runs}
    assert [stats[name]["iterations"] for name in runs] == [3, 3, 6]
    ranks = stats["two_ranks"]["distributed"]["ranks"]
    assert sorted(len(r["train_images"]) for r in ranks) == [1, 1]  # each rank its own volume, one per step
    assert sorted(sum((r["train_images"] for r in ranks), [])) == sorted(IMAGES)
    assert stats["one_process"].get("distributed") is None

    weights = {name: _state(tmp_path / name / "sadnn_cls.pt") for name in runs}
    same = _max_difference(weights["two_ranks"], weights["one_process"])
    other = _max_difference(weights["two_ranks"], weights["other_batch"])
    # all-reducing the mean of 2 gradients vs one mean over both volumes: rounding only (measured 1.6e-7)
    assert same < 1e-5, f"2 ranks and 1 process differ by {same:.3g} on the same global batch"
    # a different global batch (1 volume per step, twice the steps) is a different training, far beyond rounding
    assert other > max(1e-4, 100 * same), f"another global batch ended within {other:.3g} of the 2-rank weights"
