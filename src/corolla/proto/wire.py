"""The wire contract shared by server/ and client/: message keys, versions, tensor codec.

Flower record keys are kebab-case constants defined only here. Array keys inside
records are peft's state-dict names, never renamed. Importing this module pulls
in numpy and protobuf only (no torch), so the ClientApp shim stays light.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from corolla import __version__
from corolla.proto import trainer_pb2
from corolla.spec import AUTO, TaskSpec, parse_labels

SOFTWARE_VERSION = __version__

# Flower's own keys.
ARRAYS = "arrays"
FROZEN = "frozen-arrays"
METRICS = "metrics"
CONFIG = "config"
NUM_EXAMPLES = "num-examples"
SERVER_ROUND = "server-round"

# corolla's keys (ConfigRecord going out, MetricRecord coming back).
LORA_RANK = "lora-rank"
MODEL_VERSION = "model-version"
LOCAL_STEPS = "local-steps"
BATCH_SIZE = "batch-size"
LR = "lr"
PROX_MU = "prox-mu"
SEED = "seed"
PUSHED_AT = "pushed-at"
SOFTWARE = "software-version"
FINGERPRINT = "model-fingerprint"
LOSS_MEAN = "loss-mean"
LOSS_SQ_MEAN = "loss-sq-mean"
DURATION_S = "duration-s"
STARTED_AT = "started-at"
QUEUE_S = "queue-s"
STEPS = "steps"
MODEL_LOADS = "model-loads"
TRAINER_PID = "trainer-pid"
SAMPLES = "samples"
DEVICE = "device"
MEMORY_BYTES = "memory-bytes"
ERROR = "error"
REFUSAL = "refusal"
# The run's TaskSpec, sent with every profile query and job (a trainer holding another reloads).
TASK = "task"
MODEL = "model"
DATASET = "dataset"
LABELS = "labels"
MAX_LENGTH = "max-length"
BASE_FINGERPRINT = "base-fingerprint"
ACCURACY = "accuracy"
EVAL_FRACTION = "eval-fraction"
FREEZE_A = "freeze-a"
DP_SGD_CLIP = "dp-sgd-clip"
DP_SGD_NOISE = "dp-sgd-noise-multiplier"
DP_DELTA = "dp-delta"
SITE_EPSILON = "site-epsilon"
EVAL_EXAMPLES = "eval-examples"
PERSONALIZE_STEPS = "personalize-steps"
PERSONAL_ACCURACY = "personal-accuracy"
PERSONAL_LOSS = "personal-loss"
LOSS = "loss"

# Node-config keys a SuperNode is started with (flower-supernode --node-config).
NODE_TRAINER = "trainer-address"
NODE_PARTITION = "partition-id"
NODE_PARTITIONS = "num-partitions"
NODE_RANK = "lora-rank"

WIRE_DTYPES = ("float32", "float16")
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def task_record(spec: TaskSpec, fingerprint: str = "") -> dict[str, Any]:
    """The run's TaskSpec (and the server's base-model fingerprint) as ConfigRecord fields."""
    return {TASK: spec.task, MODEL: spec.model, DATASET: spec.dataset, LABELS: ",".join(spec.labels),
            MAX_LENGTH: int(spec.max_length), BASE_FINGERPRINT: fingerprint}


def task_spec_proto(record: Mapping[str, Any]) -> trainer_pb2.TaskSpec:
    """`task_record`'s fields → the trainer's TaskSpec message; empty (keep what you hold) when absent."""
    if not record.get(TASK):
        return trainer_pb2.TaskSpec()
    return trainer_pb2.TaskSpec(task=str(record[TASK]), model=str(record.get(MODEL, AUTO)),
                                dataset=str(record.get(DATASET, AUTO)),
                                labels=list(parse_labels(str(record.get(LABELS, "")))),
                                max_length=int(record.get(MAX_LENGTH, TaskSpec.max_length)),
                                fingerprint=str(record.get(BASE_FINGERPRINT, "")))


def task_spec_from_proto(msg: trainer_pb2.TaskSpec) -> tuple[TaskSpec | None, str]:
    """The requested TaskSpec and the server's fingerprint; (None, "") for an empty message (an older server)."""
    if not msg.task:
        return None, ""
    spec = TaskSpec(task=msg.task, model=msg.model or AUTO, dataset=msg.dataset or AUTO,
                    labels=tuple(msg.labels), max_length=int(msg.max_length) or TaskSpec.max_length)
    return spec, msg.fingerprint


class WireError(ValueError):
    """A tensor or message on the wire is malformed."""


def encode_tensors(arrays: Mapping[str, np.ndarray]) -> list[trainer_pb2.Tensor]:
    """Pack numpy arrays as Tensor messages (float32 unless already float16)."""
    out = []
    for name, a in arrays.items():
        a = np.ascontiguousarray(a if a.dtype == np.float16 else np.asarray(a, np.float32))
        out.append(trainer_pb2.Tensor(name=name, shape=list(a.shape), dtype=str(a.dtype), data=a.tobytes()))
    return out


def decode_tensors(tensors: Iterable[trainer_pb2.Tensor]) -> dict[str, np.ndarray]:
    """Unpack Tensor messages; raise WireError on an unknown dtype or a size that does not match the shape."""
    out: dict[str, np.ndarray] = {}
    for t in tensors:
        if t.dtype not in WIRE_DTYPES:
            raise WireError(f"tensor `{t.name}` has dtype {t.dtype!r}; the wire carries only {WIRE_DTYPES}.")
        expected = int(np.prod(t.shape)) if len(t.shape) else 1
        itemsize = np.dtype(t.dtype).itemsize
        if len(t.data) != expected * itemsize:
            raise WireError(f"tensor `{t.name}` has {len(t.data)} bytes but shape {list(t.shape)} of {t.dtype} "
                            f"needs {expected * itemsize}.")
        a = np.frombuffer(t.data, dtype=t.dtype)
        if t.name in out:
            raise WireError(f"tensor `{t.name}` appears twice in one message.")
        out[t.name] = a.reshape(tuple(t.shape)).astype(np.float32)
    return out
