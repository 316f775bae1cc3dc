"""Messages in and out: build train/profile messages, turn replies into validated `ClientUpdate`s.

Nothing a node sends is trusted: a reply becomes a `ClientUpdate` only after every
record, count, version, rank and fingerprint is checked against what that node was
sent; otherwise `RejectedReply` carries the recorded reason.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID

from corolla.proto import flower_arrays, wire
from corolla.spec import LoraSpec
from corolla.strategies import ClientUpdate, Dispatch


class RejectedReply(Exception):
    """A reply that must not reach the global model; `str(e)` is the recorded reason."""


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """The training instructions every job of one version carries (besides its arrays)."""

    local_steps: int
    batch_size: int
    lr: float
    prox_mu: float
    lora: LoraSpec
    #: the run's TaskSpec as `wire.task_record` fields: a trainer holding another model reloads it
    task: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: the share of each silo held out for site evaluation, never trained on (0: sites do not evaluate)
    eval_fraction: float = 0.0
    #: each site evaluates on at most this many of its held-out rows (0: all)
    eval_examples: int = 0
    #: sites train only B (the aggregator keeps A: FFA-LoRA, FedSVD)
    freeze_a: bool = False
    #: DP-SGD at the sites (clip 0: off) and the δ they report ε at
    dp_sgd_clip: float = 0.0
    dp_sgd_noise: float = 0.0
    dp_delta: float = 1e-5


def nbytes(arrays: Mapping[str, Any], dtype: str = "float32") -> int:
    """Payload bytes of a set of arrays: Flower `Array`s at their own dtype, numpy arrays at `dtype`."""
    return flower_arrays.nbytes(arrays, dtype)


def profile_message(node_id: int, ttl: float | None = None, task: Mapping[str, Any] | None = None) -> Message:
    """Ask a node for its profile (rank, device, examples, model fingerprint, software version).

    `task`: the run's TaskSpec (`wire.task_record`); the node's trainer loads it first when it holds another.
    """
    config = ConfigRecord({wire.SOFTWARE: wire.SOFTWARE_VERSION, **(task or {})})
    return Message(RecordDict({wire.CONFIG: config}), dst_node_id=node_id, message_type=MessageType.QUERY, ttl=ttl)


def train_message(node_id: int, dispatch: Dispatch, job: JobConfig, seed: int, pushed_at: float,
                  ttl: float | None = None) -> Message:
    """Build the train message for one node from its dispatch; the LoRA specification travels with it."""
    config = ConfigRecord({
        wire.SERVER_ROUND: dispatch.version + 1, wire.MODEL_VERSION: dispatch.version,
        wire.LORA_RANK: dispatch.rank, wire.LOCAL_STEPS: job.local_steps, wire.BATCH_SIZE: job.batch_size,
        wire.LR: job.lr, wire.PROX_MU: job.prox_mu, wire.SEED: seed, wire.PUSHED_AT: pushed_at,
        wire.SOFTWARE: wire.SOFTWARE_VERSION, wire.EVAL_FRACTION: job.eval_fraction, wire.FREEZE_A: job.freeze_a,
        wire.DP_SGD_CLIP: job.dp_sgd_clip, wire.DP_SGD_NOISE: job.dp_sgd_noise, wire.DP_DELTA: job.dp_delta,
        **job.lora.to_record(), **job.task,
    })
    return Message(_model_content(dispatch, config, job.lora.wire_dtype), dst_node_id=node_id,
                   message_type=MessageType.TRAIN, ttl=ttl)


def evaluate_message(node_id: int, dispatch: Dispatch, job: JobConfig, ttl: float | None = None,
                     personalize_steps: int = 0, seed: int = 0) -> Message:
    """Ask a node to evaluate the global model (`dispatch`) on its held-out share of the silo.

    `personalize_steps` > 0: it also fine-tunes the model on its training rows for that many
    steps (the job's batch size and lr, `seed`) and evaluates that copy too.
    """
    personalize = ({wire.PERSONALIZE_STEPS: personalize_steps, wire.BATCH_SIZE: job.batch_size, wire.LR: job.lr,
                    wire.SEED: seed} if personalize_steps else {})
    config = ConfigRecord({**personalize,
        wire.MODEL_VERSION: dispatch.version, wire.LORA_RANK: dispatch.rank, wire.SOFTWARE: wire.SOFTWARE_VERSION,
        wire.EVAL_FRACTION: job.eval_fraction, wire.EVAL_EXAMPLES: job.eval_examples, **job.lora.to_record(),
        **job.task,
    })
    return Message(_model_content(dispatch, config, job.lora.wire_dtype), dst_node_id=node_id,
                   message_type=MessageType.EVALUATE, ttl=ttl)


def _model_content(dispatch: Dispatch, config: ConfigRecord, dtype: str) -> RecordDict:
    content = RecordDict({wire.ARRAYS: flower_arrays.to_record(dispatch.arrays, dtype), wire.CONFIG: config})
    if dispatch.frozen:
        content[wire.FROZEN] = flower_arrays.to_record(dispatch.frozen, dtype)
    return content


def reply_node(reply: Message, sent_to: Mapping[str, int]) -> int:
    """The node a reply is about: its sender, except for an error the SuperLink wrote itself.

    When a node is offline or a message expired, the SuperLink answers in the node's place and
    signs the error as node SUPERLINK_NODE_ID (1); such a reply is about the node its message
    went to (`sent_to`: message id → node).
    """
    nid = reply.metadata.src_node_id
    if reply.has_error() and nid == SUPERLINK_NODE_ID:
        return sent_to.get(str(reply.metadata.reply_to_message_id), nid)
    return nid


def decode_update(reply: Message, sent: Dispatch, current_version: int, fingerprint: str,
                  job_id: str = "", node_id: int | None = None) -> ClientUpdate:
    """Validate a reply against what its node was sent; raise RejectedReply with the reason.

    `node_id`: the node the reply is about when not its sender (`reply_node`: an error written by the SuperLink).
    """
    nid = reply.metadata.src_node_id
    if reply.has_error():
        who = nid if node_id is None else node_id
        raise RejectedReply(f"node {who} replied with error {reply.error.code}: {reply.error.reason}")
    content = reply.content
    for key in (wire.ARRAYS, wire.METRICS, wire.CONFIG):
        if key not in content:
            raise RejectedReply(f"node {nid}: reply has no `{key}` record")
    m = content[wire.METRICS]
    try:
        arrays = flower_arrays.from_record(content[wire.ARRAYS])
    except flower_arrays.ArrayFormatError as e:
        raise RejectedReply(f"node {nid}: {e}; the reply is rejected") from None
    n = _integer(m, wire.NUM_EXAMPLES, nid, default=0)
    if n <= 0:
        raise RejectedReply(f"node {nid}: reply reports {n} training examples; at least 1 is required")
    if _integer(m, wire.MODEL_VERSION, nid, default=-1) != sent.version:
        raise RejectedReply(f"node {nid}: reply is for version {m.get(wire.MODEL_VERSION)}, "
                            f"it was sent version {sent.version}")
    if _integer(m, wire.LORA_RANK, nid, default=-1) != sent.rank:
        raise RejectedReply(f"node {nid}: reply has rank {m.get(wire.LORA_RANK)}, it was sent rank {sent.rank}")
    fp = str(content[wire.CONFIG].get(wire.FINGERPRINT, ""))
    if fp != fingerprint:
        raise RejectedReply(f"node {nid}: trained on base model {fp}, the server's is {fingerprint}")
    absurd = telemetry_problems(m)
    if absurd:
        raise RejectedReply(f"node {nid}: absurd telemetry ({'; '.join(absurd)}); no trainer reports this, so the "
                            "reply is not trusted and is rejected")
    telemetry = {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}
    return ClientUpdate(node_id=nid, arrays=arrays, sent=sent, num_examples=n,
                        staleness=current_version - sent.version, metrics=telemetry, job_id=job_id)


#: relative slack of the check E[ℓ²] >= E[ℓ]² (both are float means of the same per-example losses)
VARIANCE_SLACK = 1e-6


def _integer(m: Mapping[str, Any], key: str, nid: int, default: int) -> int:
    """An integer-valued metric; a non-integer (NaN, 1.5, a list) is a RejectedReply, not a crash."""
    v = m.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v):
        raise RejectedReply(f"node {nid}: `{key}` = {v!r} is not an integer; the reply is rejected")
    return int(v)


def telemetry_problems(m: Mapping[str, Any]) -> list[str]:
    """What no honest trainer reports: a non-finite or negative loss or duration, or E[ℓ²] < E[ℓ]² (a negative variance).

    Only the values a selector reads are checked (loss-mean, loss-sq-mean, duration-s); queue-s
    may honestly be NaN (no push time) or negative (clock skew between machines).
    """
    problems = []
    values: dict[str, float] = {}
    for key in (wire.LOSS_MEAN, wire.LOSS_SQ_MEAN, wire.DURATION_S):
        if key not in m:
            continue
        v = m[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            problems.append(f"`{key}` = {v!r} is not a finite number >= 0")
        else:
            values[key] = float(v)
    mean, sq = values.get(wire.LOSS_MEAN), values.get(wire.LOSS_SQ_MEAN)
    if mean is not None and sq is not None and sq < mean * mean - VARIANCE_SLACK * max(1.0, mean * mean):
        problems.append(f"`{wire.LOSS_SQ_MEAN}` = {sq!r} < `{wire.LOSS_MEAN}`² = {mean * mean!r} (a negative variance)")
    return problems
