"""What the sync and async drivers share: nodes, dispatch, validation, evaluation, recording.

Each piece lives here exactly once; a driver only decides *when* to select,
send, aggregate and evaluate.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from proto import wire
from server.config import ConfigError, RunConfig
from server.records import RunRecorder
from strategies import (
    AGGREGATORS,
    SELECTORS,
    Aggregator,
    Candidate,
    ClientUpdate,
    Dispatch,
    HeteRoSelect,
    HeteRoSelectConfig,
    LoraSpec,
    Selector,
)
from strategies.exceptions import StrategyError

log = logging.getLogger(f"corolla.{__name__}")


class RejectedReply(Exception):
    """A reply that must not reach the global model; `str(e)` is the recorded reason."""


@dataclass
class NodeInfo:
    """What the server knows about one SuperNode (from its profile reply)."""

    node_id: int
    rank: int
    num_examples: int
    device: str = ""
    fingerprint: str = ""
    software_version: str = ""
    model_loads: int = 0
    telemetry: dict[str, float] = field(default_factory=dict)


def nbytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes of a set of arrays on the wire (float32)."""
    return int(sum(np.asarray(a).size * 4 for a in arrays.values()))


def resolve_aggregation(cfg: RunConfig, ranks: list[int]) -> tuple[str, int]:
    """Return (aggregation, rank of the initial adapter) for the ranks of the nodes that joined.

    `auto` is FedAvg when every node has one rank and FedHL when ranks differ.
    FedAvg's global adapter has the nodes' common rank; the heterogeneous-rank
    methods start from an adapter at `max-rank`.
    """
    name = cfg.aggregation
    if name == "auto":
        name = "fedavg" if len(set(ranks)) <= 1 else "fedhl"
    if name == "fedavg":
        return name, ranks[0] if ranks else cfg.lora_rank
    if 0 in ranks:
        raise ConfigError(f"aggregation `{name}` needs LoRA clients; this task trains the full model: use fedavg.")
    return name, cfg.max_rank


def build_aggregator(cfg: RunConfig, name: str, initial: dict[str, np.ndarray]) -> Aggregator:
    """Look the aggregation up in the registry and build it with its configured options."""
    lora = LoraSpec(alpha=cfg.lora_alpha, rslora=cfg.rslora)
    cls = AGGREGATORS[name]
    kwargs: dict[str, Any] = {}
    if name in ("fedhl", "flexlora"):
        kwargs.update(svd=cfg.svd)
    if name == "fedhl":
        kwargs.update(weighting=cfg.fedhl_weighting)
    if name != "fedavg":
        kwargs.update(max_rank=cfg.max_rank)
    aggregator = cls(initial, lora, **kwargs)
    aggregator.server_momentum = cfg.server_momentum
    return aggregator


def build_selector(cfg: RunConfig) -> Selector:
    """Look the configured selector up in the registry and build it."""
    if cfg.selector == "heteroselect":
        conf = HeteRoSelectConfig(total_steps=cfg.num_rounds)
        return HeteRoSelect(conf, lora=LoraSpec(alpha=cfg.lora_alpha, rslora=cfg.rslora), seed=cfg.seed)
    return SELECTORS[cfg.selector](seed=cfg.seed)  # type: ignore[call-arg]


class Federation:
    """Server state and the shared steps of every driver."""

    def __init__(self, cfg: RunConfig, grid: Grid) -> None:
        from client.tasks import build_task
        from client.training import MergedEvaluator, select_device

        self.cfg = cfg
        self.grid = grid
        self.recorder = RunRecorder(cfg.out_dir, cfg.to_json())
        task = build_task(cfg.task_spec())
        self.task = task
        self.evaluator = MergedEvaluator(task, select_device())
        test = task.load_silo(cfg.test_data, cfg.text_column, cfg.label_column) if cfg.test_data else task.builtin_test()
        if cfg.eval_examples:
            test = test.select(range(min(cfg.eval_examples, len(test))))
        self.test_data = task.encode(test)
        self._aggregator: Aggregator | None = None
        self.selector = build_selector(cfg)
        self.nodes: dict[int, NodeInfo] = {}
        self.refused: dict[int, str] = {}

    @property
    def aggregator(self) -> Aggregator:
        """The global model's owner (built by `start`, once the first nodes' ranks are known)."""
        if self._aggregator is None:
            raise RuntimeError("Federation.start() must run before the aggregator is used")
        return self._aggregator

    def start(self) -> list[int]:
        """Wait for `min-nodes`, build the aggregator for their ranks, evaluate version 0."""
        from client.training import initial_adapter

        usable = self.refresh_nodes(wait_for=self.cfg.min_nodes, timeout=self.cfg.round_timeout)
        name, init_rank = resolve_aggregation(self.cfg, [self.nodes[n].rank for n in usable])
        self._aggregator = build_aggregator(self.cfg, name, initial_adapter(self.task, init_rank, self.cfg.seed))
        for nid in usable:  # a node whose rank the chosen aggregation cannot serve is refused now
            reason = self._rank_refusal(self.nodes[nid].rank)
            if reason:
                self._refuse(nid, reason)
        log.info("federation: %s", {**self.aggregator.summary(), **self.selector.summary()})
        self.evaluate(clients=0)
        self.train_start = time.monotonic()
        return [n for n in usable if n in self.nodes]

    def _refuse(self, nid: int, reason: str) -> None:
        self.nodes.pop(nid, None)
        self.refused[nid] = reason
        log.warning("node %d refused: %s", nid, reason)
        self.recorder.node({"node": nid, "status": "refused", "reason": reason})

    def _rank_refusal(self, rank: int) -> str | None:
        if self._aggregator is None:
            return None
        try:
            self._aggregator.dispatch(rank)
        except (StrategyError, ValueError) as e:
            return str(e)
        return None

    # ---- nodes -------------------------------------------------------------------------
    def refresh_nodes(self, wait_for: int = 0, timeout: float = 600.0) -> list[int]:
        """Profile nodes not seen before (waiting until `wait_for` are usable); return usable ids."""
        deadline = time.monotonic() + timeout
        while True:
            ids = set(self.grid.get_node_ids())
            new = sorted(ids - set(self.nodes) - set(self.refused))
            if new:
                self._profile(new)
            usable = sorted(i for i in ids if i in self.nodes)
            if len(usable) >= wait_for:
                return usable
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(usable)} of the {wait_for} nodes needed (min-nodes) joined within {timeout:.0f}s; "
                    "start more SuperNodes or lower min-nodes."
                )
            time.sleep(1.0)

    def _profile(self, node_ids: list[int]) -> None:
        msgs = [Message(RecordDict({wire.CONFIG: ConfigRecord({wire.SOFTWARE: wire.SOFTWARE_VERSION})}),
                        dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
        for reply in self.grid.send_and_receive(msgs, timeout=self.cfg.round_timeout):
            nid = reply.metadata.src_node_id
            if reply.has_error():
                self._refuse(nid, f"profile failed: {reply.error.reason}")
                continue
            m, c = reply.content[wire.METRICS], reply.content[wire.CONFIG]
            info = NodeInfo(node_id=nid, rank=int(m[wire.LORA_RANK]), num_examples=int(m[wire.NUM_EXAMPLES]),
                            device=str(c[wire.DEVICE]), fingerprint=str(c[wire.FINGERPRINT]),
                            software_version=str(c[wire.SOFTWARE]), model_loads=int(m[wire.MODEL_LOADS]))
            reason = self._refusal(info)
            if reason:
                self._refuse(nid, reason)
            else:
                self.nodes[nid] = info
                self.recorder.node({"status": "ok", **info.__dict__})
                log.info("node %d joined: rank %d, %d examples, %s", nid, info.rank, info.num_examples, info.device)

    def _refusal(self, info: NodeInfo) -> str | None:
        if info.software_version != wire.SOFTWARE_VERSION:
            return (f"runs corolla {info.software_version}, the server runs {wire.SOFTWARE_VERSION}; "
                    "install the same version on every node")
        if info.fingerprint != self.evaluator.fingerprint:
            return (f"base model fingerprint {info.fingerprint} differs from the server's "
                    f"{self.evaluator.fingerprint}; start the trainer with the run's --model, --dataset and --labels")
        return self._rank_refusal(info.rank)

    def select(self, node_ids: list[int], k: int, step: int) -> list[int]:
        """Ask the selector for k of `node_ids`; record every candidate's scores and the picks."""
        picked = self.selector.select(self.candidates(node_ids), k, step)
        scores = getattr(self.selector, "last_scores", {})
        problems = getattr(self.selector, "problems", {})
        self.recorder.selection({"step": step, "picked": picked, "candidates": len(node_ids),
                                 "scores": {str(n): s for n, s in scores.items()},
                                 "telemetry_problems": {str(n): p for n, p in problems.items()}})
        for n, p in problems.items():
            log.warning("node %d telemetry: %s (scored as neutral)", n, "; ".join(p))
        return picked

    def candidates(self, node_ids: list[int]) -> list[Candidate]:
        """Selector view of the usable nodes."""
        return [Candidate(node_id=n, num_examples=self.nodes[n].num_examples, rank=self.nodes[n].rank,
                          telemetry=self.nodes[n].telemetry) for n in node_ids]

    # ---- dispatch ----------------------------------------------------------------------
    def train_message(self, node_id: int, dispatch: Dispatch, seed: int, ttl: float | None = None) -> Message:
        """Build the train message for one node from its dispatch."""
        cfg = self.cfg
        config = ConfigRecord({
            wire.SERVER_ROUND: dispatch.version + 1, wire.MODEL_VERSION: dispatch.version,
            wire.LORA_RANK: dispatch.rank, wire.LOCAL_STEPS: cfg.local_steps, wire.BATCH_SIZE: cfg.batch_size,
            wire.LR: cfg.lr * cfg.lr_decay**dispatch.version, wire.PROX_MU: cfg.prox_mu, wire.SEED: seed,
            wire.PUSHED_AT: time.time(),
            wire.SOFTWARE: wire.SOFTWARE_VERSION,
        })
        arrays = ArrayRecord(array_dict={k: Array.from_numpy_ndarray(np.asarray(v, np.float32))
                                         for k, v in dispatch.arrays.items()})
        content = RecordDict({wire.ARRAYS: arrays, wire.CONFIG: config})
        if dispatch.frozen:
            content[wire.FROZEN] = ArrayRecord(array_dict={k: Array.from_numpy_ndarray(np.asarray(v, np.float32))
                                                           for k, v in dispatch.frozen.items()})
        self.recorder.bytes_down += nbytes(dict(dispatch.arrays)) + nbytes(dict(dispatch.frozen))
        return Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN, ttl=ttl)

    # ---- replies -----------------------------------------------------------------------
    def to_update(self, reply: Message, sent: Dispatch, current_version: int) -> ClientUpdate:
        """Validate a reply against what its node was sent; raise RejectedReply with the reason."""
        nid = reply.metadata.src_node_id
        if reply.has_error():
            raise RejectedReply(f"node {nid} replied with error {reply.error.code}: {reply.error.reason}")
        content = reply.content
        for key in (wire.ARRAYS, wire.METRICS, wire.CONFIG):
            if key not in content:
                raise RejectedReply(f"node {nid}: reply has no `{key}` record")
        m = content[wire.METRICS]
        arrays = {k: a.numpy() for k, a in content[wire.ARRAYS].items()}
        self.recorder.bytes_up += nbytes(arrays)
        n = int(m.get(wire.NUM_EXAMPLES, 0))
        if n <= 0:
            raise RejectedReply(f"node {nid}: reply reports {n} training examples; at least 1 is required")
        if int(m.get(wire.MODEL_VERSION, -1)) != sent.version:
            raise RejectedReply(f"node {nid}: reply is for version {m.get(wire.MODEL_VERSION)}, "
                                f"it was sent version {sent.version}")
        if int(m.get(wire.LORA_RANK, -1)) != sent.rank:
            raise RejectedReply(f"node {nid}: reply has rank {m.get(wire.LORA_RANK)}, it was sent rank {sent.rank}")
        fp = str(content[wire.CONFIG].get(wire.FINGERPRINT, ""))
        if fp != self.evaluator.fingerprint:
            raise RejectedReply(f"node {nid}: trained on base model {fp}, the server's is {self.evaluator.fingerprint}")
        telemetry = {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}
        update = ClientUpdate(node_id=nid, arrays=arrays, sent=sent, num_examples=n,
                              staleness=current_version - sent.version, metrics=telemetry)
        try:
            self.aggregator.check(update)
        except StrategyError as e:
            raise RejectedReply(e.reason) from None
        if nid in self.nodes:
            self.nodes[nid].telemetry = telemetry
        return update

    def record_update(self, update: ClientUpdate | None, node_id: int, status: str, reason: str = "",
                      weight: float | None = None, applied_version: int | None = None) -> None:
        """Append one reply's outcome to updates.jsonl (`applied_version`: the version it produced)."""
        row: dict = {"node": node_id, "status": status, "reason": reason, "applied_version": applied_version}
        if update is not None:
            m = update.metrics
            row.update(rank=update.rank, base_version=update.sent.version, staleness=update.staleness,
                       num_examples=update.num_examples, weight=weight, truncation_error=update.sent.truncation_error,
                       loss_mean=m.get(wire.LOSS_MEAN), duration_s=m.get(wire.DURATION_S),
                       queue_s=m.get(wire.QUEUE_S), model_loads=m.get(wire.MODEL_LOADS),
                       trainer_pid=m.get(wire.TRAINER_PID))
        self.recorder.update(row)

    # ---- evaluation --------------------------------------------------------------------
    def evaluate(self, clients: int, **extra: float) -> dict:
        """Evaluate the exact global model on the held-out test split and record it."""
        merged = self.aggregator.merged()
        s = self.evaluator.evaluate(merged.deltas, merged.dense, self.test_data)
        row = self.recorder.evaluation(self.aggregator.version, s.accuracy, s.loss, clients, **extra)
        log.info("version %d: accuracy %.4f, loss %.4f (%.1fs)", row["version"], s.accuracy, s.loss, row["wall_s"])
        return row

    def out_of_time(self) -> bool:
        """True once `time-budget` seconds have passed since training started."""
        return self.cfg.time_budget > 0 and time.monotonic() - self.train_start > self.cfg.time_budget

    def finish(self) -> dict:
        """Write summary.json and the report."""
        from server.report import write_report

        merged = self.aggregator.merged()
        np.savez(self.recorder.dir / "global.npz", **{f"delta/{k}": v for k, v in merged.deltas.items()},
                 **{f"dense/{k}": v for k, v in merged.dense.items()})
        summary = self.recorder.finish(aggregation=self.aggregator.name, mode=self.cfg.mode)
        write_report(self.recorder.dir)
        log.info("run finished: final accuracy %s, peak %s, %.1fs; report in %s",
                 summary["final_accuracy"], summary["peak_accuracy"], summary["wall_s"], self.recorder.dir)
        return summary

