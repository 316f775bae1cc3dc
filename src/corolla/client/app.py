"""The Flower ClientApp: a thin shim that forwards each message to the node's trainer.

Flower starts a fresh process for every message, so this module imports no torch
and loads no model. In deployment the node's trainer address comes from the
SuperNode's node config (`trainer-address=HOST:PORT`) and jobs travel over gRPC;
in a Ray simulation there is no such key and the job runs in-process on a trainer
cached by the (long-lived) actor, through the very same `Trainer` code.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from corolla import precision
from corolla.client.errors import ClientJobError
from corolla.proto import flower_arrays, trainer_pb2, wire
from corolla.spec import LoraSpec

app = ClientApp()

CLIENT_ERROR = 2  # Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION


def _metadata_metrics(meta: trainer_pb2.UpdateMetadata) -> MetricRecord:
    return MetricRecord({
        wire.NUM_EXAMPLES: int(meta.num_examples), wire.MODEL_VERSION: int(meta.base_version),
        wire.LORA_RANK: int(meta.rank), wire.LOSS_MEAN: float(meta.loss_mean),
        wire.LOSS_SQ_MEAN: float(meta.loss_sq_mean), wire.DURATION_S: float(meta.duration_s),
        wire.STEPS: int(meta.steps), wire.STARTED_AT: float(meta.started_at), wire.QUEUE_S: float(meta.queue_s),
        wire.MODEL_LOADS: int(meta.model_loads), wire.TRAINER_PID: int(meta.trainer_pid),
        wire.SAMPLES: int(meta.samples), wire.SITE_EPSILON: float(meta.site_epsilon),
    })


def _train_request(msg: Message) -> trainer_pb2.TrainRequest:
    cfg = msg.content[wire.CONFIG]
    arrays = flower_arrays.from_record(msg.content[wire.ARRAYS])
    frozen = flower_arrays.from_record(msg.content[wire.FROZEN]) if wire.FROZEN in msg.content else {}
    return trainer_pb2.TrainRequest(
        base_version=int(cfg[wire.MODEL_VERSION]), rank=int(cfg[wire.LORA_RANK]),
        local_steps=int(cfg[wire.LOCAL_STEPS]), batch_size=int(cfg[wire.BATCH_SIZE]), lr=float(cfg[wire.LR]),
        prox_mu=float(cfg[wire.PROX_MU]), seed=int(cfg[wire.SEED]), pushed_at=float(cfg[wire.PUSHED_AT]),
        software_version=str(cfg[wire.SOFTWARE]), arrays=wire.encode_tensors(arrays),
        frozen=wire.encode_tensors(frozen), lora=_lora(LoraSpec.from_record(cfg)),
        task_spec=wire.task_spec_proto(cfg), eval_fraction=float(cfg.get(wire.EVAL_FRACTION, 0.0)),
        freeze_a=bool(cfg.get(wire.FREEZE_A, False)), dp_sgd_clip=float(cfg.get(wire.DP_SGD_CLIP, 0.0)),
        dp_sgd_noise=float(cfg.get(wire.DP_SGD_NOISE, 0.0)), dp_delta=float(cfg.get(wire.DP_DELTA, 0.0)),
    )


def _evaluate_request(msg: Message) -> trainer_pb2.EvaluateRequest:
    cfg = msg.content[wire.CONFIG]
    arrays = flower_arrays.from_record(msg.content[wire.ARRAYS])
    frozen = flower_arrays.from_record(msg.content[wire.FROZEN]) if wire.FROZEN in msg.content else {}
    return trainer_pb2.EvaluateRequest(
        base_version=int(cfg[wire.MODEL_VERSION]), rank=int(cfg[wire.LORA_RANK]),
        software_version=str(cfg[wire.SOFTWARE]), arrays=wire.encode_tensors(arrays),
        frozen=wire.encode_tensors(frozen), lora=_lora(LoraSpec.from_record(cfg)),
        task_spec=wire.task_spec_proto(cfg), eval_fraction=float(cfg[wire.EVAL_FRACTION]),
        max_examples=int(cfg.get(wire.EVAL_EXAMPLES, 0)), personalize_steps=int(cfg.get(wire.PERSONALIZE_STEPS, 0)),
        batch_size=int(cfg.get(wire.BATCH_SIZE, 0)), lr=float(cfg.get(wire.LR, 0.0)), seed=int(cfg.get(wire.SEED, 0)),
    )


def _reply_record(arrays: dict[str, np.ndarray], dtype: str) -> ArrayRecord:
    """The trained adapter at the run's wire dtype; a value the dtype cannot hold fails the job, never turns into inf."""
    for k, v in arrays.items():
        peak = precision.out_of_range(v, dtype)
        if peak is not None:
            raise ClientJobError(f"the trained adapter's `{k}` reaches |x| = {peak:.4g}, beyond float16's range "
                                 f"({precision.FLOAT16_MAX:g}); run with wire-dtype=bfloat16 or float32, or a lower lr")
    return flower_arrays.to_record(arrays, dtype)


def _lora(spec: LoraSpec) -> trainer_pb2.LoraSpec:
    return trainer_pb2.LoraSpec(alpha=spec.alpha, rslora=spec.rslora, target_modules=list(spec.target_modules),
                                dtype=spec.dtype)


def _remote(address: str) -> object:
    import grpc

    from corolla.proto import trainer_pb2_grpc

    channel = grpc.insecure_channel(address, options=wire.GRPC_OPTIONS)
    return trainer_pb2_grpc.TrainerStub(channel), channel


def _call(address: str, method: str, request: object) -> object:
    import grpc

    stub, channel = _remote(address)
    try:
        return getattr(stub, method)(request, wait_for_ready=False)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNAVAILABLE:
            raise ClientJobError(
                f"the trainer at {address} is unreachable ({e.details()}); start it with `corolla client` "
                "or `corolla trainer`, and check the node's trainer-address."
            ) from None
        raise ClientJobError(f"the trainer at {address} refused the job: {e.details()}") from None
    finally:
        channel.close()


def _dispatch(context: Context, method: str, request: object) -> object:
    address = context.node_config.get(wire.NODE_TRAINER)
    if address:
        return _call(str(address), method, request)
    from corolla.client import local  # simulation: torch is imported inside the long-lived Ray actor

    return local.handle(context, method, request)


def _error(msg: Message, e: Exception) -> Message:
    return Message(Error(code=CLIENT_ERROR, reason=str(e)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Forward a training job to the trainer; reply with the new adapter and its metadata."""
    try:
        reply: trainer_pb2.TrainReply = _dispatch(context, "Train", _train_request(msg))  # type: ignore[assignment]
        arrays = wire.decode_tensors(reply.arrays)
        record = _reply_record(arrays, LoraSpec.from_record(msg.content[wire.CONFIG]).wire_dtype)
    except (ClientJobError, wire.WireError, KeyError, ValueError) as e:
        return _error(msg, e)
    metrics = _metadata_metrics(reply.metadata)
    content = RecordDict({
        wire.ARRAYS: record,
        wire.METRICS: metrics,
        wire.CONFIG: ConfigRecord({wire.FINGERPRINT: reply.metadata.model_fingerprint}),
    })
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Forward an evaluation of the global model to the trainer; reply with its metrics on the site's held-out data."""
    try:
        reply: trainer_pb2.EvaluateReply = _dispatch(context, "Evaluate", _evaluate_request(msg))  # type: ignore[assignment]
    except (ClientJobError, wire.WireError, KeyError, ValueError) as e:
        return _error(msg, e)
    cfg = msg.content[wire.CONFIG]
    metrics = {wire.LOSS: float(reply.loss), wire.ACCURACY: float(reply.accuracy),
               wire.NUM_EXAMPLES: int(reply.num_examples), wire.MODEL_VERSION: int(cfg[wire.MODEL_VERSION]),
               **{k: float(v) for k, v in reply.extra.items()}}
    if int(cfg.get(wire.PERSONALIZE_STEPS, 0)) > 0:
        metrics.update({wire.PERSONAL_ACCURACY: float(reply.personal_accuracy),
                        wire.PERSONAL_LOSS: float(reply.personal_loss)})
    content = RecordDict({
        wire.METRICS: MetricRecord(metrics),
        wire.CONFIG: ConfigRecord({wire.FINGERPRINT: reply.model_fingerprint}),
    })
    return Message(content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Reply with the trainer's profile (rank, device, examples, model fingerprint, version)."""
    try:
        cfg = msg.content[wire.CONFIG] if wire.CONFIG in msg.content else {}
        request = trainer_pb2.DescribeRequest(task_spec=wire.task_spec_proto(cfg))  # the trainer loads it if needed
        p: trainer_pb2.ClientProfile = _dispatch(context, "Describe", request)  # type: ignore[assignment]
    except (ClientJobError, ValueError) as e:
        return _error(msg, e)
    content = RecordDict({
        wire.METRICS: MetricRecord({
            wire.LORA_RANK: int(p.rank), wire.NUM_EXAMPLES: int(p.num_examples),
            wire.MEMORY_BYTES: int(p.memory_bytes), wire.MODEL_LOADS: int(p.model_loads),
        }),
        wire.CONFIG: ConfigRecord({
            wire.DEVICE: p.device, wire.SOFTWARE: p.software_version, wire.FINGERPRINT: p.model_fingerprint,
            wire.REFUSAL: p.refusal,
        }),
    })
    return Message(content, reply_to=msg)
