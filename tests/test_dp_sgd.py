"""Sample-level DP-SGD at a site, on a real tiny BERT with peft: exact when inactive, clipped and noised when not."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from torch import nn

from corolla.client.trainer import Trainer, TrainJob
from corolla.client.trainer_service import lora_to_proto, serve
from corolla.learning.tasks import TaskSpec, build_task
from corolla.learning.train_loop import AdapterModel, initial_adapter, select_device
from corolla.proto import trainer_pb2, trainer_pb2_grpc, wire
from corolla.spec import LoraSpec

LORA = LoraSpec()


@pytest.fixture(scope="module")
def setup():
    task = build_task(TaskSpec(model="tiny-bert", max_length=32))
    model = AdapterModel(task, select_device("cpu"))
    for m in model.base.modules():  # dropout draws differ between one batch and one example at a time
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    data = task.encode(task.builtin_partition(0, 8, 0.5))
    init = initial_adapter(task, 4, LORA, seed=0)
    init = {k: v + np.float32(0.02) if ".lora_B." in k else v for k, v in init.items()}  # B ≠ 0: A gets gradients
    return task, model, data, init


def _train(setup, **dp):
    _, model, data, init = setup
    trainer = Trainer(model, data, rank=4)
    return trainer, trainer.train(TrainJob(arrays=init, rank=4, base_version=0, local_steps=3, batch_size=4, lr=1e-2,
                                           seed=5, **dp))


def test_inactive_dp_sgd_equals_the_plain_step(setup):
    """Noise 0 and a clip no gradient reaches: the adapter equals plain training's (peft's LoRA weights intact)."""
    _, plain = _train(setup)
    _, private = _train(setup, dp_sgd_clip=1e6, dp_sgd_noise=0.0)
    assert plain.arrays.keys() == private.arrays.keys()
    for k in plain.arrays:
        np.testing.assert_allclose(private.arrays[k], plain.arrays[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert private.stats.loss_mean == pytest.approx(plain.stats.loss_mean, rel=1e-5)


def test_clipping_and_noise_change_the_step(setup):
    _, plain = _train(setup)
    _, clipped = _train(setup, dp_sgd_clip=1e-4, dp_sgd_noise=0.0)
    _, noised = _train(setup, dp_sgd_clip=1e-4, dp_sgd_noise=1.0)
    b = next(k for k in plain.arrays if ".lora_B." in k)
    init = setup[3][b]
    # AdamW normalizes the step size, so compare directions: clipping tiny keeps the sign pattern, noise scrambles it
    assert not np.allclose(clipped.arrays[b], plain.arrays[b])
    agree_clip = np.mean(np.sign(clipped.arrays[b] - init) == np.sign(plain.arrays[b] - init))
    agree_noise = np.mean(np.sign(noised.arrays[b] - init) == np.sign(plain.arrays[b] - init))
    assert agree_noise < agree_clip


def test_site_epsilon_matches_opacus(setup):
    trainer, r1 = _train(setup, dp_sgd_clip=1.0, dp_sgd_noise=1.2, dp_delta=1e-5)
    n = len(trainer.data)
    ref = RDPAccountant()
    for _ in range(3):
        ref.step(noise_multiplier=1.2, sample_rate=4 / n)
    assert r1.site_epsilon == pytest.approx(ref.get_epsilon(1e-5))
    r2 = trainer.train(TrainJob(arrays=setup[3], rank=4, base_version=1, local_steps=3, batch_size=4, lr=1e-2,
                                dp_sgd_clip=1.0, dp_sgd_noise=1.2, dp_delta=1e-5))
    for _ in range(3):
        ref.step(noise_multiplier=1.2, sample_rate=4 / n)
    assert r2.site_epsilon == pytest.approx(ref.get_epsilon(1e-5))
    assert r2.site_epsilon > r1.site_epsilon  # it accumulates over the trainer's jobs


def test_dp_sgd_over_grpc_reports_the_sites_epsilon(setup):
    _, model, data, init = setup
    server, port = serve(Trainer(model, data, rank=4), "127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.GRPC_OPTIONS)
    try:
        reply = trainer_pb2_grpc.TrainerStub(channel).Train(trainer_pb2.TrainRequest(
            base_version=0, rank=4, local_steps=2, batch_size=4, lr=1e-2, seed=1, software_version=wire.SOFTWARE_VERSION,
            arrays=wire.encode_tensors(init), lora=lora_to_proto(LORA), dp_sgd_clip=0.5, dp_sgd_noise=1.0,
            dp_delta=1e-5))
        ref = RDPAccountant()
        for _ in range(2):
            ref.step(noise_multiplier=1.0, sample_rate=4 / len(data))
        assert reply.metadata.site_epsilon == pytest.approx(ref.get_epsilon(1e-5))
    finally:
        channel.close()
        server.stop(None)
