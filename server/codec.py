"""Messages in and out: build train/profile messages, turn replies into validated `ClientUpdate`s.

Nothing a node sends is trusted: a reply becomes a `ClientUpdate` only after every
record, count, version, rank and fingerprint is checked against what that node was
sent; otherwise `RejectedReply` carries the recorded reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from corolla.proto import wire
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


def nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of a set of arrays on the wire (float32)."""
    return int(sum(np.asarray(a).size * 4 for a in arrays.values()))


def _record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array.from_numpy_ndarray(np.asarray(v, np.float32)) for k, v in arrays.items()})


def profile_message(node_id: int, ttl: float | None = None) -> Message:
    """Ask a node for its profile (rank, device, examples, model fingerprint, software version)."""
    return Message(RecordDict({wire.CONFIG: ConfigRecord({wire.SOFTWARE: wire.SOFTWARE_VERSION})}),
                   dst_node_id=node_id, message_type=MessageType.QUERY, ttl=ttl)


def train_message(node_id: int, dispatch: Dispatch, job: JobConfig, seed: int, pushed_at: float,
                  ttl: float | None = None) -> Message:
    """Build the train message for one node from its dispatch; the LoRA specification travels with it."""
    config = ConfigRecord({
        wire.SERVER_ROUND: dispatch.version + 1, wire.MODEL_VERSION: dispatch.version,
        wire.LORA_RANK: dispatch.rank, wire.LOCAL_STEPS: job.local_steps, wire.BATCH_SIZE: job.batch_size,
        wire.LR: job.lr, wire.PROX_MU: job.prox_mu, wire.SEED: seed, wire.PUSHED_AT: pushed_at,
        wire.SOFTWARE: wire.SOFTWARE_VERSION, **job.lora.to_record(),
    })
    content = RecordDict({wire.ARRAYS: _record(dispatch.arrays), wire.CONFIG: config})
    if dispatch.frozen:
        content[wire.FROZEN] = _record(dispatch.frozen)
    return Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN, ttl=ttl)


def decode_update(reply: Message, sent: Dispatch, current_version: int, fingerprint: str,
                  job_id: str = "") -> ClientUpdate:
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
    n = int(m.get(wire.NUM_EXAMPLES, 0))
    if n <= 0:
        raise RejectedReply(f"node {nid}: reply reports {n} training examples; at least 1 is required")
    if int(m.get(wire.MODEL_VERSION, -1)) != sent.version:
        raise RejectedReply(f"node {nid}: reply is for version {m.get(wire.MODEL_VERSION)}, "
                            f"it was sent version {sent.version}")
    if int(m.get(wire.LORA_RANK, -1)) != sent.rank:
        raise RejectedReply(f"node {nid}: reply has rank {m.get(wire.LORA_RANK)}, it was sent rank {sent.rank}")
    fp = str(content[wire.CONFIG].get(wire.FINGERPRINT, ""))
    if fp != fingerprint:
        raise RejectedReply(f"node {nid}: trained on base model {fp}, the server's is {fingerprint}")
    telemetry = {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}
    return ClientUpdate(node_id=nid, arrays=arrays, sent=sent, num_examples=n,
                        staleness=current_version - sent.version, metrics=telemetry, job_id=job_id)
