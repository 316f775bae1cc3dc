"""`corolla sim`: a Ray-simulated federation through Flower's simulation engine.

Starts a private simulation SuperLink (own FLWR_HOME, free ports, own process
group), submits this app with `flwr run`, streams progress, and always reaps the
SuperLink and Ray when the run ends or fails.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from corolla import launch
from corolla.config import RunConfig


def run_simulation(cfg: RunConfig, num_supernodes: int, cpus_per_client: int = 1, total_cpus: int | None = None,
                   timeout: float | None = None, log_path: Path | None = None) -> dict[str, Any]:
    """Run a simulation of `num_supernodes` nodes; return summary.json's content."""
    import json

    out = Path(cfg.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    flwr_home = out / ".flwr"
    total = total_cpus or os.cpu_count() or 1
    env = launch.flower_env(flwr_home, {"RAY_TMPDIR": str(flwr_home / "ray"), "RAY_DEDUP_LOGS": "0",
                                        "OMP_NUM_THREADS": str(cpus_per_client)})
    procs: list = []
    with launch.running(procs):
        link, address = launch.start_superlink(flwr_home, simulation=True, log_path=out / "superlink.log")
        procs.append(link)
        launch.write_connection(flwr_home, "corolla-sim", address)
        run_cfg = {**cfg.to_mapping(), "out-dir": str(out)}
        code = launch.flwr_run("corolla-sim", run_cfg, env, timeout=timeout, log_path=log_path,
                               federation_config=launch.simulation_options(num_supernodes, cpus_per_client, total))
    summary_path = out / "summary.json"
    if code != 0 or not summary_path.exists():
        raise RuntimeError(f"the simulation failed (flwr run exited {code}); see {out / 'superlink.log'}"
                           + (f" and {log_path}" if log_path else ""))
    return json.loads(summary_path.read_text())

