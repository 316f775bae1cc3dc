"""Faults with real processes: a site's trainer killed while its SuperNode lives.

A SuperLink (`corolla server`, synchronous rounds, tiny BERT), a site as `corolla client`, and
one site split the way a deployment may run it: `corolla trainer` on a fixed port and a
SuperNode beside it whose ClientApp forwards every job there. Every process is in its own
group and reaped by group; every wait polls the run directory with a deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from corolla import launch
from corolla.server.records import read_jsonl
from tests.conftest import processes
from tests.linkhelpers import TINY, start_client, start_server, start_supernode, start_trainer, text

pytestmark = pytest.mark.timeout(240)

#: the split site holds built-in partition 1 of 2; `corolla client` holds partition 0
SPLIT_SITE = ("--partition-id", "1", "--num-partitions", "2")
#: rounds go on until the test has seen what it waits for (then every process is stopped); only version 0 is
#: evaluated, on a few examples, so that a round costs what its jobs cost
ENDLESS = {**TINY, "num-rounds": 200, "eval-every": 1000, "eval-examples": 32}


def rows_when(path: Path, found: Callable[[list[dict]], bool], timeout: float, what: str,
              proc: subprocess.Popen) -> list[dict]:
    """The rows of a JSON-lines record once `found(rows)` holds (bounded; fails early if `proc` exits)."""
    launch.wait_for(lambda: found(read_jsonl(path)), timeout, what, interval=0.5, proc=proc)
    return read_jsonl(path)


def accepted_from(pid: int) -> Callable[[list[dict]], bool]:
    """Whether updates.jsonl rows hold an accepted update trained by the trainer process `pid`."""
    return lambda rows: any(r["status"] == "accepted" and r.get("trainer_pid") == pid for r in rows)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process and its group, as the kernel's OOM killer or a crash would end it (no clean-up)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def test_a_killed_trainer_fails_its_job_and_its_node_gets_work_only_once_the_trainer_is_back(tmp_path):
    out = tmp_path / "run"
    updates, nodes, selections = out / "updates.jsonl", out / "nodes.jsonl", out / "selection.jsonl"
    fleet = f"127.0.0.1:{launch.free_port()}"
    values = {**ENDLESS, "clients-per-round": 2, "min-nodes": 2, "round-timeout": 60}
    port = launch.free_port()
    site = tmp_path / "site1"
    with processes() as procs:
        start_client(procs, tmp_path, "site0", fleet, 0, 2)  # loads its model while the server starts
        server, _ = start_server(procs, tmp_path / "server", out, fleet, values)
        trainer = start_trainer(procs, site, port, *SPLIT_SITE)
        start_supernode(procs, site, fleet, f"127.0.0.1:{port}")

        rows = rows_when(updates, accepted_from(trainer.pid), 120, "an update from the split site", server)
        [node] = {r["node"] for r in rows if r.get("trainer_pid") == trainer.pid}

        kill_group(trainer)
        probes_before = text(site / "supernode.log").count("Receiving: query message")
        rows = rows_when(updates, lambda rs: any(r["node"] == node and r["status"] == "failed" for r in rs), 60,
                         "the killed trainer's failed job", server)
        [failed] = [r for r in rows if r["node"] == node and r["status"] == "failed"]
        # while its trainer is down it is asked for its profile (its SuperNode receives the query) before the restart
        launch.wait_for(lambda: text(site / "supernode.log").count("Receiving: query message") > probes_before, 60,
                        "a profile query to the node whose trainer is down", interval=0.5, proc=server)
        restarted = start_trainer(procs, site, port, *SPLIT_SITE)
        rows = rows_when(updates, accepted_from(restarted.pid), 90, "an update from the restarted trainer", server)
        alive = server.poll() is None
        # what was recorded until then (stopping the processes below makes the server record their departure)
        [back] = [r for r in rows if r.get("trainer_pid") == restarted.pid]
        states = [r for r in read_jsonl(nodes) if r["node"] == node and r["wall_s"] <= back["wall_s"]]
        picks = [s for s in read_jsonl(selections) if s["wall_s"] <= back["wall_s"]]
    assert alive, "the server stopped"

    assert failed["reason"].startswith(f"node {node} replied with error 2: the trainer at 127.0.0.1:{port} is unreachable")
    assert "start it with `corolla client` or `corolla trainer`" in failed["reason"]
    # exactly one job failed: none was sent to the node while its trainer was down
    assert [r["status"] for r in rows if r["node"] == node and r["wall_s"] >= failed["wall_s"]] == ["failed", "accepted"]
    assert [r["status"] for r in states] == ["ok", "unavailable", "ok"]
    assert states[1]["reason"] == failed["reason"]
    down = [s for s in picks if failed["wall_s"] <= s["wall_s"] < states[2]["wall_s"]]
    assert down and all(node not in s["picked"] for s in down)  # the rounds went on without it
    assert back["node"] == node and back["wall_s"] > states[2]["wall_s"] and back["model_loads"] == 1

