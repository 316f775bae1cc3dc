"""A SuperLink that outlives one run (`corolla superlink` + `corolla run`), on 127.0.0.1.

- two runs submitted one after another are served by the same clients, whose trainers load the model once;
- a client survives a SuperLink restart: its SuperNode reconnects and serves the next run under the same node id.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corolla.launch import processes as launch
from corolla.server.records import read_jsonl
from tests.conftest import processes
from tests.linkhelpers import TINY, corolla, joined_node, sets, start_client, start_superlink, text, wait_text

pytestmark = pytest.mark.slow  # starts real processes (SuperLink, SuperNodes, trainers, Ray)


def submit(tmp_path: Path, home: Path, out: Path, **values) -> dict:
    """`corolla run --home HOME --out OUT`; return summary.json (the command prints it too)."""
    r = corolla(tmp_path, "run", "--home", str(home), "--out", str(out), *sets({**TINY, **values}), "--timeout", "240",
                timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "corolla run: started run" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(r.stdout[r.stdout.rindex("\n{"):]) == summary
    return summary


def accepted(out: Path) -> list[dict]:
    return [u for u in read_jsonl(out / "updates.jsonl") if u["status"] == "accepted"]


def test_long_lived_superlink_serves_two_runs_with_the_same_clients(tmp_path):
    home = tmp_path / "home"
    fleet = f"127.0.0.1:{launch.free_port()}"
    with processes() as procs:
        start_superlink(procs, tmp_path, home, fleet=fleet, control_port=launch.free_port())
        clients = [start_client(procs, tmp_path, f"site{i}", fleet, i, 2) for i in range(2)]
        ids = {joined_node(log, 150, proc) for proc, log in clients}
        first = submit(tmp_path, home, tmp_path / "run1", **{"min-nodes": 2, "clients-per-round": 2})
        second = submit(tmp_path, home, tmp_path / "run2", **{"min-nodes": 2, "clients-per-round": 2, "lr": 0.01})
        assert all(p.poll() is None for p, _ in clients)
    assert first["versions"] == second["versions"] == 1
    one, two = accepted(tmp_path / "run1"), accepted(tmp_path / "run2")
    assert {u["node"] for u in one} == {u["node"] for u in two} == ids
    # the same trainer processes served both runs, and each loaded the base model once in its life
    assert {u["trainer_pid"] for u in one} == {u["trainer_pid"] for u in two} and len({u["trainer_pid"] for u in one}) == 2
    assert all(u["model_loads"] == 1 for u in one + two)
    assert json.loads((tmp_path / "run2" / "config.json").read_text())["lr"] == 0.01


def test_client_survives_a_superlink_restart(tmp_path):
    home = tmp_path / "home"
    fleet = f"127.0.0.1:{launch.free_port()}"
    with processes() as procs:
        link = start_superlink(procs, tmp_path, home, fleet=fleet, control_port=launch.free_port())
        client, log = start_client(procs, tmp_path, "site0", fleet, 0, 1)
        node_id = joined_node(log, 150, client)
        launch.stop(link)  # SIGTERM to `corolla superlink`: it stops Flower's SuperLink (and its SuperExec) by group
        assert link.returncode == 0
        # the SuperNode's first retry after the link goes down: seconds when idle, over 60 s once seen in CI while a
        # benchmark shared the 2 cores, so the wait allows 150 s like the join above (a readiness wait, not a bound)
        wait_text(log, "Connection attempt failed", 150, client)
        assert client.poll() is None
        # the same home: same Fleet address, Control API port and state database, no flags repeated
        start_superlink(procs, tmp_path, home)
        wait_text(log, "Connection successful after", 90, client)
        summary = submit(tmp_path, home, tmp_path / "after", **{"min-nodes": 1, "clients-per-round": 1})
        assert client.poll() is None
    assert summary["versions"] == 1
    updates = accepted(tmp_path / "after")
    assert [u["node"] for u in updates] == [node_id] and updates[0]["model_loads"] == 1
    assert text(log).count("corolla-client joined as node") == 1


def test_run_refuses_without_a_running_superlink(tmp_path):
    r = corolla(tmp_path, "run", "--home", str(tmp_path / "home"), "--out", str(tmp_path / "run"))
    assert r.returncode == 1 and "corolla superlink --home" in r.stderr and r.stderr.count("\n") == 1
    r = corolla(tmp_path, "nodes", "list", "--home", str(tmp_path))
    assert r.returncode == 0 and "not a SuperLink home" in r.stdout


def test_run_that_outlives_its_timeout_is_stopped(tmp_path):
    """No node ever joins: `corolla run --timeout` gives up, says so, and stops the run on the SuperLink."""
    home = tmp_path / "home"
    with processes() as procs:
        start_superlink(procs, tmp_path, home, fleet=f"127.0.0.1:{launch.free_port()}", control_port=launch.free_port())
        r = corolla(tmp_path, "run", "--home", str(home), "--out", str(tmp_path / "run"),
                    *sets({**TINY, "min-nodes": 1}), "--timeout", "10", timeout=120)
        assert r.returncode == 1, r.stderr
        assert "did not finish within 10s" in r.stderr and "corolla run: stopped run" in r.stderr
        wait_text(home / "superlink.log", "ControlServicer.StopRun", 30)
