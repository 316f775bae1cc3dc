"""`corolla sim`: a Ray-simulated federation through Flower's simulation engine.

Starts a private simulation SuperLink (own FLWR_HOME, free ports, own process
group), submits this app with `flwr run`, streams progress, and always reaps the
SuperLink and Ray when the run ends or fails. Ray is a private instance, or an
existing cluster the simulation attaches to (`--ray-address`), which it leaves running.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from corolla.config import RunConfig
from corolla.launch import processes as launch

#: the line the Ray probe prints its findings on
_PROBE_TAG = "corolla-ray-probe "
_PROBE = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False, include_dashboard=False)
nodes = [n for n in ray.nodes() if n["Alive"]]
print(sys.argv[2] + json.dumps({"address": ray.get_runtime_context().gcs_address, "version": ray.__version__,
      "resources": ray.cluster_resources(), "nodes": [n["NodeID"] for n in nodes]}), flush=True)
ray.shutdown()
"""


class RayClusterError(RuntimeError):
    """A Ray cluster to attach to cannot be used; the message names the address, the reason and the fix."""


def probe_ray(address: str, timeout: float = 60.0) -> dict[str, Any]:
    """Connect to the Ray cluster at `address` (`auto`, HOST:PORT, ray://...) from a short-lived driver.

    Returns its GCS address, Ray version, resources and live node ids; RayClusterError
    (one line) when nothing listens there, it is not a Ray cluster, or its Ray differs.
    """
    fix = ("start one with `ray start --head --port=6379` (workers: `ray start --address=HEAD:6379`) and pass the "
           "address `ray status` prints, or drop --ray-address for a private Ray instance")
    if address != "auto" and "://" not in address:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise RayClusterError(f"--ray-address {address!r} is not auto or HOST:PORT (e.g. 10.0.0.5:6379); {fix}.")
        if not launch.port_open(host, int(port)):
            raise RayClusterError(f"no Ray cluster answers at {address} (nothing accepts connections on that port); "
                                  f"{fix}.")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-c", _PROBE, address, _PROBE_TAG], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        launch.stop(proc)
        raise RayClusterError(f"the Ray cluster at {address} did not accept a driver within {timeout:.0f}s; check "
                              f"`ray status --address={address}` on the head node, or {fix}.") from None
    finally:
        launch.stop(proc)
    for line in out.splitlines():
        if line.startswith(_PROBE_TAG):
            return json.loads(line[len(_PROBE_TAG):])
    reasons = [ln.strip() for ln in err.splitlines() if ln.strip() and "Error" in ln and not ln.startswith(" ")]
    reason = reasons[-1] if reasons else (err.strip().splitlines() or ["no output"])[-1]
    raise RayClusterError(f"cannot attach to the Ray cluster at {address}: {reason[:300]}; {fix}.")


def local_gpus() -> int:
    """GPUs a private Ray instance would see here (Ray's own detection: NVIDIA devices, CUDA_VISIBLE_DEVICES)."""
    try:
        from ray._private.accelerators import NvidiaGPUAcceleratorManager as gpus

        n = gpus.get_current_node_num_accelerators()
        visible = gpus.get_current_process_visible_accelerator_ids()
        return min(n, len(visible)) if visible is not None else n
    except Exception:  # noqa: BLE001 - no driver, no library: no GPU Ray could use
        return 0


def check_gpus(gpus_per_client: float, available: float, where: str) -> None:
    """Refuse a GPU fraction Ray cannot schedule: no GPU, more than there is, or a non-integer above 1."""
    if gpus_per_client < 0:
        raise RayClusterError(f"--gpus-per-client {gpus_per_client:g} is negative; give a fraction such as 0.25.")
    if gpus_per_client == 0:
        return
    if available <= 0:
        raise RayClusterError(f"--gpus-per-client {gpus_per_client:g} asks for GPUs, but {where} has none; drop "
                              "--gpus-per-client (CPU training) or run on a machine (or Ray cluster) with CUDA GPUs.")
    if gpus_per_client > 1 and not float(gpus_per_client).is_integer():
        raise RayClusterError(f"--gpus-per-client {gpus_per_client:g}: Ray shares a GPU only in fractions up to 1 "
                              "(0.25 = four clients per GPU) or gives whole GPUs (2); pick one of those.")
    if gpus_per_client > available:
        raise RayClusterError(f"--gpus-per-client {gpus_per_client:g} is more than the {available:g} GPU(s) {where} "
                              "has, so no client could start; lower it.")


def run_simulation(cfg: RunConfig, num_supernodes: int, cpus_per_client: int = 1, total_cpus: int | None = None,
                   timeout: float | None = None, log_path: Path | None = None, ray_address: str | None = None,
                   gpus_per_client: float = 0.0) -> dict[str, Any]:
    """Run a simulation of `num_supernodes` nodes; return summary.json's content.

    Ray is a private instance (its own temp dir, `total_cpus` CPUs), or with
    `ray_address` the existing cluster there: the simulation's driver attaches to it
    (RAY_ADDRESS) and actors go wherever the cluster has room. `gpus_per_client` is each
    actor's GPU share (Flower's `client-resources-num-gpus`).
    """
    out = Path(cfg.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)  # the run directory: its owner's alone
    flwr_home = out / ".flwr"
    total = total_cpus or os.cpu_count() or 1
    # the SuperLink starts the simulation process (Ray's driver), so Ray's settings go into the SuperLink's environment
    link_env = {"RAY_DEDUP_LOGS": "0", "OMP_NUM_THREADS": str(cpus_per_client), "RAY_ADDRESS": ""}
    ray_address = ray_address or os.environ.get("RAY_ADDRESS") or None  # Ray's own convention: attach
    if ray_address:
        cluster = probe_ray(ray_address)
        check_gpus(gpus_per_client, cluster["resources"].get("GPU", 0.0), f"the Ray cluster at {ray_address}")
        link_env["RAY_ADDRESS"] = cluster["address"]
    else:
        check_gpus(gpus_per_client, local_gpus(), "this machine")
    env = launch.flower_env(flwr_home, link_env)
    options = launch.simulation_options(num_supernodes, cpus_per_client, None if ray_address else total,
                                        gpus_per_client)
    procs: list = []
    with launch.running(procs):
        link, address = launch.start_superlink(flwr_home, simulation=True, log_path=out / "superlink.log", env=link_env)
        procs.append(link)
        launch.write_connection(flwr_home, "corolla-sim", address)
        run_cfg = {**cfg.to_mapping(), "out-dir": str(out)}
        code = launch.flwr_run("corolla-sim", run_cfg, env, timeout=timeout, log_path=log_path,
                               federation_config=options)
    summary_path = out / "summary.json"
    if code != 0 or not summary_path.exists():
        raise RuntimeError(f"the simulation failed (flwr run exited {code}); see {out / 'superlink.log'}"
                           + (f" and {log_path}" if log_path else ""))
    return json.loads(summary_path.read_text())

