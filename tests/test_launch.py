"""`launch.stop` reaps a process, its group and every descendant, including one in a session of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from corolla.launch import processes as launch

#: a parent that starts a child in a new session (as Flower's SuperExec starts flwr-serverapp), prints its pid, waits
PARENT = """
import subprocess, sys, time
import pytest

pytestmark = pytest.mark.slow  # starts real processes (SuperLink, SuperNodes, trainers, Ray)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie waiting for its reaper counts as gone
    except FileNotFoundError:
        return False


def test_stop_kills_a_descendant_outside_the_process_group():
    proc = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        child = int(proc.stdout.readline())
        assert os.getsid(child) != os.getsid(proc.pid) and launch.descendants(proc.pid) == [child]
        launch.stop(proc, timeout=5)
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is not None and not alive(child)
    finally:
        for pid in (proc.pid,):
            if proc.poll() is None:
                os.kill(pid, 9)


def test_descendants_include_grandchildren():
    proc = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        child = int(proc.stdout.readline())
        mine = launch.descendants(os.getpid())
        assert proc.pid in mine and child in mine and mine.index(proc.pid) < mine.index(child)
    finally:
        launch.stop(proc, timeout=5)
