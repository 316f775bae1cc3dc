"""`corolla server` and `corolla client`: a real federation of separate processes over gRPC.

- `corolla server` starts Flower's SuperLink (gRPC Fleet API) and submits this app
  with `flwr run`; it streams progress and stops the SuperLink when the run ends.
- `corolla client` (corolla.client.node) is the other side.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from corolla import launch
from corolla.config import RunConfig


def run_server(cfg: RunConfig, fleet_address: str, flwr_home: Path | None = None, tls: dict[str, str] | None = None,
               timeout: float | None = None) -> dict[str, Any]:
    """Start a SuperLink, run the app on whatever SuperNodes join, return summary.json's content."""
    cfg.check_deployment()
    out = Path(cfg.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    home = flwr_home or out / ".flwr"
    procs: list[subprocess.Popen] = []
    with launch.running(procs):
        link, address = launch.start_superlink(home, simulation=False, log_path=out / "superlink.log",
                                               fleet_address=fleet_address, tls=tls)
        procs.append(link)
        print(f"corolla-server fleet API on {fleet_address} (SuperNodes connect here)", flush=True)
        launch.write_connection(home, "corolla", address, root_certificates=(tls or {}).get("ca"))
        code = launch.flwr_run("corolla", {**cfg.to_mapping(), "out-dir": str(out)}, launch.flower_env(home),
                               timeout=timeout)
    summary = out / "summary.json"
    if code != 0 or not summary.exists():
        raise RuntimeError(f"the federation failed (flwr run exited {code}); see {out / 'superlink.log'}")
    return json.loads(summary.read_text())
