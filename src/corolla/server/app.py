"""The Flower ServerApp: the composition root. Parse the configuration once, build the pieces, run the driver."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from corolla.config import RunConfig
from corolla.logs import setup_logging
from corolla.server.async_driver import run_async
from corolla.server.evaluation import run_evaluator
from corolla.server.federation import Federation
from corolla.server.sync_driver import run_sync

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls in simulation and in deployment."""
    setup_logging()
    cfg = RunConfig.from_mapping(dict(context.run_config))
    fed = Federation(cfg, grid, run_evaluator(cfg))
    (run_async if cfg.mode == "async" else run_sync)(fed)
