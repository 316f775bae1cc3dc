"""`corolla sim --ray-address`: a simulation attached to an existing two-node Ray cluster that the test starts."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from corolla import launch
from corolla.server.simulate import RayClusterError, probe_ray
from tests.conftest import COROLLA, processes, run_sim

RAY = str(launch.BIN / "ray")


def _ray_node(args: list[str], env: dict, log: Path):  # noqa: ANN202 - a Popen
    """`ray start ... --block`: the daemons stay in this process's group, which the test reaps (never `ray stop`,
    which would stop every Ray instance of this user on the machine)."""
    return launch.start([RAY, "start", *args, "--num-cpus=1", "--object-store-memory=100000000", "--block",
                         "--disable-usage-stats", f"--dashboard-agent-listen-port={launch.free_port()}",
                         f"--metrics-export-port={launch.free_port()}"], env, log)


def test_simulation_runs_on_both_nodes_of_an_existing_cluster(tmp_path):
    temp = Path(tempfile.mkdtemp(prefix="cray", dir="/tmp"))  # short: Ray's socket paths must fit AF_UNIX's 107 bytes
    port = launch.free_port()
    address = f"127.0.0.1:{port}"
    env = launch.flower_env(tmp_path / "home", {"RAY_TMPDIR": str(temp)})
    env.pop("RAY_ADDRESS", None)
    try:
        with processes() as procs:
            procs.append(_ray_node(["--head", f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=false",
                                    f"--ray-client-server-port={launch.free_port()}",
                                    f"--dashboard-port={launch.free_port()}"], env, tmp_path / "head.log"))
            launch.wait_for(lambda: launch.port_open("127.0.0.1", port), 60, "the Ray head", proc=procs[0])
            procs.append(_ray_node([f"--address={address}"], env, tmp_path / "worker.log"))
            deadline = time.monotonic() + 90
            while len((cluster := probe_ray(address))["nodes"]) < 2:
                assert time.monotonic() < deadline, f"the worker node did not join: {cluster}"
                time.sleep(1)
            assert cluster["resources"]["CPU"] == 2.0
            out = tmp_path / "run"
            sets = {"model": "tiny-bert", "num-rounds": 1, "clients-per-round": 4, "local-steps": 2, "max-length": 16,
                    "min-nodes": 4, "lr": 0.01}
            code, log = run_sim(tmp_path, out, 4, sets, "--ray-address", address)
            assert code == 0, log[-3000:] + (tmp_path / "head.log").read_text()[-2000:]
            summary = json.loads((out / "summary.json").read_text())
            assert summary["versions"] == 1 and summary["rejected_updates"] == 0
            nodes = [json.loads(ln) for ln in (out / "nodes.jsonl").read_text().splitlines()]
            ran_on = {part.split("=", 1)[1] for n in nodes for part in n["device"].split() if part.startswith("ray-node=")}
            # one Ray actor per cluster node (1 CPU each): the four virtual clients' jobs ran on both machines' nodes
            assert ran_on == {nid[:12] for nid in cluster["nodes"]}, nodes
            assert len(probe_ray(address)["nodes"]) == 2  # the cluster outlives the simulation; only the test stops it
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_unreachable_or_malformed_ray_address_stops_with_one_line(tmp_path):
    port = launch.free_port()
    with pytest.raises(RayClusterError, match=rf"^no Ray cluster answers at 127.0.0.1:{port} \(nothing accepts "
                                              r"connections on that port\); start one with `ray start --head"):
        probe_ray(f"127.0.0.1:{port}")
    with pytest.raises(RayClusterError, match=r"--ray-address 'headnode' is not auto or HOST:PORT"):
        probe_ray("headnode")
    res = subprocess.run([*COROLLA, "sim", "--out", str(tmp_path / "run"), "--nodes", "2", "--set", "model=tiny-bert",
                          "--ray-address", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=120,
                         env=launch.flower_env(tmp_path / "home"))
    assert res.returncode == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines == [f"corolla: no Ray cluster answers at 127.0.0.1:{port} (nothing accepts connections on that port); "
                     "start one with `ray start --head --port=6379` (workers: `ray start --address=HEAD:6379`) and pass "
                     "the address `ray status` prints, or drop --ray-address for a private Ray instance."], res.stderr
    assert not (tmp_path / "run" / ".flwr").exists()  # nothing was started
