"""gRPC servicer for the trainer: translates proto messages to `Trainer` calls, nothing else."""

from __future__ import annotations

import os
from concurrent import futures

import grpc

from corolla.client.trainer import Trainer, TrainerError, TrainJob
from corolla.learning import train_loop as training
from corolla.proto import trainer_pb2, trainer_pb2_grpc, wire
from corolla.spec import LoraSpec


class TrainerServicer(trainer_pb2_grpc.TrainerServicer):
    """Serves one `Trainer`; domain errors become FAILED_PRECONDITION / INVALID_ARGUMENT."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def Describe(self, request: trainer_pb2.DescribeRequest, context: grpc.ServicerContext) -> trainer_pb2.ClientProfile:  # noqa: N802
        """Return the trainer's profile, after loading the run's TaskSpec when it differs from the one held.

        A spec this trainer cannot serve is not an RPC error: the profile of the model it
        keeps serving comes back with `refusal` set, and the server refuses the node with it.
        """
        refusal = ""
        try:
            self.trainer.ensure(*wire.task_spec_from_proto(request.task_spec))
        except TrainerError as e:
            refusal = str(e)
        except ValueError as e:  # a malformed TaskSpec (e.g. an unknown task name)
            refusal = f"the run's task specification is invalid here: {e}"
        return trainer_pb2.ClientProfile(**self.trainer.describe(), refusal=refusal)

    def Train(self, request: trainer_pb2.TrainRequest, context: grpc.ServicerContext) -> trainer_pb2.TrainReply:  # noqa: N802
        """Run one local training job."""
        try:
            self.trainer.ensure(*wire.task_spec_from_proto(request.task_spec))
            job = TrainJob(
                arrays=wire.decode_tensors(request.arrays), rank=request.rank, base_version=request.base_version,
                local_steps=request.local_steps, batch_size=request.batch_size, lr=request.lr,
                prox_mu=request.prox_mu, seed=request.seed, pushed_at=request.pushed_at,
                frozen=wire.decode_tensors(request.frozen),
                software_version=request.software_version, lora=lora_from_proto(request.lora),
                eval_fraction=request.eval_fraction, freeze_a=request.freeze_a, dp_sgd_clip=request.dp_sgd_clip,
                dp_sgd_noise=request.dp_sgd_noise, dp_delta=request.dp_delta,
            )
            r = self.trainer.train(job)
        except (wire.WireError, ValueError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except TrainerError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        meta = trainer_pb2.UpdateMetadata(
            model_fingerprint=r.fingerprint, base_version=r.base_version, rank=r.rank,
            num_examples=r.stats.num_examples, loss_mean=r.stats.loss_mean, loss_sq_mean=r.stats.loss_sq_mean,
            duration_s=r.stats.duration_s, steps=r.stats.steps, started_at=r.stats.started_at, queue_s=r.queue_s,
            model_loads=training.MODEL_LOADS, trainer_pid=os.getpid(), samples=r.stats.samples,
            site_epsilon=r.site_epsilon,
        )
        return trainer_pb2.TrainReply(metadata=meta, arrays=wire.encode_tensors(r.arrays))

    def Evaluate(self, request: trainer_pb2.EvaluateRequest, context: grpc.ServicerContext) -> trainer_pb2.EvaluateReply:  # noqa: N802
        """Evaluate an adapter on the silo."""
        personal = None
        try:
            self.trainer.ensure(*wire.task_spec_from_proto(request.task_spec))
            arrays, lora, frozen = (wire.decode_tensors(request.arrays), lora_from_proto(request.lora),
                                    wire.decode_tensors(request.frozen))
            s = self.trainer.evaluate(arrays, request.rank, request.software_version, lora, frozen=frozen,
                                      eval_fraction=request.eval_fraction, max_examples=request.max_examples)
            if request.personalize_steps > 0:
                job = TrainJob(arrays=arrays, rank=request.rank, base_version=request.base_version,
                               local_steps=request.personalize_steps, batch_size=request.batch_size, lr=request.lr,
                               seed=request.seed, frozen=frozen, lora=lora, eval_fraction=request.eval_fraction,
                               software_version=request.software_version)
                personal = self.trainer.personalize(job, max_examples=request.max_examples)
        except (wire.WireError, ValueError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except TrainerError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return trainer_pb2.EvaluateReply(
            loss=s.loss, accuracy=s.accuracy, num_examples=s.num_examples,
            model_fingerprint=self.trainer.model.fingerprint, extra=s.extra,
            personal_loss=personal.loss if personal else 0.0, personal_accuracy=personal.accuracy if personal else 0.0,
        )


def lora_from_proto(msg: trainer_pb2.LoraSpec) -> LoraSpec:
    """The job's LoRA specification; raise ValueError (INVALID_ARGUMENT) when it is missing or invalid."""
    if not msg.dtype:
        raise ValueError("the job carries no LoRA specification; the server runs an older corolla: install the "
                         "same version on the server and every client")
    return LoraSpec(alpha=msg.alpha, rslora=msg.rslora, target_modules=tuple(msg.target_modules), dtype=msg.dtype)


def lora_to_proto(lora: LoraSpec) -> trainer_pb2.LoraSpec:
    """The proto form of a LoRA specification."""
    return trainer_pb2.LoraSpec(alpha=lora.alpha, rslora=lora.rslora, target_modules=list(lora.target_modules),
                                dtype=lora.dtype)


def serve(trainer: Trainer, address: str = "127.0.0.1:0",
          servicer: type[TrainerServicer] = TrainerServicer) -> tuple[grpc.Server, int]:
    """Start a gRPC server for `trainer` on `address`; return it and the bound port.

    One worker thread: a trainer runs one job at a time (a SuperNode also runs one
    message at a time), so requests queue instead of fighting over the model.
    `servicer` lets a test serve a subclass (e.g. a rogue trainer) the same way.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=wire.GRPC_OPTIONS)
    trainer_pb2_grpc.add_TrainerServicer_to_server(servicer(trainer), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind the trainer service to {address}; choose another --port.")
    server.start()
    return server, port
