"""`corolla sim --ray-address`: a simulation attached to an existing two-node Ray cluster that the test starts."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from corolla.launch import processes as launch
from corolla.launch.simulate import RayClusterError, probe_ray
from tests.conftest import COROLLA, processes, run_sim

pytestmark = pytest.mark.slow  # starts real processes (SuperLink, SuperNodes, trainers, Ray)

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


# ---- GPUs in simulation: plumbing and refusals (no test needs a GPU) ----------------------------------------------
def test_gpu_share_and_attach_options_reach_flowers_backend(tmp_path, monkeypatch):
    from corolla.config import RunConfig
    from corolla.launch import simulate

    assert launch.simulation_options(4, 1, 2, 0.25) == {"num-supernodes": 4, "client-resources-num-cpus": 1,
                                                        "client-resources-num-gpus": 0.25, "init-args-num-cpus": 2}
    assert launch.simulation_options(4, 1, None) == {"num-supernodes": 4, "client-resources-num-cpus": 1}
    seen = {}

    def fake_superlink(flwr_home, **kw):
        seen["env"] = kw["env"]
        return subprocess.Popen(["sleep", "30"], start_new_session=True), "127.0.0.1:1"

    def fake_run(connection, run_config, env, **kw):
        seen["options"] = kw["federation_config"]
        return 0

    monkeypatch.setattr(launch, "start_superlink", fake_superlink)
    monkeypatch.setattr(launch, "flwr_run", fake_run)
    monkeypatch.setattr(simulate, "local_gpus", lambda: 2)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = RunConfig.from_mapping({"out-dir": str(tmp_path / "run")})
    with pytest.raises(RuntimeError, match="the simulation failed"):  # no summary: nothing really ran
        simulate.run_simulation(cfg, 4, cpus_per_client=1, total_cpus=2, gpus_per_client=0.25)
    assert seen["options"]["client-resources-num-gpus"] == 0.25 and seen["env"]["RAY_ADDRESS"] == ""
    monkeypatch.setattr(simulate, "probe_ray", lambda a: {"address": "10.0.0.5:6379", "resources": {"CPU": 8.0}})
    with pytest.raises(RayClusterError, match=r"--gpus-per-client 0.5 asks for GPUs, but the Ray cluster at auto has "
                                              r"none; drop --gpus-per-client"):
        simulate.run_simulation(cfg, 4, ray_address="auto", gpus_per_client=0.5)
    with pytest.raises(RuntimeError, match="the simulation failed"):
        simulate.run_simulation(cfg, 4, ray_address="auto")
    assert seen["env"]["RAY_ADDRESS"] == "10.0.0.5:6379" and "init-args-num-cpus" not in seen["options"]


def test_gpu_fractions_ray_cannot_schedule_are_refused():
    from corolla.launch.simulate import check_gpus

    check_gpus(0.25, 1, "this machine")
    check_gpus(2, 4, "this machine")
    for share, gpus, match in [(0.5, 0, "asks for GPUs, but this machine has none"),
                               (1.5, 4, "Ray shares a GPU only in fractions up to 1"),
                               (4, 2, "more than the 2 GPU\\(s\\) this machine has"), (-1, 1, "is negative")]:
        with pytest.raises(RayClusterError, match=match):
            check_gpus(share, gpus, "this machine")


def test_gpus_per_client_without_a_gpu_stops_with_one_line(tmp_path):
    env = launch.flower_env(tmp_path / "home", {"CUDA_VISIBLE_DEVICES": ""})  # no GPU visible, on any machine
    res = subprocess.run([*COROLLA, "sim", "--out", str(tmp_path / "run"), "--nodes", "2", "--set", "model=tiny-bert",
                          "--gpus-per-client", "0.25"], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 1
    assert [ln for ln in res.stderr.splitlines() if ln.strip()] == [
        "corolla: --gpus-per-client 0.25 asks for GPUs, but this machine has none; drop --gpus-per-client (CPU "
        "training) or run on a machine (or Ray cluster) with CUDA GPUs."], res.stderr
    assert not (tmp_path / "run" / ".flwr").exists()


def test_an_actor_trains_on_the_gpu_ray_assigned_it(monkeypatch):
    from corolla.client import local

    monkeypatch.setattr(local, "_ray_gpu_ids", lambda: [])
    assert local.actor_device() == "auto"  # no Ray GPU: CUDA when present, else CPU
    monkeypatch.setattr(local, "_ray_gpu_ids", lambda: ["2"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")  # Ray narrowed the actor's view to its GPU
    assert local.actor_device() == "cuda:0"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: all visible
    assert local.actor_device() == "cuda:2"
    assert local.placement().endswith("gpu=2")


def test_rank_auto_reads_the_memory_of_the_device_in_use(monkeypatch):
    import types

    import torch

    from corolla.client.trainer import GIB, auto_rank, memory_bytes

    sizes = {0: 16 * GIB, 1: 80 * GIB}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=sizes[i]))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert memory_bytes("cuda:0") == 16 * GIB and memory_bytes("cuda:1") == 80 * GIB
    assert memory_bytes("cuda") == 80 * GIB  # the current device, not GPU 0
    assert auto_rank("cuda", memory_bytes("cuda")) == 64 and auto_rank("cuda:0", memory_bytes("cuda:0")) == 8
