"""Container health check: exit 0 when every HOST:PORT given accepts a TCP connection, else 1.

    python /opt/corolla/deploy/docker/healthcheck.py 127.0.0.1:9092

The images' HEALTHCHECK and the Kubernetes exec probes use it: the SuperLink's Fleet
API (9092) on the server, the SuperNode's local API (`corolla client --node-port 9094`,
bound to 127.0.0.1, so a kubelet tcpSocket probe cannot reach it) on a client. The
SuperNode opens that port only after the trainer has loaded its model and silo.
Standard library only; no corolla import, so it costs milliseconds.
"""

from __future__ import annotations

import socket
import sys


def reachable(address: str, timeout: float = 3.0) -> bool:
    """True when HOST:PORT accepts a TCP connection within `timeout` seconds."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def main(argv: list[str]) -> int:
    """Check every address; print the ones that failed."""
    if not argv:
        print("usage: healthcheck.py HOST:PORT [HOST:PORT ...]", file=sys.stderr)
        return 2
    down = [a for a in argv if not reachable(a)]
    for a in down:
        print(f"unhealthy: nothing accepts connections on {a}", file=sys.stderr)
    return 1 if down else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
