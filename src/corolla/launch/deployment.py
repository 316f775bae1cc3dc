"""`corolla server` and `corolla client`: a real federation of separate processes over gRPC.

- `corolla server` is the one-shot convenience: it starts Flower's SuperLink (gRPC
  Fleet API) in a home folder (default: the run directory's `.flwr`), registers the
  node keys it is given, submits this app with `flwr run`, streams progress and stops
  the SuperLink when the run ends. For a SuperLink that outlives runs see
  `corolla.launch.superlink` (`corolla superlink` + `corolla run`).
- `corolla client` (corolla.launch.node) is the other side.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from corolla.config import RunConfig
from corolla.launch import processes as launch
from corolla.launch import superlink
from corolla.launch.superlink import Home, LinkSettings


def run_server(cfg: RunConfig, fleet_address: str, flwr_home: Path | None = None, tls: dict[str, str] | None = None,
               timeout: float | None = None, *, insecure: bool = False, auth: bool | None = None,
               register: list[Path] | None = None, control_port: int = 0) -> dict[str, Any]:
    """Start a SuperLink, run the app on whatever SuperNodes join, return summary.json's content.

    `tls`/`insecure`/`auth` follow `superlink.transport` (plaintext only on loopback or with
    `insecure`; node authentication on by default off loopback). `register`: public keys to
    register once the SuperLink listens (already registered ones are kept).
    """
    cfg.check_deployment()
    files, auth_on = superlink.transport(fleet_address, tls=tls, insecure=insecure, auth=auth)
    out = Path(cfg.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)  # the run directory: its owner's alone
    home = Home((flwr_home or out / ".flwr").resolve())
    log_path = out / "superlink.log"
    saved = home.saved().get("control_port") if flwr_home else None  # a kept home keeps its Control API port
    port = control_port or (saved if saved and not launch.port_open("127.0.0.1", saved) else launch.free_port())
    settings = LinkSettings(fleet_address=fleet_address, control_port=port, tls=files, auth=auth_on)
    procs: list[subprocess.Popen] = []
    with launch.running(procs), superlink.watching(home, log_path, "corolla-server"):
        procs.append(superlink.start(home, settings, log_path))
        for key in register or []:
            name, node_id = superlink.register(home, key)
            print(f"corolla-server registered {name} as node {node_id}", flush=True)
        mode = ("TLS" if files else "plaintext") + (", node authentication on" if auth_on else "")
        print(f"corolla-server fleet API on {fleet_address} ({mode}; SuperNodes connect here); home {home.root}",
              flush=True)
        code = launch.flwr_run(superlink.CONNECTION, {**cfg.to_mapping(), "out-dir": str(out)}, home.env(),
                               timeout=timeout)
    summary = out / "summary.json"
    if code != 0 or not summary.exists():
        raise RuntimeError(f"the federation failed (flwr run exited {code}); see {log_path}")
    return json.loads(summary.read_text())
