"""Flower's SuperLink that starts only corolla's app bundles: `python -m corolla.launch.superlink_guard [args]`.

Flower 1.39's Control API (`flwr run`, node registration) listens on the server host's
loopback without authentication unless account authentication is configured, which needs
an identity provider. Any local user of that host could then start a run whose ServerApp
is its own code, run as the SuperLink's user on the server host. corolla starts its
SuperLinks through this module, which refuses a StartRun whose bundle is not corolla's
(`app_bundle.check_bundle`) or that names a hub app, before Flower stores or runs
anything of it. Everything else is Flower's code. What stays open (registering or
unregistering node keys through the same API) is listed in docs/guide/security.md.
"""

from __future__ import annotations

import sys
from typing import Any


def install() -> None:
    """Wrap the Control API's StartRun handler with corolla's bundle check."""
    from flwr.supercore.error.base import ApiErrorCode, FlowerError
    from flwr.superlink.servicer.control import control_handlers

    from corolla.launch.app_bundle import BundleRefused, check_bundle

    original = control_handlers.start_run

    def start_run(request: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            if request.app_spec or not request.fab.content:
                raise BundleRefused("the run names a stored or hub app; this SuperLink starts only corolla's bundle")
            check_bundle(request.fab.content)
        except BundleRefused as e:
            reason = f"corolla refused the run: {e}"
            print(f"corolla-superlink: {reason}", file=sys.stderr, flush=True)
            raise FlowerError(ApiErrorCode.INVALID_APP_SPEC, reason, public_details=reason) from None
        return original(request, *args, **kwargs)

    control_handlers.start_run = start_run


def main() -> None:
    """Install the check, then hand over to Flower's `flower-superlink` entry point."""
    from flwr.superlink.cli.flower_superlink import flower_superlink

    install()
    sys.argv = ["flower-superlink", *sys.argv[1:]]
    flower_superlink()


if __name__ == "__main__":
    main()
