"""The silo's long-lived trainer: loads the base model once, trains/evaluates on request.

Flower starts a fresh ClientApp process for every message; this process is what
keeps the model warm between rounds. `corolla client` (or `python -m
client.trainer`) starts it; the ClientApp shim reaches it over proto/trainer.proto.
In simulation the same `Trainer` runs inside the Ray actor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from corolla.client import training
from corolla.client.tasks import Task
from corolla.client.tasks.base import EncodedData
from corolla.client.training import AdapterModel, EvalStats, TrainStats
from corolla.proto import wire
from corolla.spec import LoraSpec

log = logging.getLogger(f"corolla.{__name__}")


class TrainerError(RuntimeError):
    """A job cannot be run by this trainer; the message tells the operator what to change."""


@dataclass(frozen=True, kw_only=True)
class TrainJob:
    """One local training job, as the server asked for it."""

    arrays: Mapping[str, np.ndarray]
    rank: int
    base_version: int
    local_steps: int
    batch_size: int
    lr: float
    prox_mu: float = 0.0
    seed: int = 0
    pushed_at: float = 0.0
    software_version: str = wire.SOFTWARE_VERSION
    frozen: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    lora: LoraSpec = dataclasses.field(default_factory=LoraSpec)


@dataclass(frozen=True)
class TrainResult:
    """A finished job: the new adapter and what the server's validation and selectors need."""

    arrays: dict[str, np.ndarray]
    stats: TrainStats
    base_version: int
    rank: int
    fingerprint: str
    queue_s: float


GIB = 1024**3


def memory_bytes(device: str) -> int:
    """Memory of `device` (that GPU's, not GPU 0's) or physical RAM (CPU), in bytes.

    `cuda` without an index is the process's current CUDA device; a Ray actor sees only
    the GPU Ray assigned it (CUDA_VISIBLE_DEVICES), so its cuda:0 is that GPU.
    """
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index
        if index is None:
            index = torch.cuda.current_device()
        return int(torch.cuda.get_device_properties(index).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def auto_rank(device: str, memory: int) -> int:
    """Pick a rank a device can afford: larger GPUs train larger adapters; CPUs train small ones.

    The tiers are a heuristic for the adapters this project trains (well below
    1 % of the model's weights), chosen so each tier roughly doubles the rank.
    """
    if not device.startswith("cuda"):
        return 4
    gib = memory / GIB
    for threshold, rank in ((70, 64), (40, 32), (20, 16), (10, 8)):
        if gib >= threshold:
            return rank
    return 4


def data_digest(data: EncodedData) -> int:
    """A 31-bit digest of a silo's encoded content, mixed into every job's seed.

    A node's randomness then depends on its data and the server's seed, never on
    the position it was picked in (simulation and deployment train alike).

    Cheap for any size: the labels are hashed block by block (int64 bytes, the same
    digest whether the silo is in memory or memory-mapped) plus the first 64 encoded rows.
    """
    h = hashlib.sha256()
    for block in data.label_blocks():
        h.update(block.tobytes())
    head = data.head(64)
    for k in sorted(head):
        h.update(head[k].numpy().tobytes())
    return int.from_bytes(h.digest()[:4], "little") & 0x7FFFFFFF


class Trainer:
    """One silo: a shared `AdapterModel`, the silo's encoded data and the node's LoRA rank."""

    def __init__(self, model: AdapterModel, data: EncodedData, rank: int, slowdown: float = 1.0) -> None:
        if slowdown < 1:
            raise TrainerError(f"--slowdown must be >= 1 (a factor of the real duration), got {slowdown}.")
        if model.task.uses_lora and rank < 1:
            raise TrainerError(f"LoRA rank must be >= 1, got {rank}; pass --rank with a positive integer.")
        if not model.task.uses_lora:
            rank = 0  # full-model task: no adapter
        if len(data) == 0:
            raise TrainerError("the silo holds no examples; a client needs at least one labelled example.")
        self.model = model
        self.data = data
        self.rank = rank
        self.slowdown = slowdown
        self.digest = data_digest(data)

    @property
    def task(self) -> Task:
        """The task this trainer serves."""
        return self.model.task

    def describe(self) -> dict[str, object]:
        """Return the client profile (proto ClientProfile fields)."""
        device = str(self.model.device)
        return {
            "rank": self.rank, "device": device, "memory_bytes": memory_bytes(device),
            "num_examples": len(self.data), "software_version": wire.SOFTWARE_VERSION,
            "model_fingerprint": self.model.fingerprint, "task": self.task.name, "model_loads": training.MODEL_LOADS,
        }

    def _check_version(self, version: str) -> None:
        if version != wire.SOFTWARE_VERSION:
            raise TrainerError(
                f"the server runs corolla {version} but this trainer runs {wire.SOFTWARE_VERSION}; "
                "install the same corolla version on the server and every client."
            )

    def train(self, job: TrainJob) -> TrainResult:
        """Run one local job; raise TrainerError when the job does not fit this trainer."""
        self._check_version(job.software_version)
        if job.rank != self.rank:
            raise TrainerError(f"the server sent a rank-{job.rank} adapter to a rank-{self.rank} trainer.")
        try:
            arrays, stats = self.model.train(
                job.arrays, job.rank, self.data, lora=job.lora, steps=job.local_steps, batch_size=job.batch_size,
                lr=job.lr, seed=(job.seed * 1_000_003 + self.digest) % 2**62, prox_mu=job.prox_mu, frozen=job.frozen,
            )
        except (ValueError, RuntimeError) as e:
            raise TrainerError(f"training failed: {e}") from e
        if self.slowdown > 1:  # emulate slower hardware: stretch the job to slowdown × its real duration
            time.sleep((self.slowdown - 1) * stats.duration_s)
            stats = dataclasses.replace(stats, duration_s=stats.duration_s * self.slowdown)
        queue_s = stats.started_at - job.pushed_at if job.pushed_at > 0 else float("nan")
        log.info("train: version %d, rank %d, %d steps, loss %.4f, %.2fs (queued %.2fs)",
                 job.base_version, job.rank, stats.steps, stats.loss_mean, stats.duration_s, queue_s)
        return TrainResult(arrays, stats, job.base_version, job.rank, self.model.fingerprint, queue_s)

    def evaluate(self, arrays: Mapping[str, np.ndarray], rank: int, software_version: str,
                 lora: LoraSpec | None = None) -> EvalStats:
        """Evaluate an adapter on this silo."""
        self._check_version(software_version)
        try:
            return self.model.evaluate(arrays, rank, self.data, lora or LoraSpec())
        except (ValueError, RuntimeError) as e:
            raise TrainerError(f"evaluation failed: {e}") from e

