"""The virtual-clock simulator (`corolla sim --clock virtual`): a discrete-event Grid over in-process ClientApp calls.

Each train job takes a *nominal* duration on a simulated clock — local steps ×
`virtual-step-s` × the node's slowdown from the speed profile (× an optional seeded
lognormal jitter) — instead of however long the host happened to take, so a
benchmark measures the algorithm, not the 2 cores' contention (FedScale's approach).
The jobs themselves run for real, one at a time, through the injected ClientApp (the
product's `corolla.client.app.app` → client/local.py → Trainer path): the drivers,
strategies, selectors, validation and run directory are the real ones; only the
transport and the passage of time are simulated. Deterministic from the run's seed:
durations and event order depend on the configuration alone.

What is virtual: every job's duration, the time between push and reply, the
`wall_s` stamps of the run directory, `time-budget`, `round-timeout`, FedFix's Δt and
`eval-interval`. What takes no virtual time: profiling, evaluation, aggregation and
the driver's own work (a simulated server is infinitely fast).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Context, Error, Message, MessageType
from flwr.common.constant import ErrorCode

from corolla.config import RunConfig
from corolla.config.fleet import simulated_slowdown
from corolla.launch.local_grid import FIRST_NODE_ID, LocalGrid, set_task_identity, simulated_contexts
from corolla.proto import wire
from corolla.server.clock import VirtualClock

log = logging.getLogger(__name__)

#: a ClientApp (or anything called like one): message and node context in, reply out
ClientAppFn = Callable[[Message, Context], Message]


class NominalDurations:
    """A job's simulated duration: local steps × per-step seconds × the node's slowdown × exp(σ z).

    The slowdown is the speed profile's (`corolla.config.fleet.simulated_slowdown`, the factor
    the real clock emulates by sleeping); z ~ N(0, 1) is drawn from a generator seeded
    by (seed, node, the node's job index), so the same configuration gives the same
    durations in any event order. `step_s` None: not known yet; the Grid measures it
    once, from the first job (`virtual-step-s = 0`).
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.step_s: float | None = cfg.virtual_step_s or None
        self.sigma = cfg.virtual_jitter
        self._slowdowns: dict[int, float] = {}

    def slowdown(self, partition_id: int) -> float:
        """The node's speed-profile factor (1: the reference speed)."""
        if partition_id not in self._slowdowns:
            self._slowdowns[partition_id] = simulated_slowdown(self.cfg, partition_id)
        return self._slowdowns[partition_id]

    def __call__(self, partition_id: int, job_index: int, local_steps: int) -> float:
        """Simulated seconds of node `partition_id`'s `job_index`-th job (0-based) of `local_steps` steps."""
        if self.step_s is None:
            raise RuntimeError("NominalDurations.step_s is not known yet (virtual-step-s = 0 measures it first)")
        jitter = 1.0
        if self.sigma > 0:
            z = np.random.default_rng([self.cfg.seed, partition_id, job_index, 11]).standard_normal()
            jitter = math.exp(self.sigma * z)
        return local_steps * self.step_s * self.slowdown(partition_id) * jitter


@dataclass
class _Job:
    """One pushed message: when it was pushed, when its reply is due, and the reply once computed."""

    message: Message
    pushed_at: float
    done_at: float
    seq: int
    duration: float = 0.0
    expired: bool = False
    reply: Message | None = None


class VirtualGrid(LocalGrid):
    """Flower's Grid on a VirtualClock: node i is a ClientApp call with partition i; jobs finish at nominal times.

    `push_messages` schedules every job's reply at push time + its nominal duration
    (a wake-up on the clock), or at its TTL when the duration exceeds it (then the
    reply is an error, as a SuperLink gives for an expired message); `pull_messages`
    returns the requested replies that are due on the clock, in completion order;
    `send_and_receive` moves the clock to the last reply or to `timeout`. Profile
    queries take no simulated time. A job is computed (for real, in this process)
    when its reply is first pulled, so jobs still running at the end cost nothing.
    Each reply's telemetry is restated in simulated time (`duration-s` = the nominal
    duration, `started-at` = the push time, `queue-s` = 0), so selectors that score
    speed (Oort) see the simulated fleet, not the host.
    """

    def __init__(self, num_nodes: int, run_config: RunConfig, client_app: ClientAppFn, clock: VirtualClock,
                 durations: Callable[[int, int, int], float] | None = None, run_id: int = 1) -> None:
        if num_nodes < 1:
            raise ValueError(f"a virtual federation needs at least one node, got {num_nodes}")
        self.cfg = run_config
        self.client_app = client_app
        self.clock = clock
        self.durations = durations or NominalDurations(run_config)
        super().__init__(run_id, id_prefix="v")
        self.contexts = simulated_contexts(num_nodes, run_config.to_mapping(), run_id)
        self.jobs: dict[str, _Job] = {}
        self.jobs_per_node: dict[int, int] = dict.fromkeys(self.contexts, 0)
        self.real_job_s = 0.0  # host seconds spent computing jobs (for the log; never enters the simulation)
        self._seq = itertools.count()
        set_task_identity(run_id)

    # ---- the Grid interface ----------------------------------------------------------
    def get_node_ids(self) -> Iterable[int]:
        """Every simulated node (always present)."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Give every message an id and schedule its reply on the clock."""
        ids = []
        for m in messages:
            mid = self._stamp(m)
            self.jobs[mid] = job = self._schedule(m)
            if job.done_at > job.pushed_at:  # a profile query is answered at once: nothing to wake up for
                self.clock.wake_at(job.done_at)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The requested replies due by now on the virtual clock, in completion order."""
        now = self.clock.monotonic()
        due = sorted((self.jobs[mid] for mid in message_ids if mid in self.jobs and self.jobs[mid].done_at <= now),
                     key=lambda j: (j.done_at, j.seq))
        return [self._deliver(j) for j in due]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push; move the clock to the last reply, or to `timeout` when a job would take longer; return the replies."""
        start = self.clock.monotonic()
        limit = math.inf if timeout is None else start + timeout
        jobs = [self.jobs[mid] for mid in list(self.push_messages(messages))]
        in_time = sorted((j for j in jobs if j.done_at <= limit), key=lambda j: (j.done_at, j.seq))
        late = [j for j in jobs if j.done_at > limit]
        self.clock.advance_to(limit if late else max([start, *(j.done_at for j in in_time)]))
        for j in late:  # never answered: the driver records the node as not replying within the timeout
            self.jobs.pop(str(j.message.metadata.message_id), None)
        return [self._deliver(j) for j in in_time]

    # ---- the simulation ------------------------------------------------------------------
    def _schedule(self, msg: Message) -> _Job:
        now = self.clock.monotonic()
        job = _Job(msg, now, now, next(self._seq))
        nid = msg.metadata.dst_node_id
        if msg.metadata.message_type != MessageType.TRAIN or nid not in self.contexts:
            return job  # a profile query (or a message to no node) is answered at once
        steps = int(msg.content[wire.CONFIG][wire.LOCAL_STEPS])
        if getattr(self.durations, "step_s", 0.0) is None:
            self._measure_step(job, steps)
        job.duration = float(self.durations(nid - FIRST_NODE_ID, self.jobs_per_node[nid], steps))
        self.jobs_per_node[nid] += 1
        ttl = msg.metadata.ttl
        job.expired = bool(ttl) and job.duration > ttl
        job.done_at = now + (ttl if job.expired else job.duration)
        return job

    def _measure_step(self, job: _Job, steps: int) -> None:
        """`virtual-step-s = 0`: compute the first job now and take its real seconds per step as the reference."""
        t0 = time.perf_counter()
        job.reply = self._compute(job.message)
        measured = time.perf_counter() - t0
        if not job.reply.has_error():
            measured = float(job.reply.content[wire.METRICS].get(wire.DURATION_S, measured))
        self.durations.step_s = max(measured / max(steps, 1), 1e-6)  # type: ignore[attr-defined]
        log.info("virtual clock: measured %.4fs per local step on the first job (virtual-step-s = 0)",
                 self.durations.step_s)  # type: ignore[attr-defined]

    def _compute(self, msg: Message) -> Message:
        t0 = time.perf_counter()
        reply = self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
        self.real_job_s += time.perf_counter() - t0
        return reply

    def _deliver(self, job: _Job) -> Message:
        msg = job.message
        self.jobs.pop(str(msg.metadata.message_id), None)
        if job.expired:
            return Message(Error(code=ErrorCode.MESSAGE_UNAVAILABLE,
                                 reason=f"the job's simulated duration {job.duration:.1f}s exceeds its TTL "
                                        f"{msg.metadata.ttl:.0f}s; it expired"), reply_to=msg)
        reply = job.reply or self._compute(msg)
        if msg.metadata.message_type == MessageType.TRAIN and not reply.has_error():
            metrics = reply.content[wire.METRICS]
            metrics[wire.DURATION_S] = float(job.duration)
            metrics[wire.STARTED_AT] = float(job.pushed_at)
            metrics[wire.QUEUE_S] = 0.0
        return reply


def run_virtual(cfg: RunConfig, num_nodes: int, client_app: ClientAppFn, evaluator: Any = None) -> dict:
    """Run Federation + the configured driver on a VirtualGrid and a VirtualClock; return the run summary.

    `client_app` is injected (the composition root passes `corolla.client.app.app`):
    the server never imports the client side. `evaluator` defaults to the task's.
    """
    from corolla.server.async_driver import run_async
    from corolla.server.federation import Federation
    from corolla.server.sync_driver import run_sync

    if evaluator is None:
        from corolla.server.evaluation import run_evaluator

        evaluator = run_evaluator(cfg)
    clock = VirtualClock()
    grid = VirtualGrid(num_nodes, cfg, client_app, clock)
    fed = Federation(cfg, grid, evaluator, clock=clock)
    if cfg.time_budget > 0:  # stop right after the budget, not at the first event past it (training starts at 0)
        clock.wake_at(math.nextafter(clock.monotonic() + cfg.time_budget, math.inf))
    t0 = time.perf_counter()
    summary = (run_async if cfg.mode == "async" else run_sync)(fed)
    real = time.perf_counter() - t0
    jobs = sum(grid.jobs_per_node.values())
    log.info("virtual clock: %.1f simulated seconds in %.1f real seconds (%d jobs pushed, %.1fs computing them)",
             summary["wall_s"], real, jobs, grid.real_job_s)
    # every wall_s of the run directory is simulated time; the host's seconds are added here, and only here
    extra = {"clock": "virtual", "real_s": round(real, 3), "real_job_s": round(grid.real_job_s, 3)}
    path = fed.recorder.dir / "summary.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **extra}, indent=2, sort_keys=True) + "\n")
    return {**summary, **extra}
