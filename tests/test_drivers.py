"""Both drivers, every path, on a scripted Grid and a fake clock: no torch, no model, no network, no sleeping.

Every node returns what it was sent plus its `step`, so the global model after a
run is known in closed form: FedAvg (and FedBuff/FedAsync over it) adds
Σ w_i (returned_i − sent_i) = Σ w_i step_i to every array, with w_i the weight the
run recorded for update i. The tests check that sum against the saved global model,
and every recorded weight against an independent reference (n_i / Σn, times
(1 + τ)^-0.5 asynchronously).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from flwr.app import MessageType
from flwr.supercore.task_identity import TaskIdentity

from corolla.config import RunConfig
from corolla.proto import flower_arrays, wire
from corolla.server import report
from corolla.server.async_driver import NODE_REFRESH_S, POLL_S, TTL_GRACE_S, run_async
from corolla.server.clock import FakeClock
from corolla.server.federation import Federation
from corolla.server.records import read_jsonl
from corolla.server.sync_driver import run_sync
from corolla.spec import LoraSpec
from corolla.strategies import AggregationError, FedAvg
from tests.fakes import (
    FINGERPRINT,
    HEAD,
    IMPOSTOR_ID,
    LAYERS,
    NODE_GONE,
    TRAINER_DOWN,
    FakeEvaluator,
    FakeGrid,
    FakeNode,
    accuracy_of,
    delta_norm,
)

pytestmark = pytest.mark.timeout(20)

#: the fake nodes move every value by their `step` (up to 0.5) per job: at lr 2 10 AdamW
#: steps can move a value that far for 20 versions (the server rejects any change beyond what the job's optimizer can
#: make: adam_change_bound)
FAKE_LR = {"lr": 2.0}
#: so large an lr that 10⁴× factors are within what AdamW could do: the tests of the norm guard and the robust centres
#: use it, so that what bounds the scaling liar there is the guard, not the optimizer bound
SCALE_LR = {"lr": 1e8}
#: the norm guard and the weight-share bound off: for tests of other rules whose fake steps differ more than 4× or whose
#: two-update steps have unequal example counts (the guard would clip or equalise them: tests/strategies/test_robust.py)
GUARD_OFF = {"max-update-norm": -1.0, "max-weight-share": 1.0}
SYNC = {"num-rounds": 3, "min-nodes": 2, "round-timeout": 30.0, **FAKE_LR}
ASYNC = {"mode": "async", "num-rounds": 3, "min-nodes": 2, "round-timeout": 30.0, "concurrency": 2, **FAKE_LR}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    # Messages built outside a running app need a task identity (platform.md).
    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    # report.md is still written; only matplotlib (0.1 s a plot) is skipped
    monkeypatch.setattr(report, "plot_curves", lambda *args, **kwargs: None)


@dataclass
class Run:
    """A Federation on fakes, and readers for what it recorded."""

    fed: Federation
    grid: FakeGrid
    clock: FakeClock
    evaluator: FakeEvaluator

    @property
    def dir(self) -> Path:
        return self.fed.recorder.dir

    def updates(self, status: str | None = None, node: int | None = None) -> list[dict]:
        rows = read_jsonl(self.dir / "updates.jsonl")
        return [r for r in rows if (status is None or r["status"] == status) and (node is None or r["node"] == node)]

    def metrics(self) -> list[dict]:
        return read_jsonl(self.dir / "metrics.jsonl")

    def node_rows(self) -> dict[int, dict]:
        """nodes.jsonl by node id (admitted rows name it `node_id`, refused ones `node`)."""
        return {r.get("node", r.get("node_id")): r for r in read_jsonl(self.dir / "nodes.jsonl")}

    def global_model(self) -> dict[str, np.ndarray]:
        with np.load(self.dir / "global.npz") as z:
            return {k: z[k] for k in z.files}

    def run(self) -> dict:
        return run_sync(self.fed) if self.fed.cfg.mode == "sync" else run_async(self.fed)


def federation(tmp_path: Path, nodes: list[FakeNode], base: dict, **keys) -> Run:
    clock = FakeClock()
    cfg = RunConfig.from_mapping({"out-dir": str(tmp_path / "run"), **base, **keys})
    grid = FakeGrid(nodes, clock)
    evaluator = FakeEvaluator()
    return Run(Federation(cfg, grid, evaluator, clock=clock), grid, clock, evaluator)


def steps_of(nodes: list[FakeNode]) -> dict[int, float]:
    return {n.node_id: n.step for n in nodes}


def expected_head(run: Run, steps: dict[int, float]) -> float:
    """Σ over accepted updates of weight × the node's step: the head started at 0."""
    return sum(r["weight"] * steps[r["node"]] for r in run.updates("accepted"))


def by_version(rows: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        out[r["applied_version"]].append(r)
    return out


def reference_deltas(head_shift: float, rank: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """ΔW = s·B·A when every array moved by `head_shift` from the fake initial adapter (B0 = 0)."""
    init = FakeEvaluator().initial_adapter(rank, LoraSpec(), seed)
    s = LoraSpec().alpha / rank
    return {layer: s * (init[f"{layer}.lora_B.weight"] + head_shift) @ (init[f"{layer}.lora_A.weight"] + head_shift)
            for layer in LAYERS}


# ---- synchronous rounds ---------------------------------------------------------------------
def test_sync_happy_path_versions_weights_and_model(tmp_path):
    nodes = [FakeNode(1, num_examples=10, step=0.1), FakeNode(2, num_examples=30, step=0.2),
             FakeNode(3, num_examples=60, step=0.3)]
    run = federation(tmp_path, nodes, SYNC, **{"min-nodes": 3, "lr-decay": 0.9})
    summary = run.run()

    assert summary["versions"] == 3 and summary["rejected_updates"] == 0 and summary["failed_replies"] == 0
    metrics = run.metrics()
    assert [m["version"] for m in metrics] == [0, 1, 2, 3]
    assert [m["clients"] for m in metrics] == [0, 3, 3, 3]
    assert metrics[0]["accuracy"] == 0.0  # B starts at zero: ΔW = 0
    accs = [m["accuracy"] for m in metrics]
    assert accs == sorted(accs) and len(set(accs)) == 4
    assert all(a["bytes_down"] < b["bytes_down"] and a["bytes_up"] < b["bytes_up"] for a, b in zip(metrics, metrics[1:]))
    # every round: all three accepted, weights n_i / Σn (np.average's weights), summing to 1
    accepted = run.updates("accepted")
    assert len(accepted) == 9 and run.updates() == accepted
    for version, rows in by_version(accepted).items():
        assert sorted(r["node"] for r in rows) == [1, 2, 3]
        assert {r["node"]: r["weight"] for r in rows} == pytest.approx({1: 0.1, 2: 0.3, 3: 0.6})
        assert sum(r["weight"] for r in rows) == pytest.approx(1.0)
        assert all(r["base_version"] == version - 1 and r["staleness"] == 0 and r["rank"] == 2 for r in rows)
    assert len({r["job"] for r in accepted}) == 9
    # the global model in closed form: each round moves every array by Σ w_i step_i = 0.25
    shift = 3 * np.average([0.1, 0.2, 0.3], weights=[10, 30, 60])
    model = run.global_model()
    np.testing.assert_allclose(model[f"dense/{HEAD}"], shift, rtol=1e-5)
    ref = reference_deltas(shift)
    for layer in LAYERS:
        np.testing.assert_allclose(model[f"delta/{layer}"], ref[layer], rtol=1e-4)
    assert metrics[-1]["accuracy"] == pytest.approx(accuracy_of(delta_norm(ref)), rel=1e-5)
    # what went out: the round's version, the decayed lr, and the aggregated model of the previous round
    jobs = run.grid.train_jobs()
    assert len(jobs) == 9
    for j in jobs:
        v = j.config[wire.MODEL_VERSION]
        assert j.config[wire.SERVER_ROUND] == v + 1 and j.config[wire.LORA_RANK] == 2
        assert j.config[wire.LR] == pytest.approx(FAKE_LR["lr"] * 0.9**v)
        np.testing.assert_allclose(flower_arrays.from_record(j.message.content[wire.ARRAYS])[HEAD], v * shift / 3, rtol=1e-5)
    assert len(read_jsonl(run.dir / "selection.jsonl")) == 3
    assert run.evaluator.initial_ranks == [2]
    assert (run.dir / "report.md").exists() and (run.dir / "summary.json").exists()


def test_sync_error_reply_is_recorded_failed_and_the_round_aggregates_the_rest(tmp_path):
    nodes = [FakeNode(1, step=0.1), FakeNode(2, step=0.5, jobs=["error", "ok"]), FakeNode(3, step=0.3)]
    run = federation(tmp_path, nodes, SYNC, **{"num-rounds": 2})
    summary = run.run()

    assert summary["versions"] == 2 and summary["failed_replies"] == 1
    [failed] = run.updates("failed")
    assert failed["node"] == 2 and failed["applied_version"] is None
    assert failed["reason"] == "node 2 replied with error 2: CUDA out of memory on node 2"
    rounds = by_version(run.updates("accepted"))
    assert {r["node"]: r["weight"] for r in rounds[1]} == pytest.approx({1: 0.5, 3: 0.5})
    assert {r["node"]: r["weight"] for r in rounds[2]} == pytest.approx({1: 1 / 3, 2: 1 / 3, 3: 1 / 3})
    np.testing.assert_allclose(run.global_model()[f"dense/{HEAD}"], 0.2 + 0.3, rtol=1e-5)
    assert "CUDA out of memory on node 2" in (run.dir / "report.md").read_text()


@pytest.mark.parametrize(
    "node2, elapsed",
    [
        (FakeNode(2, jobs=["silent"]), 30.0),  # never replies: each round waits the whole round-timeout
        (FakeNode(2, delay=45.0), 30.0),  # replies after the timeout: dropped, like silence
    ],
    ids=["silent", "too-slow"],
)
def test_sync_node_that_does_not_reply_in_time_is_recorded_failed(tmp_path, node2, elapsed):
    nodes = [FakeNode(1, delay=5.0, step=0.1), node2]
    run = federation(tmp_path, nodes, SYNC, **{"num-rounds": 2})
    summary = run.run()

    assert summary["versions"] == 2 and summary["failed_replies"] == 2
    failed = run.updates("failed")
    assert [f["node"] for f in failed] == [2, 2]
    assert all(f["reason"] == "node 2 did not reply within 30s" for f in failed)
    assert [r["node"] for r in run.updates("accepted")] == [1, 1]
    assert [r["weight"] for r in run.updates("accepted")] == [1.0, 1.0]
    assert [m["wall_s"] for m in run.metrics()] == [0.0, elapsed, 2 * elapsed]
    assert len(run.grid.train_jobs(2)) == 2  # a failure is data: the node is picked again


def test_sync_round_lasts_as_long_as_its_slowest_reply(tmp_path):
    nodes = [FakeNode(1, delay=5.0), FakeNode(2, delay=12.0)]
    run = federation(tmp_path, nodes, SYNC, **{"num-rounds": 2})
    run.run()

    assert [m["wall_s"] for m in run.metrics()] == [0.0, 12.0, 24.0]
    assert len(run.updates("accepted")) == 4


def test_sync_reply_from_a_node_sent_no_job_and_a_second_reply_are_rejected(tmp_path):
    # node 1's reply is echoed as if from node 999; node 2 answers twice, the second copy with 10 × its step
    nodes = [FakeNode(1, step=0.1, jobs=["impostor"]), FakeNode(2, step=0.2, jobs=["twice"]), FakeNode(3, step=0.3)]
    run = federation(tmp_path, nodes, SYNC, **{"num-rounds": 1})
    summary = run.run()

    rejected = {r["node"]: r["reason"] for r in run.updates("rejected")}
    assert rejected == {
        IMPOSTOR_ID: f"node {IMPOSTOR_ID}: a reply from a node that was sent no job this round; it is dropped",
        2: "node 2: a second reply this round; it is dropped",
    }
    assert summary["rejected_updates"] == 2 and summary["versions"] == 1
    assert {r["node"]: r["weight"] for r in run.updates("accepted")} == pytest.approx({1: 1 / 3, 2: 1 / 3, 3: 1 / 3})
    # neither the echo nor the 10 × copy reached the model: it moved by the mean of the three first replies
    np.testing.assert_allclose(run.global_model()[f"dense/{HEAD}"], 0.2, rtol=1e-5)


BAD_REPLIES = [
    # behaviour, the recorded reason (node 2 was sent version 0 at rank 2)
    ("version", "node 2: reply is for version 1, it was sent version 0"),
    ("rank", "node 2: reply has rank 3, it was sent rank 2"),
    ("fingerprint", f"node 2: trained on base model another-model, the server's is {FINGERPRINT}"),
    ("nan", "node 2: `m.l0.q.lora_A.weight` holds NaN or infinite values; the update is rejected."),
    ("shape", "node 2: `m.l0.q.lora_A.weight` has shape (1, 4), expected (2, 4) (wrong rank); the update is rejected."),
    ("no-examples", "node 2: reply reports 0 training examples; at least 1 is required"),
]


@pytest.mark.parametrize("behaviour, reason", BAD_REPLIES, ids=[b for b, _ in BAD_REPLIES])
def test_sync_bad_reply_is_rejected_with_its_reason(tmp_path, behaviour, reason):
    nodes = [FakeNode(1, step=0.1), FakeNode(2, step=0.5, jobs=[behaviour])]
    run = federation(tmp_path, nodes, SYNC, **{"num-rounds": 1})
    summary = run.run()

    assert [(r["node"], r["reason"]) for r in run.updates("rejected")] == [(2, reason)]
    assert summary["rejected_updates"] == 1 and summary["versions"] == 1
    assert [(r["node"], r["weight"]) for r in run.updates("accepted")] == [(1, 1.0)]
    np.testing.assert_allclose(run.global_model()[f"dense/{HEAD}"], 0.1, rtol=1e-5)  # node 2's 0.5 never arrived


@pytest.mark.parametrize("behaviour", ["version", "nan"])
def test_async_bad_reply_is_rejected_and_the_node_gets_work_again(tmp_path, behaviour):
    nodes = [FakeNode(1, delay=1.0, step=0.1), FakeNode(2, delay=1.0, step=0.5, jobs=[behaviour, "ok"])]
    run = federation(tmp_path, nodes, ASYNC, **{"async-rule": "fedasync", **GUARD_OFF})
    summary = run.run()

    reason = dict(BAD_REPLIES)[behaviour]
    assert [(r["node"], r["reason"]) for r in run.updates("rejected")] == [(2, reason)]
    assert summary["versions"] == 3 and len(run.grid.train_jobs(2)) >= 2
    np.testing.assert_allclose(run.global_model()[f"dense/{HEAD}"], expected_head(run, steps_of(nodes)), rtol=1e-5)


REFUSALS = [
    # the third node, and the reason it is refused with
    (FakeNode(3, fingerprint="another-model"), {},
     f"base model fingerprint another-model differs from the server's {FINGERPRINT}; start the trainer with"),
    (FakeNode(3, software="0.0.1"), {}, f"runs corolla 0.0.1, the server runs {wire.SOFTWARE_VERSION}; install the same"),
    (FakeNode(3, num_examples=0), {}, "declares 0 training examples; a node needs at least one"),
    (FakeNode(3, query="malformed"), {}, "profile reply is malformed (KeyError('model-fingerprint'))"),
    (FakeNode(3, rank=4), {"aggregation": "fedavg", "lora-rank": 2},
     "fedavg: a client asked for rank 4 but the global adapter has rank 2; FedAvg needs one rank"),
]


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("node3, keys, reason", REFUSALS,
                         ids=["fingerprint", "software", "no-examples", "malformed", "rank"])
def test_refused_node_is_recorded_with_its_reason_and_never_sent_work(tmp_path, mode, node3, keys, reason):
    nodes = [FakeNode(1, delay=1.0), FakeNode(2, delay=1.0), node3]
    run = federation(tmp_path, nodes, SYNC if mode == "sync" else ASYNC, **{"num-rounds": 2, **keys})
    summary = run.run()

    rows = run.node_rows()
    assert rows[3]["status"] == "refused" and rows[3]["reason"].startswith(reason)
    assert rows[1]["status"] == rows[2]["status"] == "ok"
    assert run.grid.train_jobs(3) == [] and run.updates(node=3) == []
    assert run.grid.queried().count(3) == 1  # refused for good: never profiled again
    assert summary["versions"] == 2


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(("third", "why"), [
    ({"fingerprint": "another-model"}, "1 refused (reasons in nodes.jsonl)"),
    ({"query": "error"}, "1 unavailable (its trainer did not answer; reasons in nodes.jsonl)"),
], ids=["refused", "trainer-down"])
def test_min_nodes_never_reached_times_out_naming_min_nodes_and_why(tmp_path, mode, third, why):
    """A node refused (another model) and a node whose trainer does not answer: each named in the timeout."""
    run = federation(tmp_path, [FakeNode(1), FakeNode(2), FakeNode(3, **third)], SYNC if mode == "sync" else ASYNC,
                     **{"min-nodes": 3})

    with pytest.raises(TimeoutError) as e:
        run.run()
    assert str(e.value) == (f"only 2 of the 3 nodes needed (min-nodes) joined within 30s; {why}; start more "
                            "SuperNodes or lower min-nodes.")
    assert 30.0 < run.grid.elapsed() <= 31.0  # waited the round-timeout on the fake clock, one poll a second
    assert run.grid.train_jobs() == [] and run.metrics() == []


def test_min_nodes_reached_by_a_late_joiner_starts_the_run(tmp_path):
    nodes = [FakeNode(1), FakeNode(2), FakeNode(3, joins_at=12.0)]
    run = federation(tmp_path, nodes, SYNC, **{"min-nodes": 3, "num-rounds": 1})
    run.run()

    rows = run.node_rows()
    assert rows[3]["status"] == "ok" and rows[3]["wall_s"] == 12.0
    assert [j.at - run.grid.t0 for j in run.grid.train_jobs()] == pytest.approx([12.0, 12.0, 12.0])
    assert sorted(r["node"] for r in run.updates("accepted")) == [1, 2, 3]


def test_sync_time_budget_lets_no_round_start_once_spent(tmp_path):
    nodes = [FakeNode(1, delay=20.0), FakeNode(2, delay=20.0)]
    run = federation(tmp_path, nodes, SYNC, **{"num-rounds": 10, "time-budget": 50.0})
    summary = run.run()

    # rounds start at 0, 20 and 40 s; at 60 s the budget of 50 s is spent
    assert summary["versions"] == 3 and len(run.grid.train_jobs()) == 6
    assert [m["version"] for m in run.metrics()] == [0, 1, 2, 3]
    assert run.grid.elapsed() == 60.0


def test_sync_nodes_joining_and_leaving_between_rounds(tmp_path):
    # rounds take 10 s; node 3 appears at 15 s, node 2 leaves at 25 s (mid-round 3, whose job it never answers)
    nodes = [FakeNode(1, delay=10.0), FakeNode(2, delay=10.0, leaves_at=25.0), FakeNode(3, delay=10.0, joins_at=15.0)]
    run = federation(tmp_path, nodes, SYNC, **{"num-rounds": 4})
    run.run()

    selections = read_jsonl(run.dir / "selection.jsonl")
    assert [s["candidates"] for s in selections] == [2, 2, 3, 2]
    assert [sorted(s["picked"]) for s in selections] == [[1, 2], [1, 2], [1, 2, 3], [1, 3]]
    assert [(r["node"], r["reason"]) for r in run.updates("failed")] == [(2, "node 2 did not reply within 30s")]
    assert {r["node"] for r in run.updates("accepted")} == {1, 2, 3}


# ---- aggregation errors and rejected rounds leave the model unchanged -------------------------------
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_all_replies_rejected_leaves_the_model_unchanged(tmp_path, mode):
    nodes = [FakeNode(1, delay=1.0, jobs=["nan"]), FakeNode(2, delay=1.0, jobs=["fingerprint"])]
    keys = {"num-rounds": 2} if mode == "sync" else {"time-budget": 5.0}  # async would wait forever otherwise
    run = federation(tmp_path, nodes, SYNC if mode == "sync" else ASYNC, **keys)
    summary = run.run()

    assert summary["versions"] == 0 and summary["final_accuracy"] == 0.0
    assert [m["version"] for m in run.metrics()] == [0]
    rows = run.updates()
    assert rows and all(r["status"] == "rejected" for r in rows) and summary["rejected_updates"] == len(rows)
    model = run.global_model()
    assert not model[f"dense/{HEAD}"].any() and delta_norm({k: v for k, v in model.items() if "delta" in k}) == 0.0
    if mode == "async":  # the budget ended it: no job starts after 5 s of training
        assert max(j.at for j in run.grid.train_jobs()) - run.grid.t0 <= 5.0 + POLL_S


def _fail_first_aggregation(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = FedAvg.weights

    def weights(self, updates):
        calls.append(len(updates))
        if len(calls) == 1:
            raise AggregationError("aggregate: injected failure; the global model is unchanged.")
        return original(self, updates)

    monkeypatch.setattr(FedAvg, "weights", weights)
    return calls


INJECTED = "aggregate: injected failure; the global model is unchanged."


def test_sync_aggregation_error_rejects_the_round_and_leaves_the_model_unchanged(tmp_path, monkeypatch):
    calls = _fail_first_aggregation(monkeypatch)
    nodes = [FakeNode(1, step=0.1), FakeNode(2, step=0.3)]
    run = federation(tmp_path, nodes, SYNC, **{"num-rounds": 2})
    summary = run.run()

    assert calls == [2, 2]
    rejected = run.updates("rejected")
    assert [(r["node"], r["reason"], r["base_version"]) for r in sorted(rejected, key=lambda r: r["node"])] == [
        (1, INJECTED, 0), (2, INJECTED, 0)]
    # round 1 produced no version: round 2 started from the untouched version 0 and made version 1
    assert summary["versions"] == 1 and [m["version"] for m in run.metrics()] == [0, 1]
    round2 = run.grid.train_jobs()[2:]
    assert all(j.config[wire.MODEL_VERSION] == 0 and not flower_arrays.from_record(j.message.content[wire.ARRAYS])[HEAD].any()
               for j in round2)
    np.testing.assert_allclose(run.global_model()[f"dense/{HEAD}"], 0.2, rtol=1e-5)


def _async_run_with_failed_first_step(tmp_path, monkeypatch) -> tuple[Run, list[int]]:
    # FedBuff K = 2: replies at 1 s (node 1) and 2 s (node 2) fill the buffer; that first step fails
    calls = _fail_first_aggregation(monkeypatch)
    nodes = [FakeNode(1, delay=1.0, step=0.1), FakeNode(2, delay=2.0, step=0.3)]
    run = federation(tmp_path, nodes, ASYNC, **{"buffer-size": 2})
    run.run()
    return run, calls


def test_async_aggregation_error_leaves_the_model_unchanged(tmp_path, monkeypatch):
    run, calls = _async_run_with_failed_first_step(tmp_path, monkeypatch)

    assert calls[0] == 2 and len(calls) == 4  # one failed step, then the three versions of the run
    assert [m["version"] for m in run.metrics()] == [0, 1, 2, 3]
    after = [j for j in run.grid.train_jobs() if j.at - run.grid.t0 >= 2.0]
    head = flower_arrays.from_record(after[0].message.content[wire.ARRAYS])[HEAD]
    assert after[0].config[wire.MODEL_VERSION] == 0 and not head.any()
    # the model holds exactly the accepted updates: nothing of the failed step
    np.testing.assert_allclose(run.global_model()[f"dense/{HEAD}"], expected_head(run, {1: 0.1, 2: 0.3}), rtol=1e-5)


def test_async_aggregation_error_records_the_updates_it_dropped(tmp_path, monkeypatch):
    run, _ = _async_run_with_failed_first_step(tmp_path, monkeypatch)

    rejected = run.updates("rejected")
    assert sorted((r["node"], r["reason"], r["base_version"]) for r in rejected) == [(1, INJECTED, 0), (2, INJECTED, 0)]
    assert run.fed.recorder.rejected == 2


# ---- asynchronous ---------------------------------------------------------------------------------------------
def test_async_fedbuff_buffers_two_updates_per_version_with_staleness_weights(tmp_path):
    nodes = [FakeNode(1, delay=1.0, num_examples=10, step=0.1), FakeNode(2, delay=2.0, num_examples=30, step=0.2),
             FakeNode(3, delay=3.0, num_examples=60, step=0.3)]
    run = federation(tmp_path, nodes, ASYNC, **{"concurrency": 3, "buffer-size": 2, "min-nodes": 3, **GUARD_OFF})
    summary = run.run()

    assert summary["versions"] == 3 and summary["mode"] == "async"
    versions = by_version(run.updates("accepted"))
    assert sorted(versions) == [1, 2, 3] and all(len(rows) == 2 for rows in versions.values())
    for version, rows in versions.items():
        n = np.array([r["num_examples"] for r in rows], float)
        for r, p in zip(rows, n / n.sum()):
            assert r["staleness"] == version - 1 - r["base_version"] >= 0
            assert r["weight"] == pytest.approx(p * (1 + r["staleness"]) ** -0.5)
    assert any(r["staleness"] > 0 for r in run.updates("accepted"))  # the weighting was exercised
    np.testing.assert_allclose(run.global_model()[f"dense/{HEAD}"], expected_head(run, steps_of(nodes)), rtol=1e-5)
    metrics = run.metrics()
    assert [m["version"] for m in metrics] == [0, 1, 2, 3]
    assert [m["clients"] for m in metrics[1:]] == [2, 2, 2]
    assert all("in_flight" in m and "mean_staleness" in m for m in metrics[1:])
    accs = [m["accuracy"] for m in metrics]
    assert accs[0] == 0.0 and accs == sorted(accs)
    # never more than `concurrency` jobs in flight: at most 3 pushed before the first reply at 1 s
    assert [j.at - run.grid.t0 for j in run.grid.train_jobs()][:3] == [0.0, 0.0, 0.0]
    assert all(j.at - run.grid.t0 >= 1.0 for j in run.grid.train_jobs()[3:])


def test_async_fedasync_applies_every_update_weighted_by_staleness(tmp_path):
    nodes = [FakeNode(1, delay=1.0, step=0.1), FakeNode(2, delay=2.5, step=0.2)]
    run = federation(tmp_path, nodes, ASYNC, **{"async-rule": "fedasync", "num-rounds": 6})
    summary = run.run()

    assert summary["versions"] == 6
    accepted = run.updates("accepted")
    assert [r["applied_version"] for r in accepted] == [1, 2, 3, 4, 5, 6]
    for r in accepted:
        assert r["staleness"] == r["applied_version"] - 1 - r["base_version"]
        assert r["weight"] == pytest.approx((1 + r["staleness"]) ** -0.5)
    assert {r["node"]: r["staleness"] for r in accepted if r["node"] == 2}[2] >= 1  # slow node 2 is always stale
    np.testing.assert_allclose(run.global_model()[f"dense/{HEAD}"], expected_head(run, steps_of(nodes)), rtol=1e-5)


def test_async_error_reply_frees_the_slot_and_the_node_gets_work_again(tmp_path):
    nodes = [FakeNode(1, delay=1.0, step=0.1, jobs=["error", "ok"]), FakeNode(2, delay=3.0, step=0.2)]
    run = federation(tmp_path, nodes, ASYNC, **{"async-rule": "fedasync"})
    summary = run.run()

    [failed] = run.updates("failed")
    assert failed["node"] == 1 and failed["reason"] == "node 1 replied with error 2: CUDA out of memory on node 1"
    assert summary["failed_replies"] == 1
    jobs = run.grid.train_jobs(1)
    assert len(jobs) >= 2
    # held out until it answered the profile query of the next node refresh (not a round-timeout later)
    assert queried_at(run, 1) == pytest.approx([0.0, jobs[1].at - run.grid.t0])
    assert NODE_REFRESH_S < jobs[1].at - run.grid.t0 <= NODE_REFRESH_S + 2 * POLL_S
    assert run.updates("accepted", node=1)


def test_async_silent_job_is_freed_after_round_timeout_plus_grace(tmp_path):
    nodes = [FakeNode(1, delay=1.0, step=0.1), FakeNode(2, jobs=["silent"])]
    run = federation(tmp_path, nodes, ASYNC, **{"async-rule": "fedasync", "num-rounds": 20, "round-timeout": 5.0})
    summary = run.run()

    assert summary["versions"] == 20
    failed = run.updates("failed", node=2)
    assert failed and all(f["reason"] == "node 2 did not reply within 5s" for f in failed)
    limit = 5.0 + TTL_GRACE_S
    assert limit < failed[0]["wall_s"] <= limit + 2 * POLL_S
    jobs = run.grid.train_jobs(2)
    assert len(jobs) == len(failed) + 1  # every freed slot went back to node 2; the last job was still out
    assert limit < jobs[1].at - run.grid.t0 <= limit + 2 * POLL_S
    assert {r["node"] for r in run.updates("accepted")} == {1}


def test_async_reply_to_an_unknown_job_and_a_second_reply_are_rejected(tmp_path):
    nodes = [FakeNode(1, delay=1.0, step=0.1, jobs=["stray", "ok"]), FakeNode(2, delay=1.5, step=0.2, jobs=["twice", "ok"])]
    run = federation(tmp_path, nodes, ASYNC, **{"async-rule": "fedasync", "num-rounds": 4})
    summary = run.run()

    rejected = {r["node"]: r["reason"] for r in run.updates("rejected")}
    assert rejected == {1: "node 1: a reply to an unknown job; it is dropped",
                        2: "node 2: a second reply to one job; it is dropped"}
    assert summary["rejected_updates"] == 2 and summary["versions"] == 4
    # the genuine first replies were applied, the echoes (node 2's with 10 × its step) were not
    assert run.updates("accepted", node=1)[0]["base_version"] == 0
    assert run.updates("accepted", node=2)[0]["base_version"] == 0
    np.testing.assert_allclose(run.global_model()[f"dense/{HEAD}"], expected_head(run, steps_of(nodes)), rtol=1e-5)


def test_async_node_joining_mid_run_receives_work(tmp_path):
    nodes = [FakeNode(1, delay=2.0), FakeNode(2, delay=2.0), FakeNode(3, delay=2.0, joins_at=3.0)]
    run = federation(tmp_path, nodes, ASYNC, **{"async-rule": "fedasync", "concurrency": 3, "num-rounds": 12})
    run.run()

    rows = run.node_rows()
    # profiled at the first node refresh after it appeared
    assert rows[3]["status"] == "ok" and NODE_REFRESH_S < rows[3]["wall_s"] <= NODE_REFRESH_S + 2 * POLL_S
    jobs = run.grid.train_jobs(3)
    assert jobs and jobs[0].at - run.grid.t0 == pytest.approx(rows[3]["wall_s"])
    assert run.updates("accepted", node=3)


def test_async_node_that_leaves_is_not_sent_work_and_its_last_job_fails(tmp_path):
    nodes = [FakeNode(1, delay=1.0), FakeNode(2, delay=1.0, leaves_at=2.5)]
    run = federation(tmp_path, nodes, ASYNC, **{"async-rule": "fedasync", "num-rounds": 25, "round-timeout": 5.0})
    run.run()

    jobs = run.grid.train_jobs(2)
    assert jobs[-1].at - run.grid.t0 < 2.5  # nothing after it left
    assert [(r["node"], r["reason"]) for r in run.updates("failed")] == [(2, "node 2 did not reply within 5s")]
    assert len(run.updates("accepted", node=2)) == len(jobs) - 1


# ---- a node whose trainer is down while its SuperNode lives: no work until a profile query answers --------------
#: node 3's trainer dies during its second job (pushed at 1 s, due at 2 s) and is back at 12 s
DOWN = (1.5, 12.0)


def queried_at(run: Run, node_id: int) -> list[float]:
    """When the node's profile queries were pushed (fake seconds after the grid was built)."""
    return [p.at - run.grid.t0 for p in run.grid.pushed
            if p.node_id == node_id and p.message.metadata.message_type == MessageType.QUERY]


def test_sync_node_whose_trainer_died_gets_no_work_until_its_profile_answers_again(tmp_path):
    nodes = [FakeNode(1, delay=1.0), FakeNode(2, delay=1.0), FakeNode(3, delay=1.0, trainer_down=DOWN)]
    run = federation(tmp_path, nodes, SYNC, **{"num-rounds": 16})
    summary = run.run()

    assert summary["versions"] == 16 and summary["failed_replies"] == 1
    [failed] = run.updates("failed")
    assert failed["node"] == 3 and failed["reason"] == f"node 3 replied with error 2: {TRAINER_DOWN.format(port=9003)}"
    # asked at once after the failure (2 s, still down), then every NODE_REFRESH_S until it answered (12 s)
    assert queried_at(run, 3) == [0.0, 2.0, 2.0 + NODE_REFRESH_S, 12.0]
    assert [j.at - run.grid.t0 for j in run.grid.train_jobs(3)] == [0.0, 1.0, 12.0, 13.0, 14.0, 15.0]
    rows = [r for r in read_jsonl(run.dir / "nodes.jsonl") if r["node"] == 3]
    assert [(r["status"], r["wall_s"]) for r in rows] == [("ok", 0.0), ("unavailable", 2.0), ("ok", 12.0)]
    assert rows[1]["reason"] == failed["reason"]
    candidates = [s["candidates"] for s in read_jsonl(run.dir / "selection.jsonl")]
    assert candidates == [3, 3] + [2] * 10 + [3] * 4
    assert [r["applied_version"] for r in run.updates("accepted", node=3)] == [1, 13, 14, 15, 16]


def test_async_node_whose_trainer_died_is_asked_at_every_node_refresh_and_gets_work_when_back(tmp_path):
    nodes = [FakeNode(1, delay=1.0), FakeNode(2, delay=1.0), FakeNode(3, delay=1.0, trainer_down=DOWN)]
    run = federation(tmp_path, nodes, ASYNC, **{"async-rule": "fedasync", "concurrency": 3, "num-rounds": 40})
    run.run()

    [failed] = run.updates("failed")
    assert failed["node"] == 3 and failed["reason"] == f"node 3 replied with error 2: {TRAINER_DOWN.format(port=9003)}"
    probes = queried_at(run, 3)
    assert probes[0] == 0.0 and len(probes) == 4 and probes[-1] >= DOWN[1]
    assert all(NODE_REFRESH_S < b - a <= NODE_REFRESH_S + 2 * POLL_S for a, b in zip(probes[1:], probes[2:]))
    jobs = [j.at - run.grid.t0 for j in run.grid.train_jobs(3)]
    assert jobs[:2] == pytest.approx([0.0, 1.0], abs=2 * POLL_S)
    assert jobs[2] == probes[-1] and len(jobs) >= 4  # work again as soon as its profile answered
    assert len(run.updates("accepted", node=3)) >= 3


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_error_the_superlink_writes_for_a_node_gone_offline_is_recorded_against_that_node(tmp_path, mode):
    # Flower signs it as node 1 (SUPERLINK_NODE_ID): it is the job's node that failed, not an unknown node 1
    nodes = [FakeNode(2, delay=1.0), FakeNode(3, delay=1.0, jobs=["ok", "gone", "ok"])]
    keys = {"num-rounds": 4} if mode == "sync" else {"async-rule": "fedasync", "num-rounds": 8}
    run = federation(tmp_path, nodes, SYNC if mode == "sync" else ASYNC, **keys)
    run.run()

    assert run.updates("rejected") == []
    assert [(r["node"], r["reason"]) for r in run.updates("failed")] == [(3, f"node 3 replied with error 5: {NODE_GONE}")]
    assert [(r["node"], r["status"]) for r in read_jsonl(run.dir / "nodes.jsonl")][2:] == [(3, "unavailable"), (3, "ok")]
    [failed] = run.updates("failed")
    assert any(r["wall_s"] > failed["wall_s"] for r in run.updates("accepted", node=3))  # work again once re-profiled


@pytest.mark.parametrize("back_at", [12.0, math.inf], ids=["back", "never-back"])
def test_sync_round_without_a_usable_node_waits_for_one_at_most_round_timeout_instead_of_spinning(tmp_path, back_at):
    nodes = [FakeNode(1, delay=1.0, trainer_down=(1.5, back_at))]
    run = federation(tmp_path, nodes, SYNC, **{"min-nodes": 1, "num-rounds": 3})
    summary = run.run()

    jobs = [j.at - run.grid.t0 for j in run.grid.train_jobs(1)]
    selections = read_jsonl(run.dir / "selection.jsonl")
    if back_at == 12.0:  # round 3 waited for the re-probes at 2 and 7 s (down) and 12 s (back), then trained
        assert jobs[:2] == [0.0, 1.0] and jobs[2] == pytest.approx(12.0, abs=0.2 + 1e-9)
        assert summary["versions"] == 2 and [s["picked"] for s in selections] == [[1], [1], [1]]
    else:  # round 3 gave up after round-timeout (30 s): no version, and no round spun through without waiting
        assert jobs == [0.0, 1.0] and summary["versions"] == 1
        assert len(selections) == 2 and 32.0 <= run.grid.elapsed() <= 32.0 + 0.2 + 1e-9


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_node_whose_profile_fails_is_unavailable_never_sent_work_and_asked_at_every_node_refresh(tmp_path, mode):
    nodes = [FakeNode(1, delay=1.0), FakeNode(2, delay=1.0), FakeNode(3, query="error")]
    keys = {"num-rounds": 12} if mode == "sync" else {"async-rule": "fedasync", "num-rounds": 24}
    run = federation(tmp_path, nodes, SYNC if mode == "sync" else ASYNC, **keys)
    run.run()

    rows = [r for r in read_jsonl(run.dir / "nodes.jsonl") if r["node"] == 3]
    assert [(r["status"], r["reason"]) for r in rows] == [
        ("unavailable", "profile failed: the trainer of node 3 is unreachable")]  # recorded once, not per query
    assert run.grid.train_jobs(3) == [] and run.updates(node=3) == []
    probes = queried_at(run, 3)
    assert len(probes) == 3 and all(NODE_REFRESH_S <= b - a <= NODE_REFRESH_S + 2 * POLL_S
                                    for a, b in zip(probes, probes[1:]))


def test_min_nodes_reached_once_a_trainer_started_after_its_supernode_answers(tmp_path):
    nodes = [FakeNode(1), FakeNode(2), FakeNode(3, trainer_down=(0.0, 7.0))]
    run = federation(tmp_path, nodes, SYNC, **{"min-nodes": 3, "num-rounds": 1})
    run.run()

    assert queried_at(run, 3) == pytest.approx([0.0, NODE_REFRESH_S, 2 * NODE_REFRESH_S], abs=0.2 + 1e-9)
    assert [j.at - run.grid.t0 for j in run.grid.train_jobs()] == pytest.approx([queried_at(run, 3)[-1]] * 3)
    assert sorted(r["node"] for r in run.updates("accepted")) == [1, 2, 3]


def test_async_time_budget_ends_the_run(tmp_path):
    nodes = [FakeNode(1, delay=1.0), FakeNode(2, delay=1.0)]
    run = federation(tmp_path, nodes, ASYNC, **{"async-rule": "fedasync", "num-rounds": 100, "time-budget": 4.0})
    summary = run.run()

    assert 4 <= summary["versions"] <= 8  # two updates a second, for four seconds
    metrics = run.metrics()
    assert metrics[-1]["version"] == summary["versions"]  # the last version is evaluated
    assert 4.0 < run.grid.elapsed() <= 4.0 + 2 * POLL_S
    assert math.isclose(summary["final_accuracy"], metrics[-1]["accuracy"])


def test_async_max_staleness_drops_stale_replies_on_arrival(tmp_path):
    # node 2 takes 2.5 s while node 1 makes a version every ~1 s: its replies arrive 2 versions stale
    nodes = [FakeNode(1, delay=1.0, step=0.1), FakeNode(2, delay=2.5, step=0.7)]
    run = federation(tmp_path, nodes, ASYNC, **{"async-rule": "fedasync", "max-staleness": 0, "num-rounds": 4})
    summary = run.run()

    rejected = run.updates("rejected")
    assert rejected and {r["node"] for r in rejected} == {2}
    assert all(r["reason"].startswith("node 2: update is ") and r["reason"].endswith(
        " versions stale, above max-staleness 0; it is dropped.") for r in rejected)
    accepted = run.updates("accepted")
    assert summary["versions"] == 4 and {r["node"] for r in accepted} == {1}
    assert all(r["staleness"] == 0 and r["weight"] == 1.0 for r in accepted)
    np.testing.assert_allclose(run.global_model()[f"dense/{HEAD}"], 0.4, rtol=1e-5)


def test_async_update_that_grows_too_stale_while_buffered_is_dropped(tmp_path):
    # three replies land together at 1 s; FedBuff (K = 2) makes version 1 of the first two, and the third,
    # admitted at τ = 0, is one version too old for max-staleness 0 before the next step
    nodes = [FakeNode(1, delay=1.0), FakeNode(2, delay=1.0), FakeNode(3, delay=1.0)]
    run = federation(tmp_path, nodes, ASYNC, **{"concurrency": 3, "buffer-size": 2, "max-staleness": 0,
                                                "num-rounds": 2, "min-nodes": 3})
    summary = run.run()

    [dropped] = run.updates("rejected")
    nid = dropped["node"]
    assert dropped["reason"] == (f"node {nid}: update became 1 versions stale while buffered, above max-staleness 0; "
                                 "it is dropped.")
    assert dropped["base_version"] == 0 and dropped["applied_version"] is None
    first = [r for r in run.updates("accepted") if r["applied_version"] == 1]
    assert sorted([*(r["node"] for r in first), nid]) == [1, 2, 3]
    assert summary["versions"] == 2 and all(r["staleness"] == 0 for r in run.updates("accepted"))


def test_async_fedfix_aggregates_on_its_interval_with_unbiased_weights(tmp_path):
    # Δt = 2 s; node 1 (10 examples) takes 1 s, node 2 (30 examples) 3 s:
    # d_i = p_i ⌈τ_i / Δt⌉ = 0.25 · 1 and 0.75 · 2 (the paper's weights, unnormalised)
    nodes = [FakeNode(1, delay=1.0, num_examples=10, step=0.1), FakeNode(2, delay=3.0, num_examples=30, step=0.2)]
    run = federation(tmp_path, nodes, ASYNC, **{"async-rule": "fedfix", "interval": 2.0, "num-rounds": 4,
                                                "fedfix-weighting": "paper", **GUARD_OFF})
    summary = run.run()

    assert summary["versions"] == 4
    versions = by_version(run.updates("accepted"))
    for rows in versions.values():
        assert len({r["node"] for r in rows}) == len(rows)  # nobody counts twice in one interval
        for r in rows:
            assert r["weight"] == pytest.approx({1: 0.25, 2: 1.5}[r["node"]])
    # versions appear at the interval boundaries, and node 1 restarts only there
    for m in run.metrics()[1:]:
        assert m["wall_s"] / 2.0 - round(m["wall_s"] / 2.0) == pytest.approx(0.0, abs=POLL_S)
    for j in run.grid.train_jobs(1)[1:]:
        t = j.at - run.grid.t0
        assert 0 <= t - 2.0 * math.floor(t / 2.0 + 1e-9) <= 2 * POLL_S + 1e-9
    np.testing.assert_allclose(run.global_model()[f"dense/{HEAD}"], expected_head(run, steps_of(nodes)), rtol=1e-5)


# ---- bugs these fakes found (fixed: non-blocking profiles, min-nodes after rank refusals, one node key) -----
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_node_that_never_answers_its_profile_does_not_stall_training(tmp_path, mode):
    nodes = [FakeNode(1, delay=1.0), FakeNode(2, delay=1.0), FakeNode(3, query="silent")]
    keys = {"num-rounds": 4} if mode == "sync" else {"async-rule": "fedasync", "num-rounds": 20}
    run = federation(tmp_path, nodes, SYNC if mode == "sync" else ASYNC, **keys)
    run.run()

    assert run.grid.train_jobs(3) == []
    pushes = sorted({j.at for j in run.grid.train_jobs()})
    assert max(np.diff(pushes)) < 2.0  # jobs keep flowing every ~1 s: no 30 s wait on node 3 between them


def test_start_never_trains_with_fewer_than_min_nodes_after_rank_refusals(tmp_path):
    nodes = [FakeNode(1, rank=2), FakeNode(2, rank=2), FakeNode(3, rank=4)]
    run = federation(tmp_path, nodes, SYNC, **{"min-nodes": 3, "aggregation": "fedavg", "num-rounds": 1})

    with pytest.raises(TimeoutError, match="min-nodes"):
        run.run()


def test_nodes_jsonl_names_every_node_under_one_key(tmp_path):
    nodes = [FakeNode(1), FakeNode(2), FakeNode(3, fingerprint="another-model")]
    run = federation(tmp_path, nodes, SYNC, **{"num-rounds": 1})
    run.run()

    rows = read_jsonl(run.dir / "nodes.jsonl")
    assert [r["status"] for r in rows] == ["ok", "ok", "refused"]
    assert len({frozenset(k for k in ("node", "node_id") if k in r) for r in rows}) == 1


# ---- lying silos (tests/fakes.py LyingNode/LyingGrid): every lie rejected or bounded, with its reason ----------------
from tests.fakes import EXTRA_TENSOR, LIE_EXAMPLES, LyingGrid, LyingNode  # noqa: E402


def lying_federation(tmp_path: Path, nodes: list[FakeNode], base: dict, **keys) -> Run:
    """`federation` on a LyingGrid (LyingNodes corrupt their otherwise honest train replies)."""
    clock = FakeClock()
    cfg = RunConfig.from_mapping({"out-dir": str(tmp_path / "run"), **base, **keys})
    grid = LyingGrid(nodes, clock)
    evaluator = FakeEvaluator()
    return Run(Federation(cfg, grid, evaluator, clock=clock), grid, clock, evaluator)


def guarded_head(run: Run, steps: dict[int, float]) -> float:
    """Σ over accepted updates of weight × step × clip factor: every array of an update moves by step, scaled if clipped."""
    return sum(r["weight"] * steps[r["node"]] * (r["clipped"] or 1.0) for r in run.updates("accepted"))


def delta_w_norm(run: Run) -> float:
    return delta_norm({k: v for k, v in run.global_model().items() if k.startswith("delta/")})


def factor_distance(run: Run) -> float:
    """‖x − x₀‖ over every array a FedAvg run trains (A, B, head; rank 2, the fake's seed-0 start): the norm clipping bounds."""
    init = FakeEvaluator().initial_adapter(2, LoraSpec(), 0)
    state = run.fed.aggregator.state()
    return math.sqrt(sum(float(np.sum((state[k] - init[k]) ** 2)) for k in init))


def test_sync_reply_claiming_more_examples_than_declared_is_capped_to_the_declaration(tmp_path):
    nodes = [FakeNode(1, num_examples=10, step=0.1), FakeNode(2, num_examples=30, step=0.2),
             LyingNode(3, num_examples=60, step=0.3, lies=["examples"])]
    run = lying_federation(tmp_path, nodes, SYNC, **{"min-nodes": 3})
    summary = run.run()

    assert summary["versions"] == 3 and summary["rejected_updates"] == 0
    for rows in by_version(run.updates("accepted")).values():
        assert {r["node"]: r["weight"] for r in rows} == pytest.approx({1: 0.1, 2: 0.3, 3: 0.6})  # 60 of 100, not ≈ 1
        assert {r["node"]: r["examples_capped"] for r in rows} == {1: None, 2: None, 3: LIE_EXAMPLES}
        assert {r["node"]: r["num_examples"] for r in rows} == {1: 10, 2: 30, 3: 60}
    np.testing.assert_allclose(run.global_model()[f"dense/{HEAD}"], 3 * (0.01 + 0.06 + 0.18), rtol=1e-5)


def test_sync_factors_scaled_ten_thousand_times_are_clipped_to_four_times_the_median(tmp_path):
    def run_with(lie: str, **keys) -> Run:
        nodes = [FakeNode(1, step=0.1), FakeNode(2, step=0.1), LyingNode(3, step=0.1, lies=[lie])]
        run = lying_federation(tmp_path / f"{lie}{len(keys)}", nodes, SYNC, **{"min-nodes": 3, **SCALE_LR, **keys})
        run.run()
        return run

    honest, guarded, unguarded = run_with("none"), run_with("scale"), run_with("scale", **{"max-update-norm": -1})
    rows = guarded.updates("accepted")
    assert len(rows) == 9 and all(r["clipped"] is None for r in rows if r["node"] != 3)
    for r in (r for r in rows if r["node"] == 3):
        honest_norm = next(x["update_norm"] for x in rows if x["node"] == 1 and x["applied_version"] == r["applied_version"])
        assert r["norm_bound"] == pytest.approx(4 * honest_norm, rel=1e-6)  # the lower median is an honest norm
        assert r["clipped"] < 1e-3 and r["update_norm"] * r["clipped"] == pytest.approx(r["norm_bound"], rel=1e-5)
    np.testing.assert_allclose(guarded.global_model()[f"dense/{HEAD}"], guarded_head(guarded, {1: 0.1, 2: 0.1, 3: 0.1}),
                               rtol=1e-5)
    # each round moves the factors by at most Σ w_i min(‖Δ_i‖, 4h) = (h + h + 4h)/3 = 2h, and the honest run (aligned
    # steps) by exactly h: the guarded factors are at most twice as far from the start; unguarded ΔW grows 10⁶-fold
    assert factor_distance(guarded) <= 2 * factor_distance(honest) * (1 + 1e-5)
    assert delta_w_norm(guarded) < 10 * delta_w_norm(honest)
    assert delta_w_norm(unguarded) > 1e6 * delta_w_norm(honest)


@pytest.mark.parametrize("lie,reason", [
    ("loss-nan", "node 2: absurd telemetry (`loss-mean` = nan is not a finite number >= 0); no trainer reports this, so "
                 "the reply is not trusted and is rejected"),
    ("loss-negative", "node 2: absurd telemetry (`loss-mean` = -1.0 is not a finite number >= 0); no trainer reports "
                      "this, so the reply is not trusted and is rejected"),
    ("duration-negative", "node 2: absurd telemetry (`duration-s` = -3.0 is not a finite number >= 0); no trainer "
                          "reports this, so the reply is not trusted and is rejected"),
    ("variance", "node 2: absurd telemetry (`loss-sq-mean` = 1.0 < `loss-mean`² = 4.0 (a negative variance)); no "
                 "trainer reports this, so the reply is not trusted and is rejected"),
    ("examples-nan", "node 2: `num-examples` = nan is not an integer; the reply is rejected"),
    ("examples-fraction", "node 2: `num-examples` = 2.5 is not an integer; the reply is rejected"),
    ("extra", f"node 2: update keys differ from what it was sent (missing [], unexpected ['{EXTRA_TENSOR}']); the "
              "update is rejected."),
])
def test_sync_absurd_replies_are_rejected_with_the_reason_and_reach_no_weight(tmp_path, lie, reason):
    nodes = [FakeNode(1, step=0.1), LyingNode(2, step=0.5, lies=[lie])]
    run = lying_federation(tmp_path, nodes, SYNC)
    summary = run.run()

    assert summary["versions"] == 3
    assert [(r["node"], r["reason"]) for r in run.updates("rejected")] == [(2, reason)] * 3
    assert [(r["node"], r["weight"]) for r in run.updates("accepted")] == [(1, 1.0)] * 3
    assert run.fed.nodes[2].telemetry == {}  # nothing of the lying reply reached the selector either
    np.testing.assert_allclose(run.global_model()[f"dense/{HEAD}"], 0.3, rtol=1e-5)


def test_sync_node_that_declared_a_huge_silo_at_join_gets_at_most_half_of_a_step(tmp_path):
    # it declares 10^9 examples when it joins (so its replies' count is not capped): FedAvg would give it ≈ 1;
    # with four updates the share bound is 1/2, and the other half goes to the others in proportion (1/6 each)
    nodes = [FakeNode(1, step=0.1), FakeNode(2, step=0.2), FakeNode(3, step=0.3),
             FakeNode(4, num_examples=10**9, step=0.4)]
    run = lying_federation(tmp_path, nodes, SYNC, **{"min-nodes": 4, "clients-per-round": 4, "num-rounds": 2})
    run.run()

    for rows in by_version(run.updates("accepted")).values():
        assert {r["node"]: r["weight"] for r in rows} == pytest.approx({1: 1 / 6, 2: 1 / 6, 3: 1 / 6, 4: 0.5})
        assert {r["node"]: r["weight_capped_from"] for r in rows} == {1: pytest.approx(1e-8), 2: pytest.approx(1e-8),
                                                                     3: pytest.approx(1e-8), 4: pytest.approx(1.0)}
    np.testing.assert_allclose(run.global_model()[f"dense/{HEAD}"], 2 * (0.6 / 6 + 0.2), rtol=1e-5)
    assert run.fed.aggregator.guard.summary() == {"max_weight_share": "auto", "max_update_norm": "adaptive (4 × median)"}


def test_async_fedbuff_caps_lied_counts_and_clips_scaled_factors(tmp_path):
    nodes = [FakeNode(1, delay=1.0, step=0.1), FakeNode(2, delay=1.5, step=0.2),
             LyingNode(3, delay=2.0, step=0.1, lies=["scale", "examples"] * 4)]
    run = lying_federation(tmp_path, nodes, ASYNC, **{"concurrency": 3, "buffer-size": 3, "min-nodes": 3, **SCALE_LR,
                                                      "num-rounds": 4})
    summary = run.run()

    assert summary["versions"] == 4 and summary["rejected_updates"] == 0
    liar = run.updates("accepted", node=3)
    assert [r["job"] for r in liar] and {r["examples_capped"] for r in liar[1::2]} == {LIE_EXAMPLES}
    assert all(r["clipped"] is not None and r["clipped"] < 1e-3 for r in liar[0::2])
    assert all(r["clipped"] is None for r in run.updates("accepted") if r["node"] != 3)
    np.testing.assert_allclose(run.global_model()[f"dense/{HEAD}"], guarded_head(run, steps_of(nodes)), rtol=1e-5)


def test_fedmedian_through_the_driver_ignores_a_scaling_liar_even_without_clipping(tmp_path):
    nodes = [FakeNode(1, step=0.1), FakeNode(2, step=0.2), LyingNode(3, step=0.3, lies=["scale"])]
    run = lying_federation(tmp_path, nodes, SYNC, **{"min-nodes": 3, "aggregation": "fedmedian", "lora-rank": 2, **SCALE_LR,
                                                     "max-update-norm": -1})
    summary = run.run()

    assert summary["versions"] == 3 and run.evaluator.initial_ranks == [2]  # built at the nodes' one rank, like FedAvg
    assert all(r["weight"] == pytest.approx(1 / 3) and r["clipped"] is None for r in run.updates("accepted"))
    model = run.global_model()
    np.testing.assert_allclose(model[f"dense/{HEAD}"], 3 * 0.2, rtol=1e-5)  # the median of the heads' 0.1, 0.2, 0.3
    init = FakeEvaluator().initial_adapter(2, LoraSpec(), 0)
    agg = run.fed.aggregator
    for layer, (a, b) in agg.factors.items():  # every factor coordinate moved by 0.1–0.2 per round, never 10⁴×
        moved = np.concatenate([(a - init[f"{layer}.lora_A.weight"][:2]).ravel(), b.ravel()])
        assert agg.rank == 2 and np.all(moved > 3 * 0.1 - 1e-5) and np.all(moved < 3 * 0.2 + 1e-5)


def test_sync_rounds_record_host_seconds_per_phase_charged_to_the_phase_that_spent_them(tmp_path, monkeypatch):
    import time

    nodes = [FakeNode(i, num_examples=10, step=0.1) for i in (1, 2, 3)]
    run = federation(tmp_path, nodes, SYNC, **{"min-nodes": 3, "clients-per-round": 2})
    from corolla.strategies.base import Aggregator

    selector = type(run.fed.selector)  # patched on the classes: the checkpoint pickles both objects
    select, aggregate = selector.select, Aggregator.aggregate

    def slow_select(self, *args, **kwargs):
        time.sleep(0.05)
        return select(self, *args, **kwargs)

    def slow_aggregate(self, *args, **kwargs):
        time.sleep(0.03)
        return aggregate(self, *args, **kwargs)

    monkeypatch.setattr(selector, "select", slow_select)
    monkeypatch.setattr(Aggregator, "aggregate", slow_aggregate)
    run.run()

    rows = read_jsonl(run.dir / "rounds.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3] and [r["version"] for r in rows] == [1, 2, 3]
    phases = ("select_s", "dispatch_s", "exchange_s", "validate_s", "aggregate_s", "record_s", "evaluate_s",
              "checkpoint_s")
    for r in rows:
        assert r["registered"] == 3 and r["usable"] == 3 and r["updates"] == 2
        assert all(r[k] >= 0 for k in phases)
        assert 0.05 <= r["select_s"] < 0.5 and 0.03 <= r["aggregate_s"] < 0.5  # the sleeps land where they were spent
        assert r["exchange_s"] < 0.03 and r["dispatch_s"] < 0.03  # the fake grid answers at once


def test_sync_round_without_updates_still_records_its_timing(tmp_path):
    nodes = [FakeNode(1, jobs=["nan"]), FakeNode(2, jobs=["nan"])]
    run = federation(tmp_path, nodes, SYNC, **{"num-rounds": 1})
    run.run()
    (row,) = read_jsonl(run.dir / "rounds.jsonl")
    assert len(run.updates("rejected")) == 2
    assert row["round"] == 1 and row["version"] == 0
    assert "exchange_s" in row and "validate_s" in row and "aggregate_s" not in row


def test_an_aggregation_gpu_the_server_lacks_stops_before_any_node_is_asked(tmp_path, monkeypatch):
    import torch

    from corolla.config import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    grid = FakeGrid([FakeNode(1), FakeNode(2)], FakeClock())
    cfg = RunConfig.from_mapping({"out-dir": str(tmp_path / "run"), **SYNC, "aggregation": "fedhl",
                                  "aggregation-device": "cuda"})
    with pytest.raises(ConfigError, match=r"`aggregation-device` = 'cuda', but this server has no CUDA GPU"):
        Federation(cfg, grid, FakeEvaluator(), clock=FakeClock())
    assert grid.queried() == [] and not (tmp_path / "run" / "config.json").exists()


def test_async_versions_record_host_seconds_per_phase_one_row_per_version(tmp_path, monkeypatch):
    import time

    from corolla.strategies.base import Aggregator

    nodes = [FakeNode(i, num_examples=10, step=0.1, delay=1.0 + i) for i in (1, 2, 3)]
    run = federation(tmp_path, nodes, ASYNC, **{"min-nodes": 3})
    step = Aggregator.step

    def slow_step(self, *args, **kwargs):
        time.sleep(0.03)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Aggregator, "step", slow_step)
    run.run()

    rows = read_jsonl(run.dir / "rounds.jsonl")
    assert [r["version"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["registered"] == 3 and r["updates"] >= 1 and 0 <= r["in_flight"] <= 2
        assert 0.03 <= r["aggregate_s"] < 0.5  # the sleep lands where it was spent
        assert all(r.get(k, 0.0) < 0.03 for k in ("select_s", "dispatch_s", "validate_s", "record_s", "wait_s"))
        assert r["checkpoint_s"] >= 0
