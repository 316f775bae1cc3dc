"""The silo's long-lived trainer: loads the base model once, trains/evaluates on request.

Flower starts a fresh ClientApp process for every message; this process is what
keeps the model warm between rounds. `corolla client` (or `python -m
client.trainer`) starts it; the ClientApp shim reaches it over proto/trainer.proto.
In simulation the same `Trainer` runs inside the Ray actor.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from corolla.learning import train_loop as training
from corolla.learning.tasks import Task
from corolla.learning.tasks.base import EncodedData, Rows, holdout_split
from corolla.learning.train_loop import AdapterModel, EvalStats, TrainStats
from corolla.proto import wire
from corolla.spec import LoraSpec, TaskSpec

log = logging.getLogger(__name__)


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
    #: the share of the silo the run holds out for site evaluation: never trained on (0: train on all of it)
    eval_fraction: float = 0.0
    #: train only the B factors: every lora_A comes back exactly as sent (FFA-LoRA, FedSVD)
    freeze_a: bool = False
    #: > 0: DP-SGD (per-example clipping to this norm, noise dp_sgd_noise × it); ε reported at dp_delta
    dp_sgd_clip: float = 0.0
    dp_sgd_noise: float = 0.0
    dp_delta: float = 1e-5


@dataclass(frozen=True)
class TrainResult:
    """A finished job: the new adapter and what the server's validation and selectors need."""

    arrays: dict[str, np.ndarray]
    stats: TrainStats
    base_version: int
    rank: int
    fingerprint: str
    queue_s: float
    #: DP-SGD: this trainer's ε over every private job it ran (0: none)
    site_epsilon: float = 0.0


GIB = 1024**3
#: held-out prompts a generating task answers at each site evaluation (ROUGE-L): bounds its time
SITE_GENERATIONS = 8


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


#: builds the model and encodes this site's silo for a TaskSpec (client/trainer_process.py); raises on what it cannot load
Loader = Callable[[TaskSpec], tuple[AdapterModel, EncodedData]]


def spec_key(spec: TaskSpec) -> tuple[object, ...]:
    """What makes two TaskSpecs need different models or silo encodings (the trainer's own seed stays its own)."""
    model = spec.model.rstrip("/") or spec.model
    return spec.task, model, spec.dataset, tuple(spec.labels), int(spec.max_length)


def describe_spec(spec: TaskSpec) -> str:
    """`tiny-bert (text-classification, dataset bbc, labels a,b, max-length 32)`: a TaskSpec in one phrase."""
    labels = f"labels {','.join(spec.labels)}" if spec.labels else f"dataset {spec.dataset}"
    return f"{spec.model} ({spec.task}, {labels}, max-length {spec.max_length})"


def spec_differences(run: TaskSpec, held: TaskSpec) -> str:
    """The names (never the values) of the TaskSpec fields in which a run's spec differs from the held one."""
    fields = [("task", run.task != held.task), ("model", run.model.rstrip("/") != held.model.rstrip("/")),
              ("labels", tuple(run.labels) != tuple(held.labels) or run.dataset != held.dataset),
              ("max-length", run.max_length != held.max_length)]
    return ", ".join(name for name, differs in fields if differs) or "settings"


class Trainer:
    """One silo: a shared `AdapterModel`, the silo's encoded data and the node's LoRA rank.

    With `spec` and `loader` (a `corolla client`/`corolla trainer` process) the trainer follows
    the run: a request carrying another TaskSpec rebuilds the model and re-encodes the silo
    once (`ensure`), keeping the old pair until the new one is ready. It holds ONE model: the
    old one is dropped after the swap, so memory peaks at two models during a reload and
    returns to one; only with `--follow-run`. `pinned` (the default of `corolla client` and
    `corolla trainer`) refuses any other spec instead; without a `loader` (simulation,
    in-process tests) requests' specs are not checked.

    What a refusal says goes to the server: it names which fields of the run's spec differ,
    never this site's values (its labels, model path or silo), and the reason a load failed
    stays in this site's log. A server probing label sets then learns only "not this one".
    """

    def __init__(self, model: AdapterModel, data: EncodedData, rank: int, slowdown: float = 1.0, *,
                 spec: TaskSpec | None = None, loader: Loader | None = None, pinned: bool = False,
                 eval_loader: Callable[[Task], EncodedData] | None = None) -> None:
        if slowdown < 1:
            raise TrainerError(f"--slowdown must be >= 1 (a factor of the real duration), got {slowdown}.")
        if model.task.uses_lora and rank < 1:
            raise TrainerError(f"LoRA rank must be >= 1, got {rank}; pass --rank with a positive integer.")
        self.slowdown = slowdown
        self.spec = spec
        self.loader = loader
        self.pinned = pinned
        self._rank = rank
        self._lock = threading.Lock()
        #: encodes the site's own evaluation set (`--eval-data`) for a task: the whole silo then trains
        self.eval_loader = eval_loader
        self.eval_data: EncodedData | None = None
        #: DP-SGD's accountant over every private job of this trainer (sampling rate: batch / training rows)
        self.site_accountant: object | None = None
        self._install(model, data)

    def _install(self, model: AdapterModel, data: EncodedData) -> None:
        if len(data) == 0:
            raise TrainerError("the silo holds no examples; a client needs at least one labelled example.")
        self.model = model
        self.data = data
        self.rank = self._rank if model.task.uses_lora else 0  # full-model task: no adapter
        self.digest = data_digest(data)
        if self.eval_loader is not None:  # encoded for the model it serves (again after a reload)
            self.eval_data = self.eval_loader(model.task)
        self._splits: dict[float, tuple[EncodedData, EncodedData | None]] = {}

    def split(self, eval_fraction: float) -> tuple[EncodedData, EncodedData | None]:
        """(what this site trains on, what it evaluates on) under the run's `eval-fraction`.

        With the site's own `--eval-data` the whole silo trains and that set evaluates;
        otherwise a seeded `eval_fraction` of the silo (the same rows every round: the seed
        is the silo's digest) is held out and never trained on. Fraction 0: no held-out set.
        """
        if self.eval_data is not None:
            return self.data, self.eval_data
        if eval_fraction <= 0:
            return self.data, None
        cached = self._splits.get(eval_fraction)
        if cached is None:
            try:
                train, held = holdout_split(len(self.data), eval_fraction, self.digest)
            except ValueError as e:
                raise TrainerError(str(e)) from None
            cached = (Rows(self.data, train), Rows(self.data, held) if len(held) else None)
            self._splits[eval_fraction] = cached
        return cached

    def ensure(self, spec: TaskSpec | None, fingerprint: str = "") -> bool:
        """Hold `spec`'s model and silo; return True when this call reloaded them.

        Same spec (or the same base model at another path on this site, told by the
        server's `fingerprint`): nothing happens. Another spec: the model is rebuilt and
        the silo re-encoded once, under a lock; the old ones serve until the new ones are
        ready. Raise TrainerError (one line: the problem and the fix) when the spec cannot
        be loaded here or the trainer is pinned; the current model keeps serving.
        """
        if spec is None or self.spec is None:
            return False
        with self._lock:
            held = self.spec
            if fingerprint and fingerprint == self.model.fingerprint and spec.task == held.task:
                spec = dataclasses.replace(spec, model=held.model)  # this site keeps the same weights elsewhere
            spec = dataclasses.replace(spec, seed=held.seed)
            if spec_key(spec) == spec_key(held):
                return False
            if self.pinned or self.loader is None:
                log.warning("refused a run of %s: this trainer serves %s", describe_spec(spec), describe_spec(held))
                raise TrainerError(
                    f"this site's trainer serves another task specification (the run's {spec_differences(spec, held)} "
                    "differ); the site's operator starts a trainer for this run, or with --follow-run."
                )
            t0 = time.perf_counter()
            try:
                model, data = self.loader(spec)
                if len(data) == 0:
                    raise TrainerError("the silo holds no examples for it")
            except Exception as e:  # noqa: BLE001 - any load failure refuses the run, never ends the trainer
                log.warning("cannot switch to %s: %s", describe_spec(spec), e, exc_info=not isinstance(
                    e, (TrainerError, ValueError, OSError)))
                raise TrainerError(
                    f"this site's trainer cannot load the run's {describe_spec(spec)} (the reason is in the site's "
                    "trainer log) and keeps serving its current model; the site's operator makes that model and "
                    "data available there, or starts a trainer for the run."
                ) from None
            old = self.model
            self._install(model, data)
            self.spec = spec
            del old
            gc.collect()  # one model per trainer: free the old one before the next job
            if str(self.model.device).startswith("cuda"):
                import torch

                torch.cuda.empty_cache()
            log.info("reloaded for the run's %s in %.1fs: %d examples, model %s", describe_spec(spec),
                     time.perf_counter() - t0, len(self.data), self.model.fingerprint)
            return True

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
        with self._lock:  # a consistent model/silo pair even if a reload were to run beside this job
            model, (data, _), rank, digest = self.model, self.split(job.eval_fraction), self.rank, self.digest
        if job.rank != rank:
            raise TrainerError(f"the server sent a rank-{job.rank} adapter to a rank-{rank} trainer.")
        dp = training.DPSGD(clip=job.dp_sgd_clip, noise_multiplier=job.dp_sgd_noise) if job.dp_sgd_clip > 0 else None
        if dp is not None and job.prox_mu > 0:
            raise TrainerError("DP-SGD clips each example's gradient of the loss alone; the job's prox-mu term would "
                               "escape the clipping: run DP-SGD with prox-mu 0.")
        try:
            arrays, stats = model.train(
                job.arrays, job.rank, data, lora=job.lora, steps=job.local_steps, batch_size=job.batch_size,
                lr=job.lr, seed=(job.seed * 1_000_003 + digest) % 2**62, prox_mu=job.prox_mu, frozen=job.frozen,
                freeze_a=job.freeze_a, dp_sgd=dp,
            )
        except (ValueError, RuntimeError) as e:
            raise TrainerError(f"training failed: {e}") from e
        site_epsilon = self._charge(job, len(data)) if dp is not None else 0.0
        if self.slowdown > 1:  # emulate slower hardware: stretch the job to slowdown × its real duration
            time.sleep((self.slowdown - 1) * stats.duration_s)
            stats = dataclasses.replace(stats, duration_s=stats.duration_s * self.slowdown)
        queue_s = stats.started_at - job.pushed_at if job.pushed_at > 0 else float("nan")
        log.info("train: version %d, rank %d, %d steps, loss %.4f, %.2fs (queued %.2fs)",
                 job.base_version, job.rank, stats.steps, stats.loss_mean, stats.duration_s, queue_s)
        return TrainResult(arrays, stats, job.base_version, job.rank, model.fingerprint, queue_s, site_epsilon)

    def _charge(self, job: TrainJob, rows: int) -> float:
        """Charge a DP-SGD job's steps to this trainer's accountant (rate: batch / training rows); return ε so far."""
        from opacus.accountants import RDPAccountant

        if self.site_accountant is None:
            self.site_accountant = RDPAccountant()
        acc: RDPAccountant = self.site_accountant  # type: ignore[assignment]
        q = min(1.0, job.batch_size / max(rows, 1))
        for _ in range(job.local_steps):
            acc.step(noise_multiplier=job.dp_sgd_noise, sample_rate=q)
        eps = math.inf if job.dp_sgd_noise == 0 else float(acc.get_epsilon(job.dp_delta))
        log.info("DP-SGD: %d steps at z %.3g, clip %.3g, rate %.3g: this site's ε = %.4g at δ = %g", job.local_steps,
                 job.dp_sgd_noise, job.dp_sgd_clip, q, eps, job.dp_delta)
        return eps

    def personalize(self, job: TrainJob, max_examples: int = 0) -> EvalStats:
        """Fine-tune the job's model on this site's training rows alone, then evaluate it on the held-out rows.

        The personalization gap: how much better a site's own copy of the global model would
        serve it than the global model does. Nothing of it leaves the site but the two numbers.
        """
        result = self.train(job)
        return self.evaluate(result.arrays, job.rank, job.software_version, job.lora, frozen=job.frozen,
                             eval_fraction=job.eval_fraction, max_examples=max_examples)

    def evaluate(self, arrays: Mapping[str, np.ndarray], rank: int, software_version: str,
                 lora: LoraSpec | None = None, *, frozen: Mapping[str, np.ndarray] | None = None,
                 eval_fraction: float = 0.0, max_examples: int = 0) -> EvalStats:
        """Evaluate a global model on this site's held-out data (`split`; its first `max_examples` rows when > 0).

        Raise TrainerError when the site holds nothing out.
        """
        self._check_version(software_version)
        with self._lock:
            model, (_, held) = self.model, self.split(eval_fraction)
        if held is None:
            raise TrainerError("this site holds out no data to evaluate on: the run's eval-fraction is 0 and the "
                               "site gave no --eval-data, or its silo has a single example; set eval-fraction > 0 "
                               "or start the site with --eval-data.")
        if 0 < max_examples < len(held):
            held = Rows(held, np.arange(max_examples))
        t0 = time.perf_counter()
        try:
            stats = model.evaluate(arrays, rank, held, lora or LoraSpec(), frozen=frozen, generate=SITE_GENERATIONS)
        except (ValueError, RuntimeError) as e:
            raise TrainerError(f"evaluation failed: {e}") from e
        if stats.units == 0:
            raise TrainerError(f"none of the {stats.num_examples} held-out examples has a scored token: every answer is "
                               f"cut away by max-length {model.task.spec.max_length}; the run raises max-length")
        log.info("evaluate: rank %d on %d held-out examples: accuracy %.4f, loss %.4f (%.2fs)", rank,
                 stats.num_examples, stats.accuracy, stats.loss, time.perf_counter() - t0)
        return stats

