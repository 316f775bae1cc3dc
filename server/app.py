"""The Flower ServerApp: parse the run configuration once, build the federation, run its driver."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.async_driver import run_async
from server.config import RunConfig
from server.federation import Federation
from server.logs import setup_logging
from server.sync_driver import run_sync

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls in simulation and in deployment."""
    setup_logging()
    cfg = RunConfig.from_mapping(dict(context.run_config))
    fed = Federation(cfg, grid)
    (run_async if cfg.mode == "async" else run_sync)(fed)
