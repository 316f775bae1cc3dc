"""Simulation path: run trainer jobs in-process inside a long-lived Ray actor.

The base model is loaded once per actor (not per node: an actor serves many
simulated nodes) and each node's encoded silo is cached, so rounds cost only
training. The servicer's translation code is reused, so simulation and
deployment run byte-for-byte the same job handling.
"""

from __future__ import annotations

import functools
import os
import socket
from typing import Any

from flwr.app import Context

from corolla.client.errors import ClientJobError
from corolla.client.trainer import Trainer
from corolla.client.trainer_service import TrainerServicer
from corolla.config import RunConfig
from corolla.config.fleet import simulated_rank, simulated_slowdown
from corolla.logs import quiet_libraries
from corolla.proto import wire


class _Abort(Exception):
    pass


class _Context:
    """Stands in for grpc.ServicerContext: `abort` raises instead of ending an RPC."""

    def abort(self, code: Any, details: str) -> None:
        raise _Abort(details)


def _ray_gpu_ids() -> list[str]:
    """The GPUs Ray assigned this actor (`--gpus-per-client`), as physical ids; [] outside Ray or without GPUs."""
    try:
        import ray

        return [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
    except Exception:  # noqa: BLE001 - no Ray worker context: not a Ray actor
        return []


def actor_device() -> str:
    """The torch device of this actor: the GPU Ray assigned it, else CUDA when present, else the CPU.

    Ray narrows CUDA_VISIBLE_DEVICES to an actor's GPUs, so its GPU is cuda:0 there; when
    that is switched off (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES) the assigned id is
    looked up among the visible ones, so the actor never falls back to GPU 0 by mistake.
    """
    ids = _ray_gpu_ids()
    if not ids:
        return "auto"
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return f"cuda:{visible.index(ids[0])}" if ids[0] in visible else "cuda:0"


def placement() -> str:
    """Where this actor runs: host, process, Ray node id and assigned GPUs (reported in the node's profile).

    The process id matches `trainer_pid` in updates.jsonl, so every job can be traced to its Ray node and GPU.
    """
    where = [f"host={socket.gethostname()}", f"pid={os.getpid()}"]
    try:
        import ray

        if ray.is_initialized():
            where.append(f"ray-node={ray.get_runtime_context().get_node_id()[:12]}")
    except Exception:  # noqa: BLE001 - not in a Ray worker
        pass
    ids = _ray_gpu_ids()
    if ids:
        where.append(f"gpu={','.join(ids)}")
    return " ".join(where)


@functools.lru_cache(maxsize=2)
def _adapter_model(spec: Any) -> Any:
    from corolla.learning.tasks import build_task
    from corolla.learning.train_loop import AdapterModel, select_device

    quiet_libraries()
    return AdapterModel(build_task(spec), select_device(actor_device()))


@functools.lru_cache(maxsize=1024)
def _trainer(spec: Any, sim_data: Any, partition_id: int, num_partitions: int, alpha: float, rank: int,
             slowdown: float) -> Trainer:
    model = _adapter_model(spec)
    if sim_data is not None:  # the user's files (`corolla sim --data`)
        from corolla.data.simulated import load_node

        ds = load_node(model.task, sim_data, partition_id, num_partitions)
    else:
        ds = model.task.builtin_partition(partition_id, num_partitions, alpha)
    return Trainer(model, model.task.encode(ds), rank, slowdown)


@functools.lru_cache(maxsize=8)
def _parsed(items: tuple[tuple[str, Any], ...]) -> RunConfig:
    return RunConfig.from_mapping(dict(items))


def run_config_of(context: Context) -> RunConfig:
    """The run's configuration, parsed once per run in this process (every message of a run carries the same one).

    An actor serves every message of many simulated nodes; validating the whole
    configuration for each was repeated work, so it is cached by the run-config's
    items (a new run, or a changed value, parses afresh).
    """
    return _parsed(tuple(sorted(context.run_config.items())))


def trainer_for(context: Context) -> Trainer:
    """Return this simulated node's trainer (built on first use, then cached in the actor)."""
    from corolla.data.simulated import SimData

    cfg = run_config_of(context)
    pid = int(context.node_config[wire.NODE_PARTITION])
    n = int(context.node_config[wire.NODE_PARTITIONS])
    # on the virtual clock a job's duration is simulated (launch/virtual.py): the trainer must not also sleep
    slowdown = simulated_slowdown(cfg, pid) if cfg.clock == "real" else 1.0
    alpha = 0.0 if cfg.partitioner == "iid" else cfg.dirichlet_alpha  # the built-in corpus: alpha <= 0 is IID
    return _trainer(cfg.task_spec(), SimData.from_config(cfg), pid, n, alpha, simulated_rank(cfg, pid), slowdown)


def handle(context: Context, method: str, request: Any) -> Any:
    """Run `method` (Describe/Train) of the servicer in-process."""
    servicer = TrainerServicer(trainer_for(context))
    try:
        reply = getattr(servicer, method)(request, _Context())
    except _Abort as e:
        raise ClientJobError(str(e)) from None
    if method == "Describe":  # say where the simulated node's job ran: host, Ray node, GPU
        reply.device = f"{reply.device} {placement()}"
    return reply
