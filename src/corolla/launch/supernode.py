"""Flower's SuperNode with a shorter idle poll: `python -m client.supernode [flower-supernode args]`.

Flower 1.39's SuperNode sleeps a hard-coded 3 s whenever a poll of the SuperLink
finds no message, and its SuperExec polls for work every 1 s: together most of
the ≈ 8.6 s from a push to training (platform.md). `corolla client` runs the
SuperNode through this module, which shortens the idle sleep to
`COROLLA_SUPERNODE_POLL_S` (default 0.5 s) and sets Flower's own
`FLWR_SUPEREXEC_TASK_POLL_INTERVAL` (default here 0.1 s). Everything else is
Flower's code. The price: each idle node polls the SuperLink 6× as often — for
fleets of thousands of nodes raise the interval (`corolla client --poll-interval 3`
restores Flower's behaviour).
"""

from __future__ import annotations

import os
import sys
import time
import types

FLOWER_IDLE_SLEEP_S = 3


def _patched_time(poll_s: float) -> types.ModuleType:
    shim = types.ModuleType("time")
    shim.__dict__.update({k: getattr(time, k) for k in dir(time) if not k.startswith("__")})

    def sleep(seconds: float) -> None:
        time.sleep(poll_s if seconds == FLOWER_IDLE_SLEEP_S else seconds)

    shim.sleep = sleep  # type: ignore[attr-defined]
    return shim


def main() -> None:
    """Patch the idle sleep, then hand over to Flower's `flower-supernode` entry point."""
    import flwr.supernode.start_client_internal as internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    poll_s = float(os.environ.get("COROLLA_SUPERNODE_POLL_S", "0.5"))
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(min(poll_s, 0.1)))
    internal.time = _patched_time(poll_s)  # type: ignore[attr-defined]
    sys.argv = ["flower-supernode", *sys.argv[1:]]
    flower_supernode()


if __name__ == "__main__":
    main()
