"""`corolla server` and `corolla client`: a real federation of separate processes over gRPC.

- `corolla server` starts Flower's SuperLink (gRPC Fleet API) and submits this app
  with `flwr run`; it streams progress and stops the SuperLink when the run ends.
- `corolla client` starts the silo's trainer (model loaded once, silo read once)
  and a `flower-supernode` pointed at the SuperLink whose node config carries the
  trainer's address; the ClientApp that Flower starts per message forwards each
  job to the trainer.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from server import launch
from server.config import RunConfig


def run_server(cfg: RunConfig, fleet_address: str, flwr_home: Path | None = None, tls: dict[str, str] | None = None,
               timeout: float | None = None) -> dict[str, Any]:
    """Start a SuperLink, run the app on whatever SuperNodes join, return summary.json's content."""
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


def run_client(args: argparse.Namespace) -> int:
    """Start the trainer in this process and a SuperNode beside it; run until signalled or the SuperNode exits."""
    from client.serve import start_trainer

    started = start_trainer(args, "127.0.0.1:0", "corolla client")
    if started is None:
        return 2
    server, port = started
    node_config = {"trainer-address": f"127.0.0.1:{port}", "partition-id": args.partition_id,
                   "num-partitions": args.num_partitions}
    cmd = [sys.executable, "-m", "client.supernode", "--superlink", args.superlink, "--grpc-rere",
           "--node-config", launch.run_config_arg(node_config),
           "--host", "127.0.0.1", "--port", str(args.node_port or launch.free_port())]
    cmd += ["--root-certificates", args.root_certificates] if args.root_certificates else ["--insecure"]
    if args.auth_key:
        cmd += ["--auth-supernode-private-key", args.auth_key]
    flwr_home = Path(args.flwr_home or Path.home() / ".flwr")
    node = launch.start(cmd, launch.flower_env(flwr_home, {"COROLLA_SUPERNODE_POLL_S": str(args.poll_interval)}))
    print(f"corolla-client trainer on 127.0.0.1:{port}, supernode pid {node.pid} -> {args.superlink}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.is_set() and node.poll() is None:
            stop.wait(0.5)
    finally:
        launch.stop(node)
        server.stop(grace=1).wait()
    return 0 if stop.is_set() else (node.returncode or 0)
