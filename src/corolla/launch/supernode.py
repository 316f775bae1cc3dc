"""Flower's SuperNode with a shorter idle poll: `python -m corolla.launch.supernode [flower-supernode args]`.

Flower 1.39's SuperNode sleeps a hard-coded 3 s whenever a poll of the SuperLink
finds no message, and its SuperExec polls for work every 1 s: together most of
the ≈ 8.6 s from a push to training (platform.md). `corolla client` runs the
SuperNode through this module, which shortens the idle sleep to
`COROLLA_SUPERNODE_POLL_S` (default 0.5 s) and sets Flower's own
`FLWR_SUPEREXEC_TASK_POLL_INTERVAL` (default here 0.1 s). Everything else is
Flower's code. The price: each idle node polls the SuperLink 6× as often — for
fleets of thousands of nodes raise the interval (`corolla client --poll-interval 3`
restores Flower's behaviour).

It also decides which app bundles the site runs: only corolla's own (`app_bundle.check_bundle`:
a pyproject.toml naming the installed corolla's components, no code) unless the site's
operator sets `COROLLA_ALLOW_ANY_APP=1` (`corolla client --allow-any-app`). A refused bundle
is answered with Flower's own FAB-verification error reply, before anything of it is stored
or run. Flower 1.39 verifies signed bundles only for apps fetched from its hub
(`--trusted-entities`), so that mechanism cannot admit a `flwr run` bundle.
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


def _only_corolla_bundles(internal: types.ModuleType) -> None:
    """Route every bundle this SuperNode pulls through `check_bundle`, by Flower's own verification path.

    Flower verifies a bundle when it is given trusted entities: it refuses one without a
    verification record and otherwise asks `_verify_fab`. Every pulled bundle is marked as
    carrying a record, and `_verify_fab` is corolla's check, so a foreign bundle gets Flower's
    FAB-verification error reply and is never stored or run.
    """
    from corolla.launch.app_bundle import BundleRefused, check_bundle

    pull = internal._pull_and_store_message

    def verify(fab: object, _entities: object) -> bool:
        try:
            check_bundle(fab.content)  # type: ignore[attr-defined]
        except BundleRefused as e:
            print(f"corolla-supernode: refused an app bundle: {e}; nothing of it ran. A site that trusts its "
                  "operator with any code starts `corolla client --allow-any-app`.", file=sys.stderr, flush=True)
            return False
        return True

    def pull_checked(*args: object, **kwargs: object) -> object:
        get_fab = kwargs["get_fab"]

        def get_marked(fab_hash: str, run_id: int) -> object:
            fab = get_fab(fab_hash, run_id)  # type: ignore[operator]
            fab.verifications = {**fab.verifications, "valid_license": "checked by corolla"}
            return fab

        kwargs.update(get_fab=get_marked, trusted_entities={"corolla": "the installed corolla package"})
        return pull(*args, **kwargs)

    internal._verify_fab = verify
    internal._pull_and_store_message = pull_checked


def main() -> None:
    """Patch the idle sleep and the bundle check, then hand over to Flower's `flower-supernode` entry point."""
    import flwr.supernode.start_client_internal as internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    poll_s = float(os.environ.get("COROLLA_SUPERNODE_POLL_S", "0.5"))
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(min(poll_s, 0.1)))
    internal.time = _patched_time(poll_s)  # type: ignore[attr-defined]
    if os.environ.get("COROLLA_ALLOW_ANY_APP") != "1":
        _only_corolla_bundles(internal)
    sys.argv = ["flower-supernode", *sys.argv[1:]]
    flower_supernode()


if __name__ == "__main__":
    main()
