"""Simulation path: run trainer jobs in-process inside a long-lived Ray actor.

The base model is loaded once per actor (not per node: an actor serves many
simulated nodes) and each node's encoded silo is cached, so rounds cost only
training. The servicer's translation code is reused, so simulation and
deployment run byte-for-byte the same job handling.
"""

from __future__ import annotations

import functools
from typing import Any

from flwr.app import Context

from corolla.client.service import TrainerServicer
from corolla.client.trainer import Trainer
from corolla.config import RunConfig
from corolla.fleet import simulated_rank, simulated_slowdown
from corolla.logs import quiet_libraries
from corolla.proto import wire


class _Abort(Exception):
    pass


class _Context:
    """Stands in for grpc.ServicerContext: `abort` raises instead of ending an RPC."""

    def abort(self, code: Any, details: str) -> None:
        raise _Abort(details)


@functools.lru_cache(maxsize=2)
def _adapter_model(spec: Any) -> Any:
    from corolla.client.tasks import build_task
    from corolla.client.training import AdapterModel, select_device

    quiet_libraries()
    return AdapterModel(build_task(spec), select_device())


@functools.lru_cache(maxsize=1024)
def _trainer(spec: Any, partition_id: int, num_partitions: int, alpha: float, rank: int, slowdown: float) -> Trainer:
    model = _adapter_model(spec)
    data = model.task.encode(model.task.builtin_partition(partition_id, num_partitions, alpha))
    return Trainer(model, data, rank, slowdown)


def trainer_for(context: Context) -> Trainer:
    """Return this simulated node's trainer (built on first use, then cached in the actor)."""
    cfg = RunConfig.from_mapping(dict(context.run_config))
    pid = int(context.node_config[wire.NODE_PARTITION])
    n = int(context.node_config[wire.NODE_PARTITIONS])
    # on the virtual clock a job's duration is simulated (server/virtual.py): the trainer must not also sleep
    slowdown = simulated_slowdown(cfg, pid) if cfg.clock == "real" else 1.0
    return _trainer(cfg.task_spec(), pid, n, cfg.dirichlet_alpha, simulated_rank(cfg, pid), slowdown)


def handle(context: Context, method: str, request: Any) -> Any:
    """Run `method` (Describe/Train) of the servicer in-process."""
    from corolla.client.app import ClientJobError

    servicer = TrainerServicer(trainer_for(context))
    try:
        return getattr(servicer, method)(request, _Context())
    except _Abort as e:
        raise ClientJobError(str(e)) from None
