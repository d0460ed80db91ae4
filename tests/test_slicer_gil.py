# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Background transfers of the panel when the main thread holds Python's GIL, as it does inside Slicer.

Slicer and CTK never turn on PythonQt's thread support, so the main thread keeps the GIL whenever it is in Qt's
C++ event loop; worker threads run Python only while the main thread runs Python (the panel's poll timer). The
simulation: the main thread sleeps in a C function called *without* releasing the GIL (``ctypes.PyDLL``, the way
PythonQt calls into Qt) for the runner's poll interval, then calls ``JobRunner.poll()`` as the panel's QTimer
does. A large upload and download through the real client (to a server in another process, real bytes) must
reach at least half the throughput they reach when the main thread leaves the GIL alone.

Before the fix (1 MB reads, 100 ms timer, no GIL release) the same simulation gave 0.05 (download) and 0.21
(upload) of the free speed for these 64 MB; after it 0.75-1.0 (2-core machine shared with other work).
"""

import ctypes
import hashlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from MedAttnSlicerLib import JobRunner, JobState, MonaiLabelClient

PAYLOAD_BYTES = 64 << 20

#: A plain HTTP server in its own process (its own GIL): GET sends PAYLOAD, PUT reads a body and answers JSON.
SERVER = textwrap.dedent(
    """
    import http.server, json, sys
    payload = open(sys.argv[1], "rb").read()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Content-Disposition", 'attachment; filename="image.nii.gz"')
            self.end_headers()
            self.wfile.write(payload)

        def do_PUT(self):
            remaining = int(self.headers["Content-Length"])
            while remaining:
                remaining -= len(self.rfile.read(min(remaining, 1 << 20)))
            body = json.dumps({"image": "uploaded"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()
    """
)


@pytest.fixture(scope="module")
def bulk_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bulk")
    payload = folder / "payload.bin"
    payload.write_bytes(os.urandom(PAYLOAD_BYTES))
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(payload)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}", payload
    finally:
        proc.kill()
        proc.wait(10)


#: A C function that sleeps while holding the GIL, as Qt's event loop does under PythonQt.
_sleep_holding_gil = ctypes.PyDLL(None).usleep
_sleep_holding_gil.argtypes = [ctypes.c_uint]


def _run(function, gil_held: bool) -> float:
    """Seconds to finish ``function`` as a job, with the main thread free or holding the GIL between polls."""
    runner = JobRunner()
    started = time.perf_counter()
    job = runner.submit("transfer", function)
    if gil_held:
        while not job.done:
            _sleep_holding_gil(runner.poll_interval_ms * 1000)  # Qt's event loop between two timer ticks
            runner.poll()  # the panel's QTimer slot
    else:
        runner.wait(job, timeout_s=120)
    elapsed = time.perf_counter() - started
    assert job.state == JobState.FINISHED, job.error
    return elapsed


def _best(function, gil_held: bool, runs: int = 3) -> float:
    return min(_run(function, gil_held) for _ in range(runs))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="usleep through ctypes.PyDLL(None) is Linux libc")
def test_the_gil_holding_main_thread_simulation_starves_a_plain_thread():
    """The simulation is faithful: a worker that needs the GIL often gets it only at the polls."""
    runner = JobRunner(gil_release_s=0.0)
    counts = []

    def count(ctx):
        deadline = time.perf_counter() + 0.5
        steps = 0
        while time.perf_counter() < deadline:
            time.sleep(0)  # gives the GIL up and needs it back, like a read loop of small chunks
            steps += 1
        counts.append(steps)

    job = runner.submit("count", count)
    while not job.done:
        _sleep_holding_gil(100_000)
        runner.poll()
    assert counts and counts[0] < 50, counts  # ~one step per 100 ms poll, not the millions of a free thread


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="usleep through ctypes.PyDLL(None) is Linux libc")
@pytest.mark.parametrize("direction", ["download", "upload"])
def test_large_transfer_under_a_gil_holding_main_thread_keeps_half_the_speed(bulk_server, tmp_path, direction):
    url, payload = bulk_server
    client = MonaiLabelClient(url, download_dir=str(tmp_path))
    expected = hashlib.sha256(payload.read_bytes()).hexdigest()

    def download(ctx):
        path = client.download_image("image", dest_dir=str(tmp_path), cancel=ctx.cancel_token)
        received.append(path)

    def upload(ctx):
        assert client.upload_image(str(payload), cancel=ctx.cancel_token) == "uploaded"

    received = []
    function = {"download": download, "upload": upload}[direction]
    free = _best(function, gil_held=False)
    held = _best(function, gil_held=True)
    ratio = free / held
    for path in received:  # the bytes arrived intact (checked outside the timed runs)
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == expected
    print(f"{direction} of {PAYLOAD_BYTES >> 20} MB: free {free:.3f} s, GIL held {held:.3f} s, ratio {ratio:.2f}")
    assert ratio >= 0.5, f"{direction}: {ratio:.2f} of the free-thread throughput ({free:.3f} s vs {held:.3f} s)"
