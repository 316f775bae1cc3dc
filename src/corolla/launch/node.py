"""`corolla client`: a silo's trainer (model loaded once, silo read once) plus a SuperNode beside it.

The SuperNode's node config carries the trainer's address; the ClientApp that
Flower starts per message forwards each job to the trainer over gRPC.

Transport: TLS (`--root-certificates`, the server's ca.crt) unless the SuperLink is on
loopback or `--insecure` is given; `--auth-key` (needs TLS) signs every request with
the node's key, which the server's operator registers (`corolla nodes register`). The
SuperNode's output is echoed and watched: a refusal, a dropped registration, a TLS
mismatch or an unreachable SuperLink ends in (or adds) one `corolla client:` line on
stderr naming the problem and the fix. A SuperLink that restarts is reconnected to
(Flower's SuperNode retries with backoff, at most 20 s apart; `--max-wait-time` bounds it).
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from corolla import security
from corolla.launch import processes as launch
from corolla.security import SecurityError

#: failed connection attempts before the one hint line about an unreachable SuperLink
UNREACHABLE_HINT_AFTER = 4


def check_transport(args: argparse.Namespace) -> str | None:
    """Apply the client's transport policy before anything starts; return the auth key's fingerprint (or None)."""
    if args.root_certificates and args.insecure:
        raise SecurityError("both --insecure and --root-certificates given: choose TLS (--root-certificates) or "
                            "plaintext (--insecure).")
    if not args.root_certificates and not args.insecure and not security.is_loopback(args.superlink):
        raise SecurityError(f"the SuperLink at {args.superlink} would be reached without TLS: pass --root-certificates "
                            "with the server's ca.crt, or --insecure if that SuperLink runs in plaintext.")
    if args.auth_key and not args.root_certificates:
        raise SecurityError("node authentication (--auth-key) needs TLS: pass --root-certificates with the server's "
                            "ca.crt.")
    if args.root_certificates:
        security.check_root_certificate(args.root_certificates)
    return security.check_node_key(args.auth_key) if args.auth_key else None


class SupernodeWatch(threading.Thread):
    """Echo the SuperNode's output; recognise joining, refusals and TLS problems and explain them in one line."""

    def __init__(self, proc: subprocess.Popen, args: argparse.Namespace, key_fp: str | None) -> None:
        super().__init__(daemon=True, name="supernode-watch")
        self.proc, self.args, self.key_fp = proc, args, key_fp
        self.node_id: int | None = None
        self.problem: str | None = None
        self.failures = 0

    def _key(self) -> str:
        return f"{self.args.auth_key}.pub ({self.key_fp})"

    def run(self) -> None:
        """Read until the SuperNode's output closes."""
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode(errors="replace")
            sys.stdout.write(line)
            sys.stdout.flush()
            self.classify(line)

    def classify(self, line: str) -> None:  # noqa: C901 - one branch per Flower message
        """Update what is known from one line of the SuperNode's output."""
        a = self.args
        if (m := re.search(r"SuperNode ID: (\d+)", line)) and self.node_id is None:
            self.node_id = int(m[1])
            print(f"corolla-client joined as node {self.node_id}", flush=True)
        elif "[code: 2004]" in line:
            self.problem = (f"the SuperLink at {a.superlink} refused this node: its key {self._key()} is not registered; "
                            f"ask the server's operator to run `corolla nodes register --home DIR {Path(a.auth_key).name}"
                            ".pub`, then start this client again.")
        elif "[code: 2001]" in line:
            self.problem = (f"the SuperLink at {a.superlink} requires node authentication: start this client with "
                            "--auth-key KEY (make one with `corolla keys node DIR NAME`) after the server's operator "
                            "registered KEY.pub.")
        elif "WRONG_VERSION_NUMBER" in line:
            self.problem = (f"the SuperLink at {a.superlink} does not speak TLS: it runs in plaintext; ask its operator "
                            "to start it with TLS, or drop --root-certificates/--auth-key and pass --insecure.")
        elif "CERTIFICATE_VERIFY_FAILED" in line or "is not in peer certificate" in line:
            self.problem = (f"the SuperLink's certificate was not accepted: either it is not signed by "
                            f"--root-certificates {a.root_certificates}, or it does not name the address dialled "
                            f"({a.superlink}); use the ca.crt written with the server's certificate by `corolla keys ca`, "
                            "and dial a host the certificate names.")
        elif "handshake" in line.lower() and "error" in line.lower() and self.problem is None:
            self.problem = f"the TLS handshake with {a.superlink} failed (see the lines above); check --root-certificates."
        elif "Giving up reconnection" in line:
            self.problem = (f"gave up reaching the SuperLink at {a.superlink} after --max-wait-time {a.max_wait_time}s; "
                            "check that it runs, then start this client again.")
        elif "Connection attempt failed" in line and self.node_id is None:
            self.failures += 1
            if self.failures == UNREACHABLE_HINT_AFTER:
                tls = "" if a.root_certificates else " (a SuperLink with TLS needs --root-certificates)"
                print(f"corolla client: cannot reach the SuperLink at {a.superlink} yet, still retrying: check the "
                      f"address and that it runs{tls}.", file=sys.stderr, flush=True)
        elif "SuperNode terminated gracefully" in line and self.problem is None and self.node_id is not None \
                and a.auth_key:
            self.problem = (f"the SuperLink stopped accepting this node (node {self.node_id}): its key {self._key()} was "
                            "unregistered by the server's operator, or this machine's clock is more than 5 minutes off; "
                            "ask the operator to register the key again, then start this client again.")


def run_client(args: argparse.Namespace) -> int:
    """Start the trainer in this process and a SuperNode beside it; run until signalled or the SuperNode exits."""
    try:
        key_fp = check_transport(args)
    except SecurityError as e:
        sys.stderr.write(f"corolla client: {e}\n")
        return 2
    from corolla.client.trainer_process import start_trainer  # torch: only once the transport is settled

    started = start_trainer(args, "127.0.0.1:0", "corolla client")
    if started is None:
        return 2
    server, port = started
    node_config = {"trainer-address": f"127.0.0.1:{port}", "partition-id": args.partition_id,
                   "num-partitions": args.num_partitions}
    cmd = [sys.executable, "-m", "corolla.launch.supernode", "--superlink", args.superlink, "--grpc-rere",
           "--node-config", launch.run_config_arg(node_config),
           "--host", "127.0.0.1", "--port", str(args.node_port or launch.free_port())]
    cmd += ["--root-certificates", args.root_certificates] if args.root_certificates else ["--insecure"]
    if args.auth_key:
        cmd += ["--auth-supernode-private-key", args.auth_key]
    if args.max_wait_time:
        cmd += ["--max-wait-time", str(args.max_wait_time)]
    flwr_home = Path(args.flwr_home or Path.home() / ".flwr")
    extra_env = {"COROLLA_SUPERNODE_POLL_S": str(args.poll_interval)}
    if getattr(args, "allow_any_app", False):
        extra_env["COROLLA_ALLOW_ANY_APP"] = "1"
    node = launch.start(cmd, launch.flower_env(flwr_home, extra_env),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    watch = SupernodeWatch(node, args, key_fp)
    watch.start()
    print(f"corolla-client trainer on 127.0.0.1:{port}, supernode pid {node.pid} -> {args.superlink}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.is_set() and node.poll() is None:
            stop.wait(0.5)
    finally:
        launch.stop(node)
        watch.join(5)
        server.stop(grace=1).wait()
    if stop.is_set():
        return 0
    if watch.problem:
        sys.stderr.write(f"corolla client: {watch.problem}\n")
        return 3
    return node.returncode or 0
