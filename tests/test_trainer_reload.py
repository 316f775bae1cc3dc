"""A long-lived trainer with --follow-run serves runs of different models, reloading once per TaskSpec; pinned
(the default) it refuses them without saying anything of its own silo.

The chain is the deployment one minus Flower's transport: the server's codec builds the
profile query and the train message carrying the run's TaskSpec, the ClientApp shim
forwards them over the real gRPC service to a trainer built by `corolla trainer`'s own
`build_trainer` (a --data silo), and the server's NodeRegistry admits or refuses the
profile reply. Models stay tiny: built-in tiny-bert and a tiny BERT folder saved here.
A full two-`corolla run` test on a long-lived SuperLink costs minutes on this machine
(tests/test_superlink.py's two-run test alone takes ~160 s), so it is not repeated here.
"""

from __future__ import annotations

import argparse

import pandas as pd
import pytest
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from corolla.client import app as shim
from corolla.client.args import add_trainer_args
from corolla.client.trainer_process import build_trainer
from corolla.client.trainer_service import serve
from corolla.learning import train_loop as training
from corolla.learning.tasks import build_task
from corolla.learning.train_loop import initial_adapter
from corolla.proto import wire
from corolla.server.codec import JobConfig, profile_message, train_message
from corolla.server.nodes import NodeRegistry
from corolla.spec import LoraSpec, TaskSpec
from corolla.strategies import Dispatch
from tests.test_models import save_tiny

pytestmark = pytest.mark.slow  # starts real processes (SuperLink, SuperNodes, trainers, Ray)

BBC = ("business", "entertainment", "politics", "sport", "tech")
SPEC_A = TaskSpec(model="tiny-bert", max_length=32)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    # Messages built outside a running app need a task identity (platform.md).
    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 2, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 3, raising=False)


@pytest.fixture(scope="module")
def silo(tmp_path_factory):
    rows = [{"text": f"{label} news number {i} about {label} things", "label": label}
            for i in range(4) for label in BBC]
    path = tmp_path_factory.mktemp("silo") / "silo.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("bert"), "bert")


def trainer_args(silo, *extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_trainer_args(p)
    return p.parse_args(["--data", str(silo), "--model", "tiny-bert", "--max-length", "32", "--rank", "4",
                         "--device", "cpu", *extra])


@pytest.fixture
def served(silo):
    """`corolla trainer --data silo.csv --model tiny-bert --follow-run` behind its gRPC service; the shim's context."""
    trainer = build_trainer(trainer_args(silo, "--follow-run"))
    server, port = serve(trainer, "127.0.0.1:0")
    ctx = Context(run_id=1, node_id=2, node_config={wire.NODE_TRAINER: f"127.0.0.1:{port}"}, state=RecordDict(),
                  run_config={})
    yield trainer, ctx
    server.stop(None)


class Recorder:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def node(self, row: dict) -> None:
        self.rows.append(row)


def profile(ctx, spec: TaskSpec, fingerprint: str = ""):
    """The server's profile query for a run of `spec`, through the shim; and the registry's verdict on the reply."""
    reply = shim.query(profile_message(2, task=wire.task_record(spec, fingerprint)), ctx)
    assert not reply.has_error(), reply.error.reason
    registry = NodeRegistry(grid=None, recorder=Recorder(), clock=None, refusal=lambda info: None, timeout=5)
    registry._admit(2, reply)
    return reply.content[wire.CONFIG], reply.content[wire.METRICS], registry


ADAPTERS: dict[str, dict] = {}


def adapter(spec: TaskSpec) -> dict:
    """The run's first adapter, built once before counting loads (the server's own model load is not the trainer's)."""
    if spec.model not in ADAPTERS:
        ADAPTERS[spec.model] = initial_adapter(build_task(spec), 4, LoraSpec(), seed=0)
    return ADAPTERS[spec.model]


def train(ctx, spec: TaskSpec):
    """One job of a run of `spec` (the server's train message) through the shim; the reply."""
    arrays = adapter(spec)
    job = JobConfig(local_steps=1, batch_size=4, lr=1e-2, prox_mu=0.0, lora=LoraSpec(), task=wire.task_record(spec))
    return shim.train(train_message(2, Dispatch(rank=4, version=0, arrays=arrays), job, seed=0, pushed_at=0.0), ctx)


def test_one_trainer_serves_two_models_in_turn_and_reloads_once_per_switch(served, bert_dir):
    trainer, ctx = served
    spec_b = TaskSpec(model=str(bert_dir), max_length=32)
    adapter(SPEC_A), adapter(spec_b)
    loads = training.MODEL_LOADS

    # run A: the model the trainer started with; asked twice, loaded never again
    cfg, m, reg = profile(ctx, SPEC_A)
    fp_a = cfg[wire.FINGERPRINT]
    assert cfg[wire.REFUSAL] == "" and 2 in reg.nodes and m[wire.MODEL_LOADS] == loads
    reply = train(ctx, SPEC_A)
    assert not reply.has_error(), reply.error.reason
    assert reply.content[wire.CONFIG][wire.FINGERPRINT] == fp_a and reply.content[wire.METRICS][wire.MODEL_LOADS] == loads

    # run B: another model folder: exactly one load, the new fingerprint, and it trains
    cfg, m, reg = profile(ctx, spec_b)
    fp_b = cfg[wire.FINGERPRINT]
    assert cfg[wire.REFUSAL] == "" and 2 in reg.nodes
    assert fp_b != fp_a and m[wire.MODEL_LOADS] == loads + 1 == training.MODEL_LOADS
    for _ in range(2):  # same spec again: warm
        reply = train(ctx, spec_b)
        assert not reply.has_error(), reply.error.reason
        assert reply.content[wire.CONFIG][wire.FINGERPRINT] == fp_b
        assert reply.content[wire.METRICS][wire.MODEL_LOADS] == loads + 1
    assert trainer.spec.model == str(bert_dir) and len(trainer.data) == 20

    # a job (not only a profile query) of run A switches back: one more load
    reply = train(ctx, SPEC_A)
    assert not reply.has_error(), reply.error.reason
    assert reply.content[wire.CONFIG][wire.FINGERPRINT] == fp_a
    assert reply.content[wire.METRICS][wire.MODEL_LOADS] == loads + 2

    # the same weights at another path on the server (its fingerprint says so): nothing reloaded
    cfg, m, reg = profile(ctx, TaskSpec(model="/srv/models/tiny-bert", max_length=32), fingerprint=fp_a)
    assert cfg[wire.REFUSAL] == "" and 2 in reg.nodes and m[wire.MODEL_LOADS] == loads + 2


@pytest.mark.parametrize(("spec", "names"), [
    (TaskSpec(model="/nowhere/bert-folder", max_length=32), ["/nowhere/bert-folder"]),
    (TaskSpec(model="tiny-bert", labels=("cats", "dogs"), max_length=32), ["labels cats,dogs"]),
])
def test_a_spec_the_site_cannot_load_refuses_the_node_and_the_old_model_keeps_serving(served, spec, names):
    trainer, ctx = served
    adapter(SPEC_A)
    held, loads = trainer.model, training.MODEL_LOADS
    cfg, m, reg = profile(ctx, spec)
    reason = cfg[wire.REFUSAL]
    assert reason and "\n" not in reason and all(n in reason for n in names)  # the run's own values, nothing of the site
    assert "keeps serving its current model" in reason and "reason is in the site's trainer log" in reason
    assert not any(label in reason for label in BBC) and "silo" not in reason
    assert 2 in reg.refused and reg.refused[2] == reason and reg.recorder.rows[-1]["status"] == "refused"
    assert cfg[wire.FINGERPRINT] == held.fingerprint and trainer.model is held
    # a job of that run is refused with the same line; the trainer still trains its own model
    reply = train(ctx, spec) if spec.model == "tiny-bert" else None
    if reply is not None:
        assert reply.has_error() and "cannot load the run's" in reply.error.reason
    reply = train(ctx, SPEC_A)
    assert not reply.has_error(), reply.error.reason
    assert reply.content[wire.CONFIG][wire.FINGERPRINT] == held.fingerprint
    assert training.MODEL_LOADS - loads <= 1  # at most the failed attempt itself; nothing kept


def test_pinned_trainer_refuses_another_model_without_loading(silo, bert_dir):
    trainer = build_trainer(trainer_args(silo))  # pinned: the default
    server, port = serve(trainer, "127.0.0.1:0")
    try:
        ctx = Context(run_id=1, node_id=2, node_config={wire.NODE_TRAINER: f"127.0.0.1:{port}"}, state=RecordDict(),
                      run_config={})
        loads = training.MODEL_LOADS
        cfg, _, reg = profile(ctx, TaskSpec(model=str(bert_dir), max_length=32))
        assert "differ in" not in cfg[wire.REFUSAL] and "(the run's model differ)" in cfg[wire.REFUSAL]
        assert "--follow-run" in cfg[wire.REFUSAL] and 2 in reg.refused
        assert training.MODEL_LOADS == loads
        cfg, _, reg = profile(ctx, SPEC_A)
        assert cfg[wire.REFUSAL] == "" and 2 in reg.nodes
    finally:
        server.stop(None)


def test_a_profile_query_without_a_spec_keeps_whatever_the_trainer_holds(served):
    """An older server (no TaskSpec on the wire) and the simulation path: nothing is checked or loaded."""
    trainer, ctx = served
    loads = training.MODEL_LOADS
    reply = shim.query(profile_message(2), ctx)
    assert not reply.has_error() and reply.content[wire.CONFIG][wire.REFUSAL] == ""
    assert training.MODEL_LOADS == loads and trainer.spec.model == "tiny-bert"


@pytest.mark.parametrize("follow", [False, True], ids=["pinned", "follow-run"])
def test_a_server_probing_label_sets_learns_nothing_of_the_sites_labels(silo, follow):
    """The attack: profile queries with guessed label sets, one at a time, reading each refusal. Every wrong guess,
    whether it shares labels with the silo or not, gets the same text, and no text holds a label or a path."""
    trainer = build_trainer(trainer_args(silo, *(["--follow-run"] if follow else [])))
    server, port = serve(trainer, "127.0.0.1:0")
    try:
        ctx = Context(run_id=1, node_id=2, node_config={wire.NODE_TRAINER: f"127.0.0.1:{port}"}, state=RecordDict(),
                      run_config={})
        guesses = [("sport",), ("sport", "cooking"), ("cooking", "gardening"), ("tech", "sport", "cooking"),
                   ("business", "entertainment")]
        texts = set()
        for guess in guesses:
            cfg, _, reg = profile(ctx, TaskSpec(model="tiny-bert", labels=guess, max_length=32))
            reason = cfg[wire.REFUSAL]
            assert reason and 2 in reg.refused
            texts.add(reason.replace(",".join(guess), "<guess>"))  # the run's own labels are echoed, nothing else
            assert not any(label in reason.replace(",".join(guess), "") for label in BBC), reason
            assert str(silo) not in reason and str(silo.parent) not in reason
        assert len(texts) == 1, texts  # a guess that shares labels with the silo reads like one that shares none
        assert trainer.spec.labels == ()  # still serving what it was started with
    finally:
        server.stop(None)
