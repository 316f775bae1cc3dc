"""Fakes that drive the server's drivers through every path in milliseconds: a scriptable Grid and an evaluator.

No torch, no model, no network: `FakeGrid` answers Flower messages the way
client/app.py does (QUERY → profile, TRAIN → what was sent plus `step`), on the
`FakeClock` the Federation runs on, so delays, timeouts, late joins and departures
cost no real time. Each `FakeNode` is scripted: its profile, its speed, and one
behaviour per train job (`JOBS` lists them).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

from corolla.launch.local_grid import LocalGrid
from corolla.proto import flower_arrays, wire
from corolla.server.clock import FakeClock
from corolla.server.evaluation import EvalResult
from corolla.spec import LoraSpec
from corolla.strategies import MergedModel

FINGERPRINT = "fp-test-model"
LAYERS = ("m.l0.q", "m.l1.q")
HEAD = "m.head.weight"
D_OUT, D_IN, N_CLASSES = 3, 4, 2
#: the node id an "impostor" reply claims to come from (a node the server never sent a job)
IMPOSTOR_ID = 999
#: the message id a "stray" reply claims to answer (a job the server never pushed)
STRAY_ID = "no-such-job"
CLIENT_ERROR = 2  # Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION, as client/app.py sends it
#: the reason the SuperLink gives when it answers for a node that is offline (Flower 1.39's text)
NODE_GONE = "Error: Node Unavailable — The destination node failed to report a heartbeat within 2 × its expected interval."
#: the reason client/app.py replies with when the node's trainer does not answer (node id for the port)
TRAINER_DOWN = ("the trainer at 127.0.0.1:{port} is unreachable (Socket closed); start it with `corolla client` or "
                "`corolla trainer`, and check the node's trainer-address.")

#: train-job behaviours a node can be scripted with
JOBS = {
    "ok": "reply normally: every array = what was sent + step",
    "error": "reply with a flwr Error (code 2), as the ClientApp shim does when its trainer fails",
    "silent": "never reply",
    "twice": "reply normally, then again to the same message (the second copy with 10 × step)",
    "impostor": "reply normally, plus a copy claiming to come from IMPOSTOR_ID",
    "stray": "reply normally, plus a copy answering STRAY_ID (a job never pushed)",
    "version": "report model-version one above the version it was sent",
    "rank": "report lora-rank one above the rank it was sent (arrays keep their shapes)",
    "fingerprint": "report another base-model fingerprint",
    "nan": "return a NaN in the first LoRA A factor",
    "shape": "return LoRA factors one rank smaller than sent (metrics still claim the sent rank)",
    "no-examples": "report 0 training examples",
    "gone": "the SuperLink answers in its place: Error 5 (node unavailable) signed by node 1, as for a node gone offline",
}
#: profile behaviours: answer, answer with an Error, never answer, answer without a fingerprint
QUERIES = ("ok", "error", "silent", "malformed")
#: evaluate behaviours (site evaluation): what a node answers when asked to evaluate the global model
EVALS = {
    "ok": "accuracy = skill × ‖ΔW‖/(1 + ‖ΔW‖) of the model it was sent, loss = 1 − that, on eval_examples rows",
    "error": "reply with a flwr Error (code 2), as the shim does when the trainer fails",
    "silent": "never answer",
    "accuracy": "claim accuracy 1.5",
    "loss-nan": "claim loss NaN",
    "examples": "claim 10^12 held-out examples",
    "fingerprint": "report another base-model fingerprint",
    "version": "report the version one above the one it was sent",
}


def delta_norm(deltas: dict[str, np.ndarray]) -> float:
    """Frobenius norm of the whole ΔW (every LoRA layer together)."""
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(d, np.float64)))) for d in deltas.values()))


def accuracy_of(norm: float) -> float:
    """The fake accuracy of a model whose ΔW has this norm: 0 at the base model, rising towards 1."""
    return norm / (1.0 + norm)


class FakeEvaluator:
    """The `Evaluator` interface without a model: a tiny two-layer adapter, accuracy from ‖ΔW‖."""

    def __init__(self, fingerprint: str = FINGERPRINT) -> None:
        self.fingerprint = fingerprint
        self.initial_ranks: list[int] = []
        self.evaluated: list[MergedModel] = []

    def initial_adapter(self, rank: int, lora: LoraSpec, seed: int) -> dict[str, np.ndarray]:
        """Peft's initialisation in miniature: A small and random (seeded), B zero (ΔW = 0), a zero head."""
        self.initial_ranks.append(rank)
        rng = np.random.default_rng(seed)
        out: dict[str, np.ndarray] = {}
        for layer in LAYERS:
            out[f"{layer}.lora_A.weight"] = (0.1 * rng.normal(size=(rank, D_IN))).astype(np.float32)
            out[f"{layer}.lora_B.weight"] = np.zeros((D_OUT, rank), np.float32)
        out[HEAD] = np.zeros((N_CLASSES, D_IN), np.float32)
        return out

    def evaluate(self, merged: MergedModel) -> EvalResult:
        """accuracy = ‖ΔW‖ / (1 + ‖ΔW‖), loss = 1 / (1 + ‖ΔW‖): both move whenever the model does."""
        self.evaluated.append(merged)
        norm = delta_norm(merged.deltas)
        return EvalResult(accuracy=accuracy_of(norm), loss=1.0 / (1.0 + norm), num_examples=100)


@dataclass
class FakeNode:
    """One scripted SuperNode and its trainer.

    `jobs` holds one behaviour (a key of `JOBS`) per train job the node receives, in
    order; the last one repeats. `joins_at`/`leaves_at` are seconds after the grid
    was built: the node is listed by `get_node_ids` in between, and a job whose reply
    would come after `leaves_at` is never answered. `trainer_down` = (from, until):
    its trainer is dead in between while its SuperNode lives, so every job that is
    running at some moment of that window, and every profile query, is answered with
    the error the ClientApp shim sends when its trainer is unreachable (`TRAINER_DOWN`).
    """

    node_id: int
    rank: int = 2
    num_examples: int = 10
    step: float = 0.1
    delay: float = 0.0
    jobs: Sequence[str] = ("ok",)
    query: str = "ok"
    fingerprint: str = FINGERPRINT
    software: str = wire.SOFTWARE_VERSION
    device: str = "cpu"
    joins_at: float = 0.0
    leaves_at: float = math.inf
    trainer_down: tuple[float, float] | None = None
    #: site evaluation: how well the global model does here (accuracy = skill × the fake's curve), its held-out
    #: rows, how long an evaluation takes, and one behaviour per evaluation (`EVALS`; the last repeats)
    skill: float = 1.0
    eval_examples: int = 5
    eval_delay: float = 0.0
    evals: Sequence[str] = ("ok",)

    def __post_init__(self) -> None:
        unknown = [j for j in self.jobs if j not in JOBS] + [e for e in self.evals if e not in EVALS]
        if unknown or not self.jobs or not self.evals or self.query not in QUERIES:
            raise ValueError(f"node {self.node_id}: unknown behaviour {unknown or self.query!r}")

    def trainer_dead(self, start: float, end: float) -> bool:
        """True when its trainer is down at some moment of [start, end] (seconds after the grid was built)."""
        return self.trainer_down is not None and start < self.trainer_down[1] and end >= self.trainer_down[0]

    def behaviour(self, job_index: int) -> str:
        """The behaviour of the node's `job_index`-th train job (0-based)."""
        return self.jobs[min(job_index, len(self.jobs) - 1)]


@dataclass(frozen=True)
class Pushed:
    """One message the server pushed, when, and what the node did with it."""

    at: float
    message_id: str
    message: Message
    behaviour: str

    @property
    def node_id(self) -> int:
        """The destination node."""
        return self.message.metadata.dst_node_id

    @property
    def config(self) -> Any:
        """The message's ConfigRecord."""
        return self.message.content[wire.CONFIG]


class FakeGrid(LocalGrid):
    """Flower's Grid over scripted nodes and a FakeClock.

    Replies become available `delay` fake seconds after their message is pushed.
    `pull_messages` returns the available replies of the requested message ids;
    `send_and_receive` returns the replies available within `timeout` and moves the
    clock to the last of them, or to the timeout when some message got none (what a
    blocking wait would cost). Messages must be built with a TaskIdentity set.
    """

    def __init__(self, nodes: Iterable[FakeNode], clock: FakeClock, run_id: int = 1) -> None:
        self.nodes = {n.node_id: n for n in nodes}
        self.clock = clock
        self.t0 = clock.monotonic()
        super().__init__(run_id)
        self.pushed: list[Pushed] = []
        self.jobs_received = dict.fromkeys(self.nodes, 0)
        self.evals_received = dict.fromkeys(self.nodes, 0)
        self._seq = itertools.count()
        self._waiting: dict[str, list[tuple[float, int, Message]]] = {}

    # ---- the Grid interface ----------------------------------------------------------
    def get_node_ids(self) -> Iterable[int]:
        """The nodes present now (joined and not yet left)."""
        return [nid for nid, n in sorted(self.nodes.items()) if self._present(n, self.elapsed())]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Give every message an id and schedule its node's replies."""
        ids = []
        for m in messages:
            mid = self._stamp(m)
            ids.append(mid)
            self._waiting[mid] = self._schedule(mid, m)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Every available reply to the requested messages, oldest first."""
        now = self.clock.monotonic()
        out = []
        for mid in message_ids:
            queued = self._waiting.get(mid, [])
            out += [r for r in queued if r[0] <= now]
            self._waiting[mid] = [r for r in queued if r[0] > now]
        return [msg for _, _, msg in sorted(out, key=lambda r: r[:2])]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, wait (on the fake clock) for every reply or `timeout`, return what arrived in time."""
        if timeout is None:
            raise ValueError("FakeGrid.send_and_receive needs a timeout (the drivers always pass one)")
        start = self.clock.monotonic()
        mids = list(self.push_messages(messages))
        in_time = [r for mid in mids for r in self._waiting.pop(mid) if r[0] <= start + timeout]
        answered = {r[2].metadata.reply_to_message_id for r in in_time}
        if all(mid in answered for mid in mids):
            self.clock.now = max([start, *(r[0] for r in in_time)])
        else:
            self.clock.now = start + timeout
        return [msg for _, _, msg in sorted(in_time, key=lambda r: r[:2])]

    # ---- what the test reads -------------------------------------------------------------
    def elapsed(self) -> float:
        """Fake seconds since the grid was built."""
        return self.clock.monotonic() - self.t0

    def train_jobs(self, node_id: int | None = None) -> list[Pushed]:
        """The train messages pushed (to one node, or to all), in push order."""
        return [p for p in self.pushed if p.message.metadata.message_type == MessageType.TRAIN
                and (node_id is None or p.node_id == node_id)]

    def evaluations(self, node_id: int | None = None) -> list[Pushed]:
        """The evaluate messages pushed (to one node, or to all), in push order."""
        return [p for p in self.pushed if p.message.metadata.message_type == MessageType.EVALUATE
                and (node_id is None or p.node_id == node_id)]

    def queried(self) -> list[int]:
        """The node ids of every profile query pushed, in order."""
        return [p.node_id for p in self.pushed if p.message.metadata.message_type == MessageType.QUERY]

    # ---- the nodes ---------------------------------------------------------------------------
    @staticmethod
    def _present(node: FakeNode, t: float) -> bool:
        return node.joins_at <= t < node.leaves_at

    def _schedule(self, mid: str, msg: Message) -> list[tuple[float, int, Message]]:
        node = self.nodes.get(msg.metadata.dst_node_id)
        is_train = msg.metadata.message_type == MessageType.TRAIN
        is_eval = msg.metadata.message_type == MessageType.EVALUATE
        behaviour = "-"
        if node is not None and is_train:
            behaviour = node.behaviour(self.jobs_received[node.node_id])
            self.jobs_received[node.node_id] += 1
        elif node is not None and is_eval:
            behaviour = node.evals[min(self.evals_received[node.node_id], len(node.evals) - 1)]
            self.evals_received[node.node_id] += 1
        elif node is not None:
            behaviour = node.query
        self.pushed.append(Pushed(self.clock.monotonic(), mid, msg, behaviour))
        if node is None or not self._present(node, self.elapsed()):
            return []  # a node that is not there never answers
        delay = node.delay if is_train else node.eval_delay if is_eval else 0.0
        if not self._present(node, self.elapsed() + delay):
            return []  # it leaves before it finishes
        if node.trainer_dead(self.elapsed(), self.elapsed() + delay):
            replies = [Message(Error(code=CLIENT_ERROR, reason=TRAINER_DOWN.format(port=9000 + node.node_id)),
                               reply_to=msg)]
        else:
            replies = (train_replies(node, msg, behaviour) if is_train else eval_replies(node, msg, behaviour)
                       if is_eval else query_replies(node, msg))
        due = self.clock.monotonic() + delay
        return [(due, next(self._seq), r) for r in replies]


# ---- replies, built the way client/app.py builds them ------------------------------------
def _arrays(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array.from_numpy_ndarray(np.asarray(v, np.float32)) for k, v in arrays.items()})


def query_replies(node: FakeNode, msg: Message) -> list[Message]:
    """The node's profile reply (none when it is scripted silent)."""
    if node.query == "silent":
        return []
    if node.query == "error":
        return [Message(Error(code=CLIENT_ERROR, reason=f"the trainer of node {node.node_id} is unreachable"),
                        reply_to=msg)]
    config = {wire.DEVICE: node.device, wire.SOFTWARE: node.software, wire.FINGERPRINT: node.fingerprint}
    if node.query == "malformed":
        del config[wire.FINGERPRINT]
    content = RecordDict({
        wire.METRICS: MetricRecord({wire.LORA_RANK: node.rank, wire.NUM_EXAMPLES: node.num_examples,
                                    wire.MEMORY_BYTES: 1 << 20, wire.MODEL_LOADS: 1}),
        wire.CONFIG: ConfigRecord(config),
    })
    return [Message(content, reply_to=msg)]


def site_accuracy(node: FakeNode, msg: Message) -> float:
    """What an honest fake site reports for the model in an evaluate message: skill × accuracy_of(‖s·B·A‖)."""
    arrays = flower_arrays.from_record(msg.content[wire.ARRAYS])
    rank = int(msg.content[wire.CONFIG][wire.LORA_RANK])
    s = LoraSpec().alpha / rank
    deltas = {layer: s * arrays[f"{layer}.lora_B.weight"] @ arrays[f"{layer}.lora_A.weight"] for layer in LAYERS}
    return node.skill * accuracy_of(delta_norm(deltas))


def eval_replies(node: FakeNode, msg: Message, behaviour: str) -> list[Message]:
    """The node's answer to one evaluate message under `behaviour` (see `EVALS`)."""
    if behaviour == "silent":
        return []
    if behaviour == "error":
        return [Message(Error(code=CLIENT_ERROR, reason=f"evaluation failed on node {node.node_id}"), reply_to=msg)]
    cfg = msg.content[wire.CONFIG]
    acc = site_accuracy(node, msg)
    metrics: dict[str, int | float] = {wire.ACCURACY: acc, wire.LOSS: 1.0 - acc, wire.NUM_EXAMPLES: node.eval_examples,
                                       wire.MODEL_VERSION: int(cfg[wire.MODEL_VERSION])}
    fingerprint = node.fingerprint
    if behaviour == "accuracy":
        metrics[wire.ACCURACY] = 1.5
    elif behaviour == "loss-nan":
        metrics[wire.LOSS] = math.nan
    elif behaviour == "examples":
        metrics[wire.NUM_EXAMPLES] = LIE_EXAMPLES
    elif behaviour == "fingerprint":
        fingerprint = "another-model"
    elif behaviour == "version":
        metrics[wire.MODEL_VERSION] += 1
    if int(cfg.get(wire.PERSONALIZE_STEPS, 0)) > 0:  # its own fine-tuned copy closes half the gap to 1
        metrics[wire.PERSONAL_ACCURACY] = acc + (1.0 - acc) / 2
        metrics[wire.PERSONAL_LOSS] = (1.0 - acc) / 2
    content = RecordDict({wire.METRICS: MetricRecord(metrics), wire.CONFIG: ConfigRecord({wire.FINGERPRINT: fingerprint})})
    return [Message(content, reply_to=msg)]


def train_replies(node: FakeNode, msg: Message, behaviour: str) -> list[Message]:
    """The node's replies to one train message under `behaviour` (see `JOBS`)."""
    if behaviour == "silent":
        return []
    if behaviour == "error":
        return [Message(Error(code=CLIENT_ERROR, reason=f"CUDA out of memory on node {node.node_id}"),
                        reply_to=msg)]
    if behaviour == "gone":
        reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=NODE_GONE), reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = reply.metadata.__dict__["_dst_node_id"] = SUPERLINK_NODE_ID
        return [reply]
    replies = [_train_reply(node, msg, behaviour, node.step)]
    if behaviour == "twice":
        replies.append(_train_reply(node, msg, behaviour, 10 * node.step))
    elif behaviour == "impostor":
        extra = _train_reply(node, msg, behaviour, node.step)
        extra.metadata.__dict__["_src_node_id"] = IMPOSTOR_ID
        replies.append(extra)
    elif behaviour == "stray":
        extra = _train_reply(node, msg, behaviour, node.step)
        extra.metadata.__dict__["_reply_to_message_id"] = STRAY_ID
        replies.append(extra)
    return replies


def _train_reply(node: FakeNode, msg: Message, behaviour: str, step: float) -> Message:
    cfg = msg.content[wire.CONFIG]
    version, rank = int(cfg[wire.MODEL_VERSION]), int(cfg[wire.LORA_RANK])
    steps, batch = int(cfg[wire.LOCAL_STEPS]), int(cfg[wire.BATCH_SIZE])
    keep_a = bool(cfg.get(wire.FREEZE_A, False))  # an honest trainer leaves A as sent when told to (FFA, FedSVD)
    arrays = {k: a if keep_a and k.endswith(".lora_A.weight") else a + np.float32(step)
              for k, a in flower_arrays.from_record(msg.content[wire.ARRAYS]).items()}
    metrics: dict[str, int | float] = {
        wire.NUM_EXAMPLES: node.num_examples, wire.MODEL_VERSION: version, wire.LORA_RANK: rank,
        wire.LOSS_MEAN: 1.0 / (1 + version), wire.LOSS_SQ_MEAN: 1.0 / (1 + version) ** 2,
        wire.DURATION_S: node.delay, wire.STEPS: steps, wire.STARTED_AT: float(cfg[wire.PUSHED_AT]),
        wire.QUEUE_S: 0.0, wire.MODEL_LOADS: 1, wire.TRAINER_PID: 4000 + node.node_id, wire.SAMPLES: steps * batch,
    }
    fingerprint = node.fingerprint
    first_a = f"{LAYERS[0]}.lora_A.weight"
    if behaviour == "version":
        metrics[wire.MODEL_VERSION] = version + 1
    elif behaviour == "rank":
        metrics[wire.LORA_RANK] = rank + 1
    elif behaviour == "fingerprint":
        fingerprint = "another-model"
    elif behaviour == "nan":
        arrays[first_a][0, 0] = np.nan
    elif behaviour == "shape":
        for layer in LAYERS:
            arrays[f"{layer}.lora_A.weight"] = arrays[f"{layer}.lora_A.weight"][:-1]
            arrays[f"{layer}.lora_B.weight"] = arrays[f"{layer}.lora_B.weight"][:, :-1]
    elif behaviour == "no-examples":
        metrics[wire.NUM_EXAMPLES] = 0
    content = RecordDict({
        wire.ARRAYS: _arrays(arrays),
        wire.METRICS: MetricRecord(metrics),
        wire.CONFIG: ConfigRecord({wire.FINGERPRINT: fingerprint}),
    })
    return Message(content, reply_to=msg)


# ---- lying silos: replies built honestly, then corrupted (new code paths; the behaviours above are unchanged) ----
#: lies a `LyingNode` can tell in a train reply that is otherwise honest (`JOBS`' "ok")
LIES = {
    "none": "tell no lie",
    "scale": "multiply every LoRA factor by 10^4 (the dense head is untouched)",
    "examples": "claim 10^12 training examples",
    "examples-nan": "claim NaN training examples",
    "examples-fraction": "claim 2.5 training examples",
    "loss-nan": "report loss-mean NaN",
    "loss-negative": "report loss-mean −1",
    "duration-negative": "report duration-s −3",
    "variance": "report loss-sq-mean below loss-mean² (a negative variance)",
    "extra": "add a tensor the server never sent",
}
LIE_FACTOR = 1e4
LIE_EXAMPLES = 10**12
EXTRA_TENSOR = "m.backdoor.weight"


@dataclass
class LyingNode(FakeNode):
    """A FakeNode whose train replies are corrupted after they are built: one lie per job, the last repeating."""

    lies: Sequence[str] = ("none",)

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [x for x in self.lies if x not in LIES]
        if unknown or not self.lies:
            raise ValueError(f"node {self.node_id}: unknown lie {unknown!r}")

    def lie(self, job_index: int) -> str:
        """The lie told in the node's `job_index`-th train reply (0-based)."""
        return self.lies[min(job_index, len(self.lies) - 1)]


def tell_lie(reply: Message, request: Message, lie: str) -> Message:
    """A copy of an honest train reply to `request` with `lie` told (see `LIES`)."""
    arrays = {k: a.copy() for k, a in flower_arrays.from_record(reply.content[wire.ARRAYS]).items()}
    metrics = dict(reply.content[wire.METRICS])
    if lie == "scale":
        arrays = {k: v * np.float32(LIE_FACTOR) if k.endswith((".lora_A.weight", ".lora_B.weight")) else v
                  for k, v in arrays.items()}
    elif lie == "examples":
        metrics[wire.NUM_EXAMPLES] = LIE_EXAMPLES
    elif lie == "examples-nan":
        metrics[wire.NUM_EXAMPLES] = math.nan
    elif lie == "examples-fraction":
        metrics[wire.NUM_EXAMPLES] = 2.5
    elif lie == "loss-nan":
        metrics[wire.LOSS_MEAN] = math.nan
    elif lie == "loss-negative":
        metrics[wire.LOSS_MEAN] = -1.0
    elif lie == "duration-negative":
        metrics[wire.DURATION_S] = -3.0
    elif lie == "variance":
        metrics[wire.LOSS_MEAN], metrics[wire.LOSS_SQ_MEAN] = 2.0, 1.0
    elif lie == "extra":
        arrays[EXTRA_TENSOR] = np.ones((2, 2), np.float32)
    content = RecordDict({wire.ARRAYS: _arrays(arrays), wire.METRICS: MetricRecord(metrics),
                          wire.CONFIG: reply.content[wire.CONFIG]})
    return Message(content, reply_to=request)


class LyingGrid(FakeGrid):
    """A FakeGrid on which `LyingNode`s corrupt their (otherwise honest, "ok") train replies."""

    def _schedule(self, mid: str, msg: Message) -> list[tuple[float, int, Message]]:
        node = self.nodes.get(msg.metadata.dst_node_id)
        index = self.jobs_received.get(msg.metadata.dst_node_id, 0)
        scheduled = super()._schedule(mid, msg)
        if not isinstance(node, LyingNode) or msg.metadata.message_type != MessageType.TRAIN:
            return scheduled
        lie = node.lie(index)
        return [(due, seq, tell_lie(r, msg, lie) if lie != "none" and not r.has_error() else r)
                for due, seq, r in scheduled]
