# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Many annotators, one server: inferences run off the event loop, first come first served, in a bounded queue.

The pool itself (FIFO order, torch threads per worker, refusal when full, errors handed back) is tested directly;
then a real server (``monailabel start_server`` on 127.0.0.1) with one inference worker and room for one waiting
request shows over HTTP that the first inference's label arrives before a later one finishes, that ``/info`` and
``/datastore`` answer while inferences run, and that a third concurrent inference is answered 503 with
``Retry-After`` while the server stays up.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import SimpleITK as sitk
import torch

from monailabel_app.lib.serving import OffloadMiddleware, PoolFullError, ServingConfig, WorkerPool, default_workers
from tests.image_checks import assert_same_grid
from tests.server_fixture import ServerHandle, start_sample_server

MODEL = "sadnn_seg_int8"
IMAGE = "example_ct"  # 122 x 101 x 112: a few seconds per inference on 2 cores


# ----- the pool, without a server -----
def test_pool_runs_jobs_in_arrival_order_with_its_torch_threads_and_refuses_beyond_its_queue():
    pool = WorkerPool("test", workers=1, torch_threads=1, max_waiting=2)
    gate = threading.Event()
    order: list[int] = []

    def job(index: int):
        async def run():
            if index == 0:
                await asyncio.get_running_loop().run_in_executor(None, gate.wait, 10)
            order.append(index)
            return index, torch.get_num_threads(), threading.current_thread().name

        return run

    async def main():
        first = asyncio.ensure_future(pool.run(job(0)))
        await asyncio.sleep(0.2)  # job 0 occupies the only worker
        queued = [asyncio.ensure_future(pool.run(job(i))) for i in (1, 2)]
        await asyncio.sleep(0.1)
        assert pool.status()["running"] == 1 and pool.status()["waiting"] == 2
        with pytest.raises(PoolFullError) as refused:
            await pool.run(job(3))
        assert refused.value.retry_after >= 1
        gate.set()
        return await asyncio.gather(first, *queued)

    results = asyncio.run(main())
    assert order == [0, 1, 2]
    assert [r[0] for r in results] == [0, 1, 2]
    assert all(r[1] == 1 and r[2].startswith("test-") for r in results)
    status = pool.status()
    assert status["served"] == 3 and status["refused"] == 1 and status["running"] == 0 and status["waiting"] == 0
    pool.close()


def test_pool_hands_a_job_error_back_to_the_awaiting_request():
    pool = WorkerPool("test", workers=1, torch_threads=0, max_waiting=1)

    async def failing():
        raise ValueError("bad image")

    async def main():
        with pytest.raises(ValueError, match="bad image"):
            await pool.run(failing)

        async def fine():
            return "still serving"

        return await pool.run(fine)

    assert asyncio.run(main()) == "still serving"
    pool.close()


def test_pool_sizes_follow_the_cores_and_the_conf():
    assert default_workers(1) == 1 and default_workers(2) == 2 and default_workers(8) == 4
    two = ServingConfig.from_conf({}, cores=2)
    assert (two.workers, two.torch_threads, two.max_waiting) == (2, 1, 32)
    eight = ServingConfig.from_conf({}, cores=8)
    assert (eight.workers, eight.torch_threads) == (4, 2)
    four = ServingConfig.from_conf({}, threads=4, cores=8)  # --conf threads 4: the pool uses 4 of the 8 cores
    assert (four.workers, four.torch_threads) == (2, 2)
    chosen = ServingConfig.from_conf({"infer_workers": "1", "infer_queue": "0"}, cores=2)
    assert (chosen.workers, chosen.torch_threads, chosen.max_waiting) == (1, 2, 0)
    with pytest.raises(ValueError, match="infer_workers"):
        ServingConfig.from_conf({"infer_workers": "two"}, cores=2)
    with pytest.raises(ValueError, match="infer_queue"):
        ServingConfig.from_conf({"infer_queue": "-1"}, cores=2)


def test_heavy_requests_go_to_their_pool_and_light_ones_stay_on_the_event_loop():
    pools = {"infer": WorkerPool("infer", 1, 0, 1), "io": WorkerPool("io", 1, 0, 1)}
    middleware = OffloadMiddleware(None, pools, "")

    def pool_of(method: str, path: str, query: bytes = b"") -> str | None:
        pool = middleware.pool_for({"type": "http", "method": method, "path": path, "query_string": query})
        return pool.name if pool else None

    assert pool_of("POST", "/infer/sadnn_seg_int8") == "infer"
    assert pool_of("POST", "/activelearning/tta_uncertainty") == "infer"
    assert pool_of("POST", "/scoring/over_under", b"run_sync=true") == "infer"
    assert pool_of("POST", "/scoring/over_under") is None  # a background subprocess: nothing to offload
    assert pool_of("PUT", "/datastore/label") == "io" and pool_of("PUT", "/datastore/image") == "io"
    assert pool_of("PUT", "/datastore/") == "io" and pool_of("PUT", "/session/") == "io"
    for method, path in (("GET", "/info/"), ("GET", "/datastore/"), ("GET", "/train/"), ("POST", "/train/sadnn_seg")):
        assert pool_of(method, path) is None, path
    for pool in pools.values():
        pool.close()


# ----- the real server -----
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    conf = {"models": MODEL, "infer_workers": "1", "infer_queue": "1"}
    with start_sample_server(tmp_path_factory, (IMAGE,), conf=conf) as handle:
        yield handle


def _pool(server: ServerHandle) -> dict:
    return server.get("/info/", timeout=30).json()["serving"]["infer"]


def _wait_for(server: ServerHandle, running: int, waiting: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _pool(server)
        if status["running"] == running and status["waiting"] == waiting:
            return
        time.sleep(0.05)
    raise AssertionError(f"pool never reached running={running}, waiting={waiting}: {status}\n{server.log_tail()}")


def _infer(server: ServerHandle, done_at: dict, key: str) -> requests.Response:
    response = server.post(f"/infer/{MODEL}", params={"image": IMAGE, "output": "image"}, timeout=600)
    done_at[key] = time.monotonic()
    return response


@contextmanager
def one_running_one_waiting(server: ServerHandle, done_at: dict, names: tuple[str, str]):
    """Two inferences from two clients, the second sent once the first runs: one running, one waiting (1 worker)."""
    with ThreadPoolExecutor(2) as clients:
        first = clients.submit(_infer, server, done_at, names[0])
        _wait_for(server, running=1, waiting=0)
        second = clients.submit(_infer, server, done_at, names[1])
        _wait_for(server, running=1, waiting=1)
        yield first, second


@pytest.mark.slow
def test_first_answer_arrives_before_a_later_inference_finishes_and_info_answers_meanwhile(
    server: ServerHandle, tmp_path: Path
):
    assert _pool(server)["workers"] == 1
    server.post(f"/infer/{MODEL}", params={"image": IMAGE, "output": "json"}).raise_for_status()  # warm
    _wait_for(server, running=0, waiting=0)  # the warm-up's job ends just after its answer
    done_at: dict[str, float] = {}
    with one_running_one_waiting(server, done_at, ("first", "second")) as (first, second):
        # light requests while both inferences are in the server (one running, one waiting)
        light: list[tuple[str, float, float]] = []  # (path, latency, answered at)
        while "first" not in done_at:
            for path in ("/info/", "/datastore/?output=all"):
                start = time.monotonic()
                reply = server.get(path, timeout=30)
                assert reply.status_code == 200, reply.text
                light.append((path, time.monotonic() - start, time.monotonic()))
            time.sleep(0.05)
        # the first label is out while the second inference still runs (asked of the pool the moment it arrived:
        # a server that held finished answers until the loop was free could not answer /info/ now)
        at_first_answer = _pool(server)
        second_done_by_then = "second" in done_at
        answers = [first.result(), second.result()]
    for response in answers:
        assert response.status_code == 200, response.text
    label_path = tmp_path / "first.nii.gz"
    label_path.write_bytes(answers[0].content)
    image = sitk.ReadImage(str(server.studies / f"{IMAGE}.nii.gz"))
    assert_same_grid(sitk.ReadImage(str(label_path)), image)
    # first come, first served
    assert not second_done_by_then and at_first_answer["running"] == 1, (at_first_answer, done_at)
    assert done_at["second"] > done_at["first"]
    answered_during = [entry for entry in light if entry[2] < done_at["first"]]
    assert len(answered_during) >= 4, light
    worst = max(latency for _, latency, _ in answered_during)
    # the target is 100 ms p99 on an idle 2-core machine; 1 s leaves room for a loaded shared one (blocked, the
    # event loop made /info wait for a whole inference: 3.3 s)
    assert worst < 1.0, light


@pytest.mark.slow
def test_a_full_queue_answers_503_with_retry_after_and_the_server_keeps_serving(server: ServerHandle):
    _wait_for(server, running=0, waiting=0)
    done_at: dict[str, float] = {}
    with one_running_one_waiting(server, done_at, ("running", "waiting")) as (running, waiting):
        refused = server.post(f"/infer/{MODEL}", params={"image": IMAGE, "output": "json"}, timeout=30)
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["Retry-After"]) >= 1
        assert "queue is full" in refused.json()["detail"]
        assert running.result().status_code == 200
        assert waiting.result().status_code == 200
    _wait_for(server, running=0, waiting=0)
    assert _pool(server)["refused"] >= 1
    assert server.post(f"/infer/{MODEL}", params={"image": IMAGE, "output": "json"}).status_code == 200
