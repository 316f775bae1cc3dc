"""`corolla client`: a silo's trainer (model loaded once, silo read once) plus a SuperNode beside it.

The SuperNode's node config carries the trainer's address; the ClientApp that
Flower starts per message forwards each job to the trainer over gRPC.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from corolla import launch
from corolla.client.serve import start_trainer


def run_client(args: argparse.Namespace) -> int:
    """Start the trainer in this process and a SuperNode beside it; run until signalled or the SuperNode exits."""
    started = start_trainer(args, "127.0.0.1:0", "corolla client")
    if started is None:
        return 2
    server, port = started
    node_config = {"trainer-address": f"127.0.0.1:{port}", "partition-id": args.partition_id,
                   "num-partitions": args.num_partitions}
    cmd = [sys.executable, "-m", "corolla.client.supernode", "--superlink", args.superlink, "--grpc-rere",
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
