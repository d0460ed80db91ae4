# Copyright MedAttnSlicer contributors. Apache-2.0.
"""The process helpers the server launcher and the local PACS share: stopping a process group, waiting for an answer."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from monailabel_app.launcher import free_port, stop_process_group, wait_for_answer

# a leader that starts a child in its own group, prints the child's pid and, with "stubborn", ignores SIGTERM
_LEADER = """
import signal, subprocess, sys, time
if sys.argv[1] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


def _start_leader(mode: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _LEADER, mode], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    return proc, int(proc.stdout.readline())


def _gone(pid: int, within: float = 10.0) -> bool:
    """Whether ``pid`` has exited (it is not our child: it may stay a zombie until init reaps it)."""
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("mode", ["polite", "stubborn"])
def test_stop_process_group_ends_the_leader_and_its_children(mode: str):
    proc, child = _start_leader(mode)
    try:
        started = time.time()
        stop_process_group(proc, timeout=1.0)
        elapsed = time.time() - started
        assert proc.returncode == (-15 if mode == "polite" else -9)
        assert elapsed < 1.0 if mode == "polite" else elapsed >= 1.0  # SIGKILL only after the timeout
        assert _gone(child)
    finally:
        proc.stdout.close()
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()


def test_stop_process_group_leaves_an_exited_process_alone():
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait()
    stop_process_group(proc, timeout=1.0)  # no signal to a process group that may be someone else's by now
    assert proc.returncode == 0


def test_wait_for_answer_says_why_a_process_never_answered():
    exited = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    url = f"http://127.0.0.1:{free_port()}/info/"
    assert wait_for_answer(exited, url, timeout=30, interval=0.1) == "exited with code 3"

    silent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert wait_for_answer(silent, url, timeout=0.5, interval=0.1) == f"did not answer {url} within 0 s"
    finally:
        silent.kill()
        silent.wait()


def test_wait_for_answer_returns_once_the_server_answers(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert wait_for_answer(server, f"http://127.0.0.1:{port}/", timeout=60, interval=0.1) is None
    finally:
        stop_process_group(server, timeout=5.0)
    assert server.returncode is not None
