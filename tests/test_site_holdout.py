"""A site's held-out rows on a real (tiny) BERT: never trained on, the same every round, evaluated through gRPC."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from corolla.client.trainer import Trainer, TrainerError, TrainJob
from corolla.client.trainer_service import lora_to_proto, serve
from corolla.learning.tasks import TaskSpec, build_task
from corolla.learning.tasks.base import Rows, holdout_split
from corolla.learning.train_loop import AdapterModel, evaluate_model, initial_adapter, select_device
from corolla.proto import trainer_pb2, trainer_pb2_grpc, wire
from corolla.spec import LoraSpec

SPEC = TaskSpec(model="tiny-bert", max_length=32)
LORA = LoraSpec()


@pytest.fixture(scope="module")
def task():
    return build_task(SPEC)


@pytest.fixture(scope="module")
def trainer(task):
    data = task.encode(task.builtin_partition(0, 8, 0.5))
    return Trainer(AdapterModel(task, select_device("cpu")), data, rank=4)


@pytest.mark.parametrize("n, fraction, held", [(100, 0.1, 10), (7, 0.1, 1), (2, 0.5, 1), (1, 0.1, 0), (50, 0.0, 0),
                                               (3, 0.9, 2)])
def test_holdout_split_sizes_are_disjoint_and_cover_the_set(n, fraction, held):
    train, out = holdout_split(n, fraction, seed=7)
    assert len(out) == held and len(train) == n - held
    assert sorted(np.concatenate([train, out]).tolist()) == list(range(n))
    assert np.array_equal(train, np.sort(train)) and np.array_equal(out, np.sort(out))


def test_holdout_split_is_a_function_of_the_seed():
    a, b = holdout_split(1000, 0.1, seed=1), holdout_split(1000, 0.1, seed=1)
    assert np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], holdout_split(1000, 0.1, seed=2)[1])
    with pytest.raises(ValueError, match=r"eval-fraction must be in \[0, 1\)"):
        holdout_split(10, 1.0, seed=0)


def test_rows_view_reads_the_rows_it_names(task):
    data = task.encode(task.builtin_partition(0, 8, 0.5))
    rows = np.array([3, 0, 5])
    view = Rows(data, rows)
    inputs, labels = view.batch(np.arange(3), select_device("cpu"))
    whole, whole_labels = data.batch(np.array(rows), select_device("cpu"))
    assert len(view) == 3 and labels.tolist() == whole_labels.tolist()
    assert all(np.array_equal(inputs[k].numpy(), whole[k].numpy()) for k in inputs)
    labels_all = np.concatenate(list(data.label_blocks()))
    assert next(view.label_blocks()).tolist() == labels_all[rows].tolist()


def test_training_never_sees_the_held_out_rows(trainer, task):
    n = len(trainer.data)
    train_rows, held_rows = trainer.split(0.2)
    assert len(held_rows) == round(0.2 * n) and len(train_rows) == n - len(held_rows)
    assert not set(train_rows.rows.tolist()) & set(held_rows.rows.tolist())
    assert trainer.split(0.2)[1] is held_rows  # the same rows every round
    init = initial_adapter(task, 4, LORA, seed=0)
    job = TrainJob(arrays=init, rank=4, base_version=0, local_steps=2, batch_size=4, lr=1e-2, eval_fraction=0.2)
    result = trainer.train(job)
    assert result.stats.num_examples == len(train_rows)  # what the server weights by: the rows it trained on
    whole = trainer.train(TrainJob(arrays=init, rank=4, base_version=0, local_steps=2, batch_size=4, lr=1e-2))
    assert whole.stats.num_examples == n


def test_site_evaluation_reads_exactly_the_held_out_rows(trainer, task):
    init = initial_adapter(task, 4, LORA, seed=0)
    stats = trainer.evaluate(init, 4, wire.SOFTWARE_VERSION, LORA, eval_fraction=0.2)
    _, held = trainer.split(0.2)
    direct = evaluate_model(trainer.model.load(init, 4, LORA), held, trainer.model.device, task)
    assert stats.num_examples == len(held)
    assert stats.accuracy == pytest.approx(direct.accuracy) and stats.loss == pytest.approx(direct.loss)


def test_a_site_with_nothing_held_out_says_how_to_fix_it(trainer, task):
    init = initial_adapter(task, 4, LORA, seed=0)
    with pytest.raises(TrainerError, match="set eval-fraction > 0 or start the site with --eval-data"):
        trainer.evaluate(init, 4, wire.SOFTWARE_VERSION, LORA, eval_fraction=0.0)


def test_a_sites_own_eval_set_replaces_the_holdout(task):
    data = task.encode(task.builtin_partition(0, 8, 0.5))
    other = task.builtin_partition(1, 8, 0.5)
    t = Trainer(AdapterModel(task, select_device("cpu")), data, rank=4, eval_loader=lambda tk: tk.encode(other))
    train, held = t.split(0.3)
    assert train is t.data and len(held) == len(other)  # the whole silo trains


def test_evaluate_over_grpc(trainer, task):
    server, port = serve(trainer, "127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.GRPC_OPTIONS)
    try:
        stub = trainer_pb2_grpc.TrainerStub(channel)
        init = initial_adapter(task, 4, LORA, seed=0)
        reply = stub.Evaluate(trainer_pb2.EvaluateRequest(
            base_version=0, rank=4, software_version=wire.SOFTWARE_VERSION, arrays=wire.encode_tensors(init),
            lora=lora_to_proto(LORA), eval_fraction=0.2))
        assert reply.num_examples == len(trainer.split(0.2)[1]) and 0 <= reply.accuracy <= 1 and reply.loss > 0
        assert reply.model_fingerprint == trainer.model.fingerprint
        with pytest.raises(grpc.RpcError) as e:
            stub.Evaluate(trainer_pb2.EvaluateRequest(
                base_version=0, rank=4, software_version=wire.SOFTWARE_VERSION, arrays=wire.encode_tensors(init),
                lora=lora_to_proto(LORA), eval_fraction=0.0))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "holds out no data" in e.value.details()
    finally:
        channel.close()
        server.stop(None)


def test_max_examples_evaluates_the_first_held_out_rows(trainer, task):
    init = initial_adapter(task, 4, LORA, seed=0)
    _, held = trainer.split(0.2)
    stats = trainer.evaluate(init, 4, wire.SOFTWARE_VERSION, LORA, eval_fraction=0.2, max_examples=3)
    first = Rows(held, np.arange(3))
    assert first.rows.tolist() == held.rows[:3].tolist()  # a view of a view reads the whole set's rows
    direct = evaluate_model(trainer.model.load(init, 4, LORA), first, trainer.model.device, task)
    assert stats.num_examples == 3 and stats.loss == pytest.approx(direct.loss)


def test_personalization_fine_tunes_on_the_training_rows_and_scores_the_held_out_ones(trainer, task):
    init = initial_adapter(task, 4, LORA, seed=0)
    job = TrainJob(arrays=init, rank=4, base_version=0, local_steps=3, batch_size=4, lr=5e-2, eval_fraction=0.2)
    personal = trainer.personalize(job)
    base = trainer.evaluate(init, 4, wire.SOFTWARE_VERSION, LORA, eval_fraction=0.2)
    assert personal.num_examples == base.num_examples == len(trainer.split(0.2)[1])
    assert personal.loss != pytest.approx(base.loss)  # a different model (the fine-tuned copy) on the same rows


def test_a_site_whose_answers_are_all_cut_away_says_so():
    """max-length shorter than every prompt: no response token is scored, so there is no evaluation to report."""
    lm = build_task(TaskSpec(task="causal-lm", model="tiny-llama", max_length=4))
    import datasets

    rows = {"prompt": [f"Define the noun number {i} of this list." for i in range(20)],
            "response": [f"meaning {i}" for i in range(20)]}
    data = lm.encode(datasets.Dataset.from_dict(rows))
    t = Trainer(AdapterModel(lm, select_device("cpu")), data, rank=2)
    init = initial_adapter(lm, 2, LORA, seed=0)
    with pytest.raises(TrainerError, match="has a scored token: every answer is cut away by max-length 4"):
        t.evaluate(init, 2, wire.SOFTWARE_VERSION, LORA, eval_fraction=0.2)


def test_freeze_a_trains_only_b(trainer, task):
    """FFA-LoRA / FedSVD jobs: every lora_A comes back bit-identical, every lora_B moves; a normal job moves A too."""
    init = initial_adapter(task, 4, LORA, seed=0)
    init = {k: v + np.float32(0.01) if ".lora_B." in k else v for k, v in init.items()}  # B ≠ 0: A gets gradients
    frozen = trainer.train(TrainJob(arrays=init, rank=4, base_version=0, local_steps=2, batch_size=4, lr=1e-2,
                                    freeze_a=True)).arrays
    a_keys = [k for k in init if ".lora_A." in k]
    b_keys = [k for k in init if ".lora_B." in k]
    assert a_keys and all(np.array_equal(frozen[k], init[k]) for k in a_keys)
    assert all(not np.array_equal(frozen[k], init[k]) for k in b_keys)
    both = trainer.train(TrainJob(arrays=init, rank=4, base_version=0, local_steps=2, batch_size=4, lr=1e-2)).arrays
    assert any(not np.array_equal(both[k], init[k]) for k in a_keys)  # the flag is per job, not sticky
