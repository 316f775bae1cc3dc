"""The trainer behind its gRPC service, in-process (gRPC example level b), on a tiny BERT."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from corolla.client.trainer import Trainer, TrainerError
from corolla.client.trainer_service import lora_to_proto, serve
from corolla.learning import train_loop as training
from corolla.learning.tasks import TaskSpec, build_task
from corolla.learning.train_loop import AdapterModel, initial_adapter, select_device
from corolla.proto import trainer_pb2, trainer_pb2_grpc, wire
from corolla.spec import LoraSpec

SPEC = TaskSpec(model="tiny-bert", max_length=32)


@pytest.fixture(scope="module")
def task():
    return build_task(SPEC)


@pytest.fixture(scope="module")
def stub(task):
    data = task.encode(task.builtin_partition(0, 8, 0.5))
    trainer = Trainer(AdapterModel(task, select_device("cpu")), data, rank=4)
    server, port = serve(trainer, "127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.GRPC_OPTIONS)
    grpc.channel_ready_future(channel).result(timeout=10)
    yield trainer_pb2_grpc.TrainerStub(channel)
    channel.close()
    server.stop(None)


LORA = LoraSpec()


def request(arrays, rank=4, version="", lora=LORA) -> trainer_pb2.TrainRequest:
    return trainer_pb2.TrainRequest(base_version=3, rank=rank, local_steps=2, batch_size=4, lr=1e-2, seed=1,
                                    pushed_at=1.0, software_version=version or wire.SOFTWARE_VERSION,
                                    arrays=wire.encode_tensors(arrays),
                                    lora=lora_to_proto(lora) if lora is not None else None)


def test_describe(stub, task):
    p = stub.Describe(trainer_pb2.DescribeRequest())
    assert p.rank == 4 and p.num_examples > 0 and p.device == "cpu"
    assert p.software_version == wire.SOFTWARE_VERSION and p.task == task.name
    assert p.model_fingerprint == task.fingerprint(task.load_base_model())
    assert p.model_loads == training.MODEL_LOADS >= 1


def test_train_returns_changed_adapter_with_metadata(stub, task):
    init = initial_adapter(task, 4, LORA, seed=0)
    reply = stub.Train(request(init))
    out = wire.decode_tensors(reply.arrays)
    assert set(out) == set(init)
    assert all(out[k].shape == init[k].shape for k in init)
    changed = [k for k in init if not np.allclose(out[k], init[k])]
    assert any(k.endswith("lora_B.weight") for k in changed) and "base_model.model.classifier.weight" in changed
    m = reply.metadata
    assert (m.base_version, m.rank, m.steps) == (3, 4, 2)
    assert m.loss_mean > 0 and m.loss_sq_mean >= m.loss_mean**2 - 1e-9 and m.duration_s > 0
    assert m.started_at > 1.0 and m.queue_s == pytest.approx(m.started_at - 1.0)


def test_wrong_rank_and_version_are_failed_precondition(stub, task):
    init8 = initial_adapter(task, 8, LORA, seed=0)
    with pytest.raises(grpc.RpcError) as e:
        stub.Train(request(init8, rank=8))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "rank-8 adapter to a rank-4" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Train(request(initial_adapter(task, 4, LORA, seed=0), version="0.0.9"))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "install the same corolla version" in e.value.details()


def test_malformed_tensor_is_invalid_argument(stub):
    req = request({})
    req.arrays.append(trainer_pb2.Tensor(name="x", shape=[4], dtype="float32", data=b"\0" * 3))
    with pytest.raises(grpc.RpcError) as e:
        stub.Train(req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_adapter_keys_fail_cleanly(stub, task):
    arrays = dict(initial_adapter(task, 4, LORA, seed=0))
    arrays["base_model.model.bogus.weight"] = np.zeros(3, np.float32)
    with pytest.raises(grpc.RpcError) as e:
        stub.Train(request(arrays))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "bogus" in e.value.details()


def test_trainer_refuses_empty_silo_and_bad_rank(task):
    model = AdapterModel(task, select_device("cpu"))
    data = task.encode(task.builtin_partition(0, 8, 0.5))
    with pytest.raises(TrainerError, match="rank must be >= 1"):
        Trainer(model, data, rank=0)
    empty = task.encode(task.builtin_partition(0, 8, 0.5).select([]))
    with pytest.raises(TrainerError, match="no examples"):
        Trainer(model, empty, rank=4)


def test_returned_arrays_do_not_alias_the_live_model(task):
    model = AdapterModel(task, select_device("cpu"))
    data = task.encode(task.builtin_partition(0, 8, 0.5))
    init = initial_adapter(task, 4, LORA, seed=0)
    out, _ = model.train(init, 4, data, lora=LORA, steps=2, batch_size=4, lr=1e-2, seed=0)
    snapshot = {k: v.copy() for k, v in out.items()}
    model.train(init, 4, data, lora=LORA, steps=2, batch_size=4, lr=1e-2, seed=1)  # the next job reuses the same parameters
    assert all(np.array_equal(out[k], snapshot[k]) for k in out)
    assert any(not np.array_equal(out[k], init[k]) for k in out)


@pytest.mark.parametrize("lora,code,match", [
    (None, grpc.StatusCode.INVALID_ARGUMENT, "carries no LoRA specification"),
    (LoraSpec(dtype="bfloat16"), grpc.StatusCode.FAILED_PRECONDITION, "lora-dtype=bfloat16, which needs a CUDA device"),
    (LoraSpec(target_modules=("q_proj", "v_proj")), grpc.StatusCode.FAILED_PRECONDITION, "q_proj"),
])
def test_a_specification_the_trainer_cannot_honour_is_refused_with_the_reason(stub, task, lora, code, match):
    with pytest.raises(grpc.RpcError) as e:
        stub.Train(request(initial_adapter(task, 4, LORA, seed=0), lora=lora))
    assert e.value.code() == code and match in e.value.details()


def test_the_trainer_builds_the_adapter_the_server_specifies(task):
    """alpha, rsLoRA and targets come from the job: peft's scaling is exactly the server's s(r)."""
    model = AdapterModel(task, select_device("cpu"))
    data = task.encode(task.builtin_partition(0, 8, 0.5))
    for spec in (LoraSpec(alpha=16.0), LoraSpec(alpha=5.0, rslora=True),
                 LoraSpec(alpha=8.0, target_modules=("query", "key", "value"))):
        init = initial_adapter(task, 4, spec, seed=0)
        out, _ = model.train(init, 4, data, lora=spec, steps=1, batch_size=4, lr=1e-2, seed=0)
        assert set(out) == set(init)
        name = AdapterModel.adapter_name(4, spec)
        layers = [m for m in model.model.modules() if isinstance(getattr(m, "scaling", None), dict) and name in m.scaling]
        assert layers and all(m.scaling[name] == pytest.approx(spec.scale(4)) for m in layers)
        targets = {k.split(".")[-3] for k in out if "lora_A" in k}
        assert targets == set(spec.target_modules or ("query", "value"))


def test_a_job_is_a_function_of_its_seed_and_data(task):
    """Dropout included: the same job gives the same adapter whatever the process's RNG did before."""
    import torch

    model = AdapterModel(task, select_device("cpu"))
    data = task.encode(task.builtin_partition(0, 8, 0.5))
    init = initial_adapter(task, 4, LORA, seed=0)
    a, _ = model.train(init, 4, data, lora=LORA, steps=3, batch_size=4, lr=1e-2, seed=5)
    torch.rand(1000)  # another job's randomness in between
    b, _ = model.train(init, 4, data, lora=LORA, steps=3, batch_size=4, lr=1e-2, seed=5)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c, _ = model.train(init, 4, data, lora=LORA, steps=3, batch_size=4, lr=1e-2, seed=6)
    assert any(not np.array_equal(a[k], c[k]) for k in a)
