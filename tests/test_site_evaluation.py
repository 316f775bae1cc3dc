"""Federated evaluation on fakes: sites evaluate the global model, the server keeps each site's numbers.

Every path runs on the fake Grid and clock (tests/fakes.py): per-site rows against
hand-computed means, worst site, spread and Jain's index; lying or silent sites;
the asynchronous driver collecting evaluations while clients train; the best version
kept in best.npz.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import MessageType

from corolla.config import ConfigError, RunConfig
from corolla.proto import wire
from corolla.server.evaluation import merged_from_npz
from corolla.server.records import read_jsonl
from corolla.server.site_eval import SiteEval, jain_index, site_summary
from tests.fakes import LIE_EXAMPLES, FakeNode, accuracy_of, delta_norm
from tests.test_drivers import ASYNC, SYNC, federation, no_plots, task_identity  # noqa: F401 (autouse fixtures)

SITES = {"evaluation": "sites"}


def _nodes(skills=(1.0, 0.5, 0.8), examples=(5, 20, 10), **kw) -> list[FakeNode]:
    return [FakeNode(i + 1, skill=s, eval_examples=n, num_examples=50, **kw) for i, (s, n) in
            enumerate(zip(skills, examples))]


# ---- the summary of one version, by hand -------------------------------------------------------
def test_site_summary_matches_hand_computed_numbers():
    results = [SiteEval(1, 0.9, 0.2, 10, 10), SiteEval(2, 0.5, 0.9, 30, 30), SiteEval(3, 0.7, 0.4, 60, 20)]
    row = site_summary(results)
    assert row["site_accuracy"] == pytest.approx((0.9 * 10 + 0.5 * 30 + 0.7 * 20) / 60)
    assert row["site_loss"] == pytest.approx((0.2 * 10 + 0.9 * 30 + 0.4 * 20) / 60)
    assert (row["site_worst_accuracy"], row["site_worst_node"], row["site_best_accuracy"]) == (0.5, 2, 0.9)
    assert row["site_spread"] == pytest.approx(0.4)
    assert row["site_std"] == pytest.approx(np.std([0.9, 0.5, 0.7]))
    assert row["site_jain"] == pytest.approx(2.1**2 / (3 * (0.81 + 0.25 + 0.49)))
    assert row["sites"]["3"] == {"accuracy": 0.7, "loss": 0.4, "examples": 60, "weight": 20}
    assert site_summary([]) == {}


def test_jain_index_bounds():
    assert jain_index([0.7, 0.7, 0.7]) == pytest.approx(1.0)
    assert jain_index([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)
    assert jain_index([0.0, 0.0]) == 1.0


# ---- the configuration --------------------------------------------------------------------------
def test_own_labels_without_test_data_evaluate_on_the_sites():
    cfg = RunConfig(labels="neg,pos")
    assert (cfg.resolved_evaluation(), cfg.evaluates_on_server(), cfg.evaluates_on_sites()) == ("sites", False, True)
    assert RunConfig().resolved_evaluation() == "server"  # the built-in corpus has a test split
    assert RunConfig(labels="neg,pos", test_data="t.csv").resolved_evaluation() == "server"


@pytest.mark.parametrize("keys, words", [
    ({"labels": "a,b", "evaluation": "server"}, "set `test-data`"),
    ({"labels": "a,b", "evaluation": "sites", "test-data": "t.csv"}, "drop test-data or use evaluation=both"),
    ({"evaluation": "sites", "eval-fraction": 1.0}, "hold out the whole silo"),
    ({"evaluation": "server", "eval-fraction": 0.2}, "sites evaluate only with evaluation=sites or both"),
])
def test_evaluation_settings_that_cannot_work_are_refused(keys, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        RunConfig.from_mapping(keys)


# ---- synchronous runs ---------------------------------------------------------------------------
def test_sites_evaluate_every_version_and_the_server_never_does(tmp_path):
    run = federation(tmp_path, _nodes(), SYNC, **SITES)
    summary = run.run()
    assert run.evaluator.evaluated == []  # the coordinator never evaluated a model
    rows = run.metrics()
    assert [r["version"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        per = r["sites"]
        assert set(per) == {"1", "2", "3"}
        counts = {k: v["examples"] for k, v in per.items()}
        mean = sum(v["accuracy"] * counts[k] for k, v in per.items()) / sum(counts.values())
        assert r["accuracy"] == pytest.approx(mean) == pytest.approx(r["site_accuracy"])
        assert r["site_worst_node"] == (2 if r["version"] else 1)  # the least skilled site (at version 0: a tie)
        assert r["site_worst_accuracy"] == pytest.approx(per["2"]["accuracy"])
        assert per["1"]["accuracy"] == pytest.approx(per["2"]["accuracy"] * 2)
    assert rows[0]["site_accuracy"] == 0.0 and rows[-1]["site_accuracy"] > 0  # the base model, then it learns
    assert summary["final_site_accuracy"] == rows[-1]["site_accuracy"]
    assert summary["final_worst_site"] == 2 and summary["evaluation"] == "sites"
    # training holds the same share out that evaluation reads
    assert {p.config[wire.EVAL_FRACTION] for p in run.grid.train_jobs()} == {0.1}
    assert {p.config[wire.EVAL_FRACTION] for p in run.grid.evaluations()} == {0.1}


def test_site_accuracy_is_of_the_global_model_the_server_holds(tmp_path):
    """An honest site's accuracy is a function of the exact model it was sent: check it against global.npz."""
    run = federation(tmp_path, _nodes(skills=(1.0, 1.0, 1.0)), SYNC, **SITES)
    run.run()
    with np.load(run.dir / "global.npz") as z:
        merged = merged_from_npz(dict(z))
    last = run.metrics()[-1]
    assert last["site_accuracy"] == pytest.approx(accuracy_of(delta_norm(merged.deltas)), rel=1e-5)


def test_server_evaluation_sends_no_evaluate_message_and_holds_nothing_out(tmp_path):
    run = federation(tmp_path, _nodes(), SYNC)
    run.run()
    assert run.grid.evaluations() == []
    assert {p.config[wire.EVAL_FRACTION] for p in run.grid.train_jobs()} == {0.0}
    assert all("sites" not in r for r in run.metrics())


def test_both_keeps_the_server_accuracy_primary_and_adds_the_sites(tmp_path):
    run = federation(tmp_path, _nodes(), SYNC, evaluation="both")
    run.run()
    rows = run.metrics()
    assert len(run.evaluator.evaluated) == len(rows)
    last = rows[-1]
    assert last["accuracy"] == pytest.approx(accuracy_of(delta_norm(run.evaluator.evaluated[-1].deltas)))
    assert last["site_accuracy"] != last["accuracy"]  # skills < 1 on two sites


def test_eval_sites_asks_a_seeded_sample(tmp_path):
    run = federation(tmp_path, _nodes(skills=(1, 1, 1, 1, 1), examples=(5,) * 5), SYNC, **{"eval-sites": 2}, **SITES)
    run.run()
    per_version = [len(r["sites"]) for r in run.metrics()]
    assert per_version == [2, 2, 2, 2]
    asked = {p.node_id for p in run.grid.evaluations()}
    assert len(asked) > 2  # drawn afresh per version


# ---- sites that lie, fail or stay silent --------------------------------------------------------
@pytest.mark.parametrize("lie, words", [
    ("accuracy", "accuracy 1.5 is outside [0, 1]"),
    ("loss-nan", "`loss` = nan is not a finite number"),
    ("fingerprint", "evaluated base model another-model"),
    ("version", "evaluation is of version"),
    ("error", "evaluation failed on node 3"),
])
def test_a_lying_or_failing_site_is_left_out_with_the_reason(tmp_path, lie, words):
    nodes = _nodes()
    nodes[2].evals = (lie,)
    run = federation(tmp_path, nodes, SYNC, **SITES)
    summary = run.run()
    for r in run.metrics():
        assert set(r["sites"]) == {"1", "2"}
        assert words in r["site_failures"]["3"]
    assert summary["versions"] == 3  # the run went on


def test_a_site_claiming_a_billion_rows_counts_as_its_declared_silo(tmp_path):
    nodes = _nodes(skills=(1.0, 0.2, 0.2), examples=(5, 5, 5))
    nodes[0].evals = ("examples",)
    run = federation(tmp_path, nodes, SYNC, **SITES)
    run.run()
    last = run.metrics()[-1]
    per = last["sites"]
    assert per["1"]["examples"] == LIE_EXAMPLES and per["1"]["weight"] == 50  # capped at its declaration
    expected = (per["1"]["accuracy"] * 50 + per["2"]["accuracy"] * 5 + per["3"]["accuracy"] * 5) / 60
    assert last["site_accuracy"] == pytest.approx(expected)
    assert last["site_accuracy"] < per["1"]["accuracy"] * 0.9  # it did not take over the mean


def test_a_silent_site_times_out_and_the_round_goes_on(tmp_path):
    nodes = _nodes()
    nodes[1].evals = ("silent",)
    run = federation(tmp_path, nodes, SYNC, **SITES)
    run.run()
    rows = run.metrics()
    assert [r["version"] for r in rows] == [0, 1, 2, 3]
    assert all(r["site_failures"] == {"2": "no evaluation within 30s"} for r in rows)


def test_no_site_answering_records_no_accuracy_and_does_not_crash(tmp_path):
    run = federation(tmp_path, _nodes(evals=("error",)), SYNC, **SITES)
    summary = run.run()
    assert all(r["accuracy"] is None and len(r["site_failures"]) == 3 for r in run.metrics())
    assert summary["final_accuracy"] is None and summary["versions"] == 3
    assert not (run.dir / "best.npz").exists()


# ---- the best version ----------------------------------------------------------------------------
def test_best_npz_holds_the_version_best_on_the_sites(tmp_path):
    run = federation(tmp_path, _nodes(), SYNC, **SITES)
    summary = run.run()
    rows = run.metrics()
    best = max(rows, key=lambda r: r["site_accuracy"])
    assert (summary["best_version"], summary["best_on"]) == (best["version"], "sites")
    assert summary["best_score"] == pytest.approx(best["site_accuracy"])
    assert (run.dir / "best.npz").exists() and (run.dir / "global.npz").exists()


# ---- asynchronous runs ---------------------------------------------------------------------------
def test_async_sites_answer_while_clients_train_and_rows_stay_in_order(tmp_path):
    nodes = _nodes(delay=1.0, eval_delay=2.5)
    run = federation(tmp_path, nodes, ASYNC, **SITES)
    summary = run.run()
    rows = run.metrics()
    versions = [r["version"] for r in rows]
    assert versions == sorted(versions) and versions[0] == 0 and versions[-1] == 3
    assert all(len(r["sites"]) == 3 for r in rows)
    # an evaluation took 2.5 s and a job 1 s: training did not stop for it (jobs ran while versions were evaluated)
    evals = run.grid.evaluations()
    first_eval_after_start = min(p.at for p in evals if int(p.config[wire.MODEL_VERSION]) >= 1)
    assert any(first_eval_after_start < p.at < first_eval_after_start + 2.5 for p in run.grid.train_jobs())
    assert summary["final_site_accuracy"] == rows[-1]["site_accuracy"]


def test_evaluate_messages_are_flower_evaluate_messages(tmp_path):
    run = federation(tmp_path, _nodes(), SYNC, **{"num-rounds": 1}, **SITES)
    run.run()
    msgs = run.grid.evaluations()
    assert msgs and all(p.message.metadata.message_type == MessageType.EVALUATE for p in msgs)
    assert all(int(p.config[wire.LORA_RANK]) == 2 for p in msgs)


def test_report_and_status_show_the_sites(tmp_path):
    from corolla.server.status import run_status

    run = federation(tmp_path, _nodes(), SYNC, **SITES)
    run.run()
    text = (run.dir / "report.md").read_text()
    assert "worst site" in text and "Jain" in text and "| 2 |" in text
    assert "fedavg" in text.splitlines()[0] and "auto" not in text.splitlines()[0]
    status = run_status(run.dir)
    assert "sites: mean" in status and "worst" in status and "node 2" in status
    assert read_jsonl(run.dir / "metrics.jsonl")[-1]["site_jain"] <= 1.0
    assert math.isfinite(read_jsonl(run.dir / "metrics.jsonl")[-1]["site_std"])


# ---- the coordinator of a sites-only run holds no model -------------------------------------------
def test_a_sites_only_coordinator_never_loads_the_model(monkeypatch):
    """run_evaluator for evaluation=sites on a model folder: fingerprint and first adapter without loading the weights.

    (tests/test_base_files.py bounds the memory of the files path on a 300 MB folder.)
    """
    from corolla.learning import models, train_loop
    from corolla.learning.tasks import build_task
    from corolla.learning.train_loop import initial_adapter, load_base
    from corolla.server.evaluation import ModelCard, run_evaluator
    from corolla.spec import LoraSpec

    cfg = RunConfig(model=models.minilm_path(), labels="neg,pos", max_length=16)
    task = build_task(cfg.task_spec())
    expected_fp, expected_init = task.fingerprint(load_base(task)), initial_adapter(task, 4, LoraSpec(), seed=3)

    def refuse(*args, **kwargs):
        raise AssertionError("the coordinator loaded the model")

    monkeypatch.setattr(train_loop, "load_base", refuse)  # how TaskEvaluator and a trainer load the weights
    card = run_evaluator(cfg)
    assert isinstance(card, ModelCard) and card.fingerprint == expected_fp
    init = card.initial_adapter(4, LoraSpec(), seed=3)
    assert set(init) == set(expected_init) and all(np.array_equal(init[k], expected_init[k]) for k in init)
    with pytest.raises(RuntimeError, match="evaluates on the sites"):
        card.evaluate(None)  # type: ignore[arg-type]


def test_personalization_gap_at_the_end(tmp_path):
    import json

    run = federation(tmp_path, _nodes(), SYNC, **{"personalize-steps": 4}, **SITES)
    summary = run.run()
    row = json.loads((run.dir / "personalization.json").read_text())
    per = row["sites"]
    assert row["version"] == 3 and set(per) == {"1", "2", "3"}
    w = {k: v["examples"] for k, v in per.items()}
    personal = sum(v["personal_accuracy"] * w[k] for k, v in per.items()) / sum(w.values())
    glob = sum(v["accuracy"] * w[k] for k, v in per.items()) / sum(w.values())
    assert row["personalization_gap"] == pytest.approx(personal - glob) and row["personalization_gap"] > 0
    assert summary["personalization_gap"] == row["personalization_gap"]
    asked = [p for p in run.grid.evaluations() if wire.PERSONALIZE_STEPS in p.config]
    assert len(asked) == 3 and {int(p.config[wire.PERSONALIZE_STEPS]) for p in asked} == {4}
    assert len(run.metrics()) == 4  # the personalization round is not a metrics row
    assert "## Personalization gap" in (run.dir / "report.md").read_text()


def test_a_sites_only_server_never_builds_the_whole_dense_update(tmp_path, monkeypatch):
    """ΔW of every layer at once is what grows a coordinator with the model: sites get factors, files are streamed."""
    from corolla.strategies.fedavg import FedAvg

    run = federation(tmp_path, _nodes(skills=(1.0, 1.0, 1.0)), SYNC, **SITES)  # every site scores the model alike
    real = FedAvg.merged

    def refuse(self):
        raise AssertionError("merged() built the whole dense ΔW")

    monkeypatch.setattr(FedAvg, "merged", refuse)
    summary = run.run()
    monkeypatch.setattr(FedAvg, "merged", real)
    expected = run.fed.aggregator.merged()
    with np.load(run.dir / "global.npz") as z:
        got = merged_from_npz(dict(z))
    assert set(got.deltas) == set(expected.deltas)
    for k in expected.deltas:
        np.testing.assert_allclose(got.deltas[k], expected.deltas[k], rtol=1e-6)
    with np.load(run.dir / "best.npz") as z:  # the best version as the sites scored it
        best = merged_from_npz(dict(z))
    rows = {r["version"]: r for r in run.metrics()}
    assert rows[summary["best_version"]]["site_accuracy"] == pytest.approx(accuracy_of(delta_norm(best.deltas)), rel=1e-5)
