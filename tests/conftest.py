"""Process fixtures: every process starts in its own group and is reaped by group."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from corolla.launch import processes as launch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

COROLLA = [sys.executable, "-m", "corolla.cli"]


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen]]:
    """Collect started processes; stop every one (and its group) on exit."""
    with launch.running([]) as procs:
        yield procs


def read_line(proc: subprocess.Popen, prefix: str, timeout: float) -> str:
    """Read the child's stdout until a line starting with `prefix` (bounded)."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sel.select(timeout=0.5):
            if proc.poll() is not None:
                break
            continue
        line = proc.stdout.readline().decode()
        if line.startswith(prefix):
            return line.strip()
        if not line and proc.poll() is not None:
            break
    raise TimeoutError(f"no line starting with {prefix!r} within {timeout}s (exit code {proc.poll()})")


@pytest.fixture
def tiny_silos(tmp_path: Path) -> list[Path]:
    """Three BBC silo files of different label mixes."""
    from corolla.data.silo import write_silos

    return write_silos(tmp_path / "silos", 3, alpha=0.5, seed=0, fmt="csv")


def run_sim(tmp_path: Path, out: Path, nodes: int, sets: dict, *extra: str, timeout: float = 400) -> tuple[int, str]:
    """`corolla sim --out OUT --nodes N --set k=v ...` as a real process group, reaped on exit; (exit code, output)."""
    cmd = [*COROLLA, "sim", "--out", str(out), "--nodes", str(nodes), *extra]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    with processes() as procs:
        p = launch.start(cmd, launch.flower_env(tmp_path / "home"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(p)
        stdout, _ = p.communicate(timeout=timeout)
    return p.returncode, stdout.decode()


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for this test session (tests/pg.py); fails, never skips, when it is not installed."""
    from tests.pg import start_postgres

    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def db_password(monkeypatch):
    """COROLLA_DB_PASSWORD set to the test role's password (inherited by the processes a test starts)."""
    from tests.pg import PASSWORD

    monkeypatch.setenv("COROLLA_DB_PASSWORD", PASSWORD)
    return PASSWORD
