"""What the sync and async drivers share: the run's components and the steps every driver takes.

The roles live in their own modules — node admission (`nodes`), messages and reply
validation (`codec`), evaluation behind an interface (`evaluation`), the run
directory (`records`), the clock (`clock`) — and are injected here, so a fake Grid,
a fake clock and a fake evaluator run every driver path in milliseconds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from corolla.config import ConfigError, RunConfig
from corolla.proto import wire
from corolla.server import checkpoint, codec
from corolla.server.clock import Clock, SystemClock
from corolla.server.codec import JobConfig, RejectedReply
from corolla.server.eval_rounds import EvalRounds, write_npz
from corolla.server.evaluation import Evaluator
from corolla.server.factory import build_aggregator, build_selector, resolve_aggregation
from corolla.server.nodes import NodeInfo, NodeRegistry
from corolla.server.records import RECORDS, RunRecorder
from corolla.spec import TASKS
from corolla.strategies import Aggregator, Candidate, ClientUpdate, Dispatch, MergedModel
from corolla.strategies.exceptions import StrategyError
from corolla.strategies.guard import GuardNote, adam_change_bound, excess_change
from corolla.strategies.privacy import Accountant

log = logging.getLogger(__name__)

__all__ = ["Federation", "NodeInfo", "RejectedReply"]


@dataclass
class Job:
    """One in-flight training job: who, from what, since when."""

    node_id: int
    dispatch: Dispatch
    pushed_at: float


def config_changes(saved: Mapping[str, Any], now: Mapping[str, Any], allowed: Sequence[str] = ()) -> str:
    """'key: old → new' for every key that differs, "" when none; a key the saved run predates counts at its default.

    A run checkpointed by an earlier corolla lacks the keys added since (`wire-dtype`, say); it
    ran with their defaults, so it resumes as long as the new run keeps those defaults too.
    """
    defaults = RunConfig().to_mapping()
    old = {k: saved.get(k, defaults.get(k)) for k in set(saved) | set(now)}
    return ", ".join(f"{k}: {old[k]!r} → {now.get(k)!r}" for k in sorted(old)
                     if k not in allowed and old[k] != now.get(k))


class Federation:
    """Server state and the shared steps of every driver (select, dispatch, validate, evaluate, record)."""

    def __init__(self, cfg: RunConfig, grid: Grid, evaluator: Evaluator, *, clock: Clock | None = None,
                 recorder: RunRecorder | None = None) -> None:
        if cfg.aggregation_device != "cpu":  # a GPU this server lacks: say so now, not after every node has joined
            from corolla.strategies import lora_ops

            try:
                lora_ops.resolve_device(cfg.aggregation_device)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        self.cfg = cfg
        self.grid = grid
        self.clock = clock or SystemClock()
        self.evaluator = evaluator
        self.recorder = recorder or RunRecorder(cfg.out_dir, cfg.to_json(), clock=self.clock, existing=cfg.existing_run)
        #: the checkpoint this run continues from (`existing-run=resume`), read before anything is written
        self.resumed: dict[str, Any] | None = None
        if cfg.existing_run == "resume":
            self.resumed = checkpoint.load(self.recorder.dir)
            self._check_resumable(self.resumed["config"])
        self.nodes = NodeRegistry(grid, self.recorder, self.clock, self._refusal, cfg.round_timeout,
                                  task=wire.task_record(cfg.task_spec(), evaluator.fingerprint))
        self.selector = build_selector(cfg)
        self.evals = EvalRounds(cfg, grid, self.clock, self.recorder, self.nodes, evaluator, self.job_config)
        self._aggregator: Aggregator | None = None
        self.privacy = cfg.privacy()
        #: ε so far (client-level DP); None when the run is not private
        self.accountant = Accountant(self.privacy.delta) if self.privacy.enabled else None
        #: why the run stopped before num-rounds (the privacy budget), None while it goes on
        self.stopped: str | None = None
        #: DP-SGD: the largest ε a site reported for itself (its own accountant over its private jobs)
        self.max_site_epsilon: float | None = None
        self.train_start = self.clock.monotonic()

    @property
    def aggregator(self) -> Aggregator:
        """The global model's owner (built by `start`, once the first nodes' ranks are known)."""
        if self._aggregator is None:
            raise RuntimeError("Federation.start() must run before the aggregator is used")
        return self._aggregator

    def start(self) -> list[int]:
        """Wait for `min-nodes`, build the aggregator for their ranks (or restore it), evaluate version 0."""
        if self.resumed is not None:
            return self._resume(self.resumed)
        usable = self.nodes.refresh(wait_for=self.cfg.min_nodes)
        name, init_rank = resolve_aggregation(self.cfg, [self.nodes[n].rank for n in usable])
        try:
            initial = self.evaluator.initial_adapter(init_rank, self.cfg.lora_spec(), self.cfg.seed)
        except ValueError as e:  # the server builds the first adapter itself: a spec it cannot apply stops here
            raise ConfigError(str(e)) from None
        self._aggregator = build_aggregator(self.cfg, name, initial)
        for nid in usable:  # a node whose rank the chosen aggregation cannot serve is refused now
            reason = self._rank_refusal(self.nodes[nid].rank)
            if reason:
                self.nodes.refuse(nid, reason)
        usable = [n for n in usable if n in self.nodes]
        if len(usable) < self.cfg.min_nodes:  # never train with fewer than min-nodes: wait for servable ones
            usable = self.nodes.refresh(wait_for=self.cfg.min_nodes)
        log.info("federation: %s; guard: %s", {**self.aggregator.summary(), **self.selector.summary()},
                 self.aggregator.guard.summary() if self.aggregator.guard else None)
        self.evaluate(clients=0)
        self.train_start = self.clock.monotonic()
        return usable

    # ---- checkpoint and resume ----------------------------------------------------------
    #: keys a resumed run may change: how long it goes on and how it is watched, never what it computes
    RESUMABLE_CHANGES = ("num-rounds", "time-budget", "round-timeout", "existing-run", "out-dir", "eval-interval")

    def _check_resumable(self, saved: dict[str, Any]) -> None:
        differ = config_changes(saved, self.cfg.to_mapping(), self.RESUMABLE_CHANGES)
        if differ:
            raise ConfigError(f"cannot resume {self.recorder.dir}: its run was configured differently ({differ}); "
                              f"resume with the same configuration (only {list(self.RESUMABLE_CHANGES)} may change) "
                              "or start a new run with --overwrite")

    def checkpoint(self, **extra: Any) -> None:
        """Write everything needed to continue from here (atomically): model, optimizer, selector, records.

        A global state that is not finite is never written: the run stops here (NonFiniteModelError).
        """
        self.aggregator.check_finite_state()
        state = {"config": self.cfg.to_mapping(), "version": self.aggregator.version, "aggregator": self.aggregator,
                 "selector": self.selector, "recorder": self.recorder.state(), "accountant": self.accountant,
                 "offsets": checkpoint.line_counts(self.recorder.dir, RECORDS),
                 "train_elapsed": self.clock.monotonic() - self.train_start, "clock": self.clock.monotonic(), **extra}
        checkpoint.save(self.recorder.dir, state)
        version, every = self.aggregator.version, self.cfg.checkpoint_every
        if every and version > 0 and version % every == 0:
            self.write_adapter(self.recorder.dir / "adapters" / f"v{version}")

    def write_adapter(self, out: Path, merged: MergedModel | None = None, version: int | None = None) -> None:
        """A global model (default: the current one) as a peft adapter folder at max-rank, logged with its truncation error."""
        from corolla.learning.export import write_adapter

        merged = merged or self.aggregator.merged()
        report = write_adapter(self.cfg, merged.deltas, merged.dense, out)
        log.info("version %d: peft adapter at rank %d in %s (relative truncation error %.2e)",
                 self.aggregator.version if version is None else version, report["rank"], out, report["relative_error"])

    def _resume(self, state: dict[str, Any]) -> list[int]:
        dropped = checkpoint.truncate_records(self.recorder.dir, state["offsets"])
        self.recorder.restore(state["recorder"])
        self._aggregator, self.selector = state["aggregator"], state["selector"]
        self.accountant = state.get("accountant", self.accountant)
        log.info("resuming %s at version %d (round %s); record lines after the checkpoint dropped: %s",
                 self.recorder.dir, self.aggregator.version, state.get("round"), dropped)
        usable = self.nodes.refresh(wait_for=self.cfg.min_nodes)
        self.train_start = self.clock.monotonic() - float(state["train_elapsed"])
        return usable

    def refresh_nodes(self) -> list[int]:
        """Profile newcomers; return the usable nodes present now."""
        return self.nodes.refresh()

    def _rank_refusal(self, rank: int) -> str | None:
        if self._aggregator is None:
            return None
        try:
            self._aggregator.dispatch(rank)
        except (StrategyError, ValueError) as e:
            return str(e)
        return None

    def _refusal(self, info: NodeInfo) -> str | None:
        if info.software_version != wire.SOFTWARE_VERSION:
            return (f"runs corolla {info.software_version}, the server runs {wire.SOFTWARE_VERSION}; "
                    "install the same version on every node")
        if info.fingerprint != self.evaluator.fingerprint:
            return (f"base model fingerprint {info.fingerprint} differs from the server's "
                    f"{self.evaluator.fingerprint}; start the trainer with the run's --model, --dataset and --labels")
        if info.num_examples < 1:
            return f"declares {info.num_examples} training examples; a node needs at least one"
        if info.rank > self.cfg.max_rank:
            return (f"declares rank {info.rank}, above the run's max-rank {self.cfg.max_rank}; start its trainer with "
                    f"--rank {self.cfg.max_rank} or less, or raise max-rank")
        return self._rank_refusal(info.rank)

    # ---- selection and dispatch -------------------------------------------------------
    def select(self, node_ids: list[int], k: int, step: int) -> list[int]:
        """Ask the selector for k of `node_ids`; record every candidate's scores and the picks."""
        sel = self.selector.select(self.candidates(node_ids), k, step)
        self.recorder.selection({"step": step, "picked": sel.picked, "candidates": len(node_ids),
                                 "scores": {str(n): s for n, s in sel.scores.items()},
                                 "telemetry_problems": {str(n): p for n, p in sel.problems.items()}})
        for n, p in sel.problems.items():
            log.warning("node %d telemetry: %s (scored as neutral)", n, "; ".join(p))
        return sel.picked

    def candidates(self, node_ids: list[int]) -> list[Candidate]:
        """Selector view of the usable nodes."""
        return [Candidate(node_id=n, num_examples=self.nodes[n].num_examples, rank=self.nodes[n].rank,
                          telemetry=self.nodes[n].telemetry) for n in node_ids]

    def job_config(self, version: int) -> JobConfig:
        """The instructions of every job started from `version`."""
        c = self.cfg
        return JobConfig(local_steps=c.local_steps, batch_size=c.batch_size, lr=c.lr * c.lr_decay**version,
                         prox_mu=c.prox_mu, lora=c.lora_spec(), task=self.nodes.task,
                         eval_fraction=c.eval_fraction if c.evaluates_on_sites() else 0.0,
                         eval_examples=c.eval_examples,
                         freeze_a=self._aggregator is not None and not self._aggregator.trains_a,
                         dp_sgd_clip=c.dp_sgd_clip, dp_sgd_noise=c.dp_sgd_noise_multiplier, dp_delta=c.dp_delta)

    def job_seed(self, version: int) -> int:
        """The seed of every job of `version`; each trainer mixes in a digest of its own silo.

        A node's randomness then depends on its data and the version, never on the
        order nodes were picked in.
        """
        return self.cfg.seed * 100_003 + version * 1_009

    def train_message(self, node_id: int, dispatch: Dispatch, ttl: float | None = None) -> Message:
        """Build one node's train message and count its bytes."""
        msg = codec.train_message(node_id, dispatch, self.job_config(dispatch.version), self.job_seed(dispatch.version),
                                  pushed_at=self.clock.time(), ttl=ttl)
        dtype = self.cfg.wire_dtype
        self.recorder.bytes_down += codec.nbytes(dispatch.arrays, dtype) + codec.nbytes(dispatch.frozen, dtype)
        return msg

    # ---- replies ----------------------------------------------------------------------
    def to_update(self, reply: Message, sent: Dispatch, current_version: int, job_id: str = "",
                  node_id: int | None = None) -> ClientUpdate:
        """Validate a reply against what its node was sent and declared; raise RejectedReply with the reason.

        `node_id`: the job's node, for an error reply the SuperLink wrote in its name (`codec.reply_node`).

        An example count above what the node declared when it joined is capped to that
        declaration (the arrays are still checked and used): the count only sets a weight, and a
        trainer restarted on a grown silo behind the same SuperNode would otherwise lose honest
        work. The claimed count lands in updates.jsonl as `examples_capped`.
        """
        if not reply.has_error() and wire.ARRAYS in reply.content:
            self.recorder.bytes_up += codec.nbytes(reply.content[wire.ARRAYS])
        update = codec.decode_update(reply, sent, current_version, self.evaluator.fingerprint, job_id, node_id)
        info = self.nodes.nodes.get(update.node_id)
        if info is None:
            raise RejectedReply(f"node {update.node_id} is not an admitted node (it declared nothing to check the reply "
                                "against); the reply is rejected")
        if update.num_examples > info.num_examples:
            log.warning("node %d claims %d training examples but declared %d at join; capped to %d", update.node_id,
                        update.num_examples, info.num_examples, info.num_examples)
            update = replace(update, num_examples=info.num_examples,
                             notes={**update.notes, "examples_capped": update.num_examples})
        try:
            self.aggregator.check(update)
        except StrategyError as e:
            raise RejectedReply(e.reason) from None
        self._check_optimizer_bound(update)
        info.telemetry = dict(update.metrics)
        return update

    def _check_optimizer_bound(self, update: ClientUpdate) -> None:
        """Refuse a reply that moved a value further than the job's AdamW steps can (`adam_change_bound`).

        This bound needs no other silo to compare with, so it holds in a two-site federation
        and on the first asynchronous step, where the norm guard has no median yet. Only tasks
        whose every returned array is trained by that optimizer are checked (not the image
        task's whole model, whose BatchNorm statistics move outside it).
        """
        if not TASKS[self.cfg.task].uses_lora:
            return
        job = self.job_config(update.sent.version)
        bound = adam_change_bound(job.lr, job.local_steps)
        param_dtype = "bfloat16" if self.cfg.lora_dtype == "bfloat16" else "float32"
        for key in sorted(update.arrays):
            worst = excess_change(update.arrays[key], update.sent.arrays[key], bound, steps=job.local_steps,
                                  wire_dtype=self.cfg.wire_dtype, param_dtype=param_dtype)
            if worst is not None:
                raise RejectedReply(
                    f"node {update.node_id}: `{key}` changed a value by {worst:.4g}, more than {job.local_steps} AdamW "
                    f"steps at lr {job.lr:.3g} can move it ({bound:.4g}); no corolla trainer does this, so the reply "
                    "is rejected")

    def record_update(self, update: ClientUpdate | None, node_id: int, status: str, reason: str = "",
                      weight: float | None = None, applied_version: int | None = None,
                      guard: GuardNote | None = None) -> None:
        """Append one reply's outcome to updates.jsonl (`applied_version`: the version it produced).

        `examples_capped` is the count a reply claimed above its node's declaration (None: not
        capped); with `guard`, the step's bounds: `update_norm`, `norm_bound`, `clipped` (the factor
        its change was scaled by, None: not clipped) and `weight_capped_from` (its weight before the
        share bound, None: unchanged), and `weight` is the weight applied.
        """
        row: dict = {"node": node_id, "status": status, "reason": reason, "applied_version": applied_version}
        if update is not None:
            m = update.metrics
            row.update(rank=update.rank, base_version=update.sent.version, staleness=update.staleness,
                       num_examples=update.num_examples, weight=weight, truncation_error=update.sent.truncation_error,
                       loss_mean=m.get(wire.LOSS_MEAN), duration_s=m.get(wire.DURATION_S),
                       queue_s=m.get(wire.QUEUE_S), model_loads=m.get(wire.MODEL_LOADS),
                       trainer_pid=m.get(wire.TRAINER_PID), job=update.job_id or None,
                       site_epsilon=m.get(wire.SITE_EPSILON) or None,
                       examples_capped=update.notes.get("examples_capped"))
        if row.get("site_epsilon") is not None:
            self.max_site_epsilon = max(self.max_site_epsilon or 0.0, float(row["site_epsilon"]))
        if guard is not None:
            row.update(weight=guard.weight, update_norm=guard.norm, norm_bound=guard.bound, clipped=guard.clipped,
                       weight_capped_from=guard.weight_before_cap)
        self.recorder.update(row)

    def job_failed(self, node_id: int, reason: str) -> None:
        """Record a job answered with an error (its trainer unreachable, the node gone, the message expired).

        The node gets no work until it answers a profile query again (`NodeRegistry.mark_unavailable`):
        a node whose trainer died is not sent job after job that cannot run.
        """
        self.record_update(None, node_id, "failed", reason)
        self.nodes.mark_unavailable(node_id, reason)

    # ---- evaluation and the end ---------------------------------------------------------
    # ---- differential privacy ------------------------------------------------------------
    def privacy_row(self) -> dict[str, float]:
        """ε at δ so far (client-level DP); {} when the run is not private."""
        if self.accountant is None:
            return {}
        return {"epsilon": self.accountant.epsilon(), "dp_delta": self.privacy.delta}

    def over_budget(self, picked: int, usable: int) -> bool:
        """True (and `stopped` set) when one more version sampling `picked` of `usable` sites would pass target-epsilon."""
        if self.accountant is None or self.privacy.target_epsilon <= 0 or usable == 0:
            return False
        eps = self.accountant.epsilon_after(1, self.privacy.noise_multiplier, picked / usable)
        if eps <= self.privacy.target_epsilon:
            return False
        self.stopped = (f"the privacy budget: version {self.aggregator.version + 1} would spend ε = {eps:.4g} > "
                        f"target-epsilon {self.privacy.target_epsilon:g} at δ = {self.privacy.delta:g}")
        log.warning("the run stops before %s", self.stopped)
        return True

    def charge_privacy(self, picked: int, usable: int) -> dict[str, float]:
        """Charge one applied version to the accountant (`picked` of `usable` sites sampled); its rounds.jsonl keys."""
        if self.accountant is None:
            return {}
        self.accountant.step(self.privacy.noise_multiplier, picked / usable)
        note = getattr(self.aggregator.guard, "note", None)
        row = {"epsilon": self.accountant.epsilon(), "dp_sample_rate": picked / usable}
        if note is not None:
            row.update(dp_clip=note.clip, dp_sigma=note.sigma, dp_clipped=note.clipped)
        log.info("version %d: ε = %.4g at δ = %g (clip %.4g, %d of %d changes clipped)", self.aggregator.version,
                 row["epsilon"], self.privacy.delta, row.get("dp_clip", 0.0), row.get("dp_clipped", 0), picked)
        return row

    def evaluate(self, clients: int, **extra: float) -> dict:
        """Evaluate the exact global model (server and/or sites: `evaluation`), wait for it, and record it."""
        extra = {**self.privacy_row(), **extra}
        self.evals.begin(self.aggregator, clients, **extra)
        self.evals.collect(wait=True)
        return self.recorder.evals[-1]

    def begin_evaluation(self, clients: int, **extra: float) -> None:
        """Start evaluating the current version; its row is written by a later `evals.collect()` (asynchronous runs)."""
        self.evals.begin(self.aggregator, clients, **extra)
        self.evals.collect()

    def out_of_time(self) -> bool:
        """True once `time-budget` seconds have passed since training started."""
        return self.cfg.time_budget > 0 and self.clock.monotonic() - self.train_start > self.cfg.time_budget

    def finish(self) -> dict:
        """Write global.npz, summary.json and the report."""
        from corolla.server.report import write_report

        self.evals.collect(wait=True)
        write_npz(self.recorder.dir / "global.npz", self.aggregator.merged_items())
        if self.cfg.checkpoint_every:
            self.write_adapter(self.recorder.dir / "adapter")
            self._write_best_adapter()
        personal = {}
        if self.cfg.personalize_steps and self.evals.on_sites:
            row = self.evals.personalize(self.aggregator)
            (self.recorder.dir / "personalization.json").write_text(json.dumps(row, indent=2, sort_keys=True) + "\n")
            personal = {k: row[k] for k in ("site_personal_accuracy", "personalization_gap") if k in row}
        stopped = {"stopped_by": self.stopped} if self.stopped else {}
        if self.max_site_epsilon is not None:
            stopped["max_site_epsilon"] = self.max_site_epsilon
        summary = self.recorder.finish(**self.what_ran(), **personal, **self.privacy_row(), **stopped)
        write_report(self.recorder.dir)
        log.info("run finished: final accuracy %s, peak %s, %.1fs; report in %s",
                 summary["final_accuracy"], summary["peak_accuracy"], summary["wall_s"], self.recorder.dir)
        return summary

    def what_ran(self) -> dict[str, Any]:
        """What this run resolved its `auto` choices to, for the summary and the report's headline."""
        spec = self.cfg.task_spec()  # `auto` model and dataset resolved to the task's built-in ones
        return {"aggregation": self.aggregator.name, "mode": self.cfg.mode, "selector": self.cfg.selector,
                "model": spec.model, "dataset": spec.dataset, "task": self.cfg.task,
                "evaluation": self.cfg.resolved_evaluation(),
                "rank": getattr(self.aggregator, "rank", None) or getattr(self.aggregator, "max_rank", None)}

    def _write_best_adapter(self) -> None:
        """The best version's model as a peft adapter in RUN/adapter-best (from best.npz), beside RUN/adapter."""
        from corolla.server.evaluation import merged_from_npz

        best = self.recorder.best
        path = self.recorder.dir / "best.npz"
        if best is None or not path.exists():
            return
        with np.load(path) as arrays:
            merged = merged_from_npz(dict(arrays))
        self.write_adapter(self.recorder.dir / "adapter-best", merged, version=best["version"])
