"""Client-level differential privacy: clipping, equal weights and noise by hand, ε against Opacus called directly."""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from corolla.config import ConfigError, RunConfig
from corolla.server.records import read_jsonl
from corolla.spec import LoraSpec
from corolla.strategies.fedavg import FedAvg
from corolla.strategies.guard import update_norm
from corolla.strategies.privacy import Accountant, GaussianMechanism, PrivacyConfig, update_noise
from tests.fakes import FakeNode
from tests.strategies.helpers import adapter, perturbed, update
from tests.test_drivers import SYNC, federation, no_plots, task_identity  # noqa: F401 (autouse fixtures)

DP = {"dp": "central", "aggregation": "fedavg", "dp-noise-multiplier": 1.1, "dp-clip": 0.5, "lora-rank": 2}


def _fedavg(config: PrivacyConfig, rank: int = 2) -> FedAvg:
    agg = FedAvg(adapter(rank, seed=1, b_zero=True), LoraSpec())
    agg.guard = GaussianMechanism(config, seed=0)
    return agg


# ---- the mechanism, by hand ------------------------------------------------------------------------
def test_changes_are_clipped_to_c_and_weighted_equally():
    agg = _fedavg(PrivacyConfig(dp="central", noise_multiplier=0.0, clip=1.0))
    d = agg.dispatch(2)
    big = {k: v + np.float32(10.0) for k, v in d.arrays.items()}  # a change of norm ≫ 1
    small = perturbed(d, seed=3, scale=0.01)
    updates = [update(1, d, big, n=1000), update(2, d, small, n=1)]  # example counts must not matter
    before = {k: v.copy() for k, v in agg.dense.items()}
    agg.aggregate(updates)
    note = agg.guard.note
    assert (note.clip, note.sigma, note.clipped, note.sites) == (1.0, 0.0, 1, 2)
    n_big = update_norm(updates[0])
    assert agg.guard.last[0].clipped == pytest.approx(1.0 / n_big)
    assert agg.guard.last[1].clipped is None and agg.guard.last[0].weight == 0.5
    head = "m.head.weight"  # dense: the step is the plain average of the clipped changes
    expected = 0.5 * (10.0 / n_big) + 0.5 * (small[head] - d.arrays[head])
    np.testing.assert_allclose(agg.dense[head] - before[head], expected, rtol=1e-5, atol=1e-6)


def test_noise_on_the_average_has_std_z_c_over_m():
    m, z, c = 4, 1.5, 0.2
    agg = FedAvg({"m.head.weight": np.zeros((200, 100), np.float32)}, LoraSpec())
    agg.guard = GaussianMechanism(PrivacyConfig(dp="central", noise_multiplier=z, clip=c), seed=7)
    d = agg.dispatch(0)
    agg.aggregate([update(i, d, dict(d.arrays)) for i in range(m)])  # nobody changed anything: the step is noise
    step = agg.dense["m.head.weight"]
    assert abs(float(step.mean())) < 0.01
    assert float(step.std()) == pytest.approx(z * c / m, rel=0.03)  # 20 000 draws: ±3 %
    assert agg.guard.note.sigma == pytest.approx(z * c / m)


def test_adaptive_clipping_follows_the_geometric_rule():
    cfg = PrivacyConfig(dp="central", noise_multiplier=0.0, clip=1.0, adaptive_clip=True, target_quantile=0.5,
                        clip_lr=0.2)
    agg = _fedavg(cfg)
    d = agg.dispatch(2)
    ups = [update(i, d, perturbed(d, seed=i, scale=s)) for i, s in enumerate((0.001, 0.002, 5.0, 6.0))]
    unclipped = sum(update_norm(u) <= 1.0 for u in ups) / 4
    agg.aggregate(ups)
    assert agg.guard.clip == pytest.approx(math.exp(-0.2 * (unclipped - 0.5)))


def test_adaptive_clipping_noise_split():
    # z_Δ^-2 + (2σ_b)^-2 = z^-2: the update and count noise together cost one step at z
    z, m = 0.4, 10
    zd = update_noise(z, m)
    assert zd ** -2 + (2 * 0.05 * m) ** -2 == pytest.approx(z ** -2)
    assert update_noise(1.0, 10) is None  # z >= 2σ_b: no count can be released


# ---- the accountant ---------------------------------------------------------------------------------
def test_epsilon_matches_opacus_called_directly():
    acc = Accountant(1e-5)
    ref = RDPAccountant()
    for q in (0.5, 0.5, 0.25):
        acc.step(1.1, q)
        ref.step(noise_multiplier=1.1, sample_rate=q)
    assert acc.epsilon() == pytest.approx(ref.get_epsilon(1e-5))
    assert Accountant(1e-5).epsilon() == 0.0


def test_a_private_run_records_epsilon_per_version_as_opacus_computes_it(tmp_path):
    nodes = [FakeNode(i, num_examples=10 * i) for i in range(1, 5)]
    run = federation(tmp_path, nodes, SYNC, **DP, **{"clients-per-round": 2})
    summary = run.run()
    rounds = read_jsonl(run.dir / "rounds.jsonl")
    ref = RDPAccountant()
    for r in rounds:
        ref.step(noise_multiplier=1.1, sample_rate=2 / 4)
        assert r["dp_sample_rate"] == 0.5 and r["dp_clip"] == 0.5
        assert r["epsilon"] == pytest.approx(ref.get_epsilon(1e-5))
    assert summary["epsilon"] == pytest.approx(ref.get_epsilon(1e-5)) and summary["dp_delta"] == 1e-5
    assert run.metrics()[-1]["epsilon"] == pytest.approx(summary["epsilon"])
    assert all(u["weight"] == 0.5 for u in run.updates("accepted"))  # equal weights, whatever the counts
    assert "ε" in (run.dir / "report.md").read_text()


def test_target_epsilon_stops_before_the_version_that_would_pass_it(tmp_path):
    ref = RDPAccountant()
    eps = []
    for _ in range(3):
        ref.step(noise_multiplier=1.1, sample_rate=0.5)
        eps.append(ref.get_epsilon(1e-5))
    target = (eps[1] + eps[2]) / 2  # two versions fit, the third would pass it
    nodes = [FakeNode(i) for i in range(1, 5)]
    # min-nodes 4 so that the up-front check (rate clients-per-round / min-nodes) lets the run start
    run = federation(tmp_path, nodes, {**SYNC, "num-rounds": 2}, **DP,
                     **{"clients-per-round": 2, "min-nodes": 4, "target-epsilon": target})
    object.__setattr__(run.fed.cfg, "num_rounds", 5)  # as if nodes left: more versions than the budget holds
    summary = run.run()
    assert summary["versions"] == 2 and summary["epsilon"] == pytest.approx(eps[1])
    assert "privacy budget" in summary["stopped_by"]


# ---- what is refused ----------------------------------------------------------------------------------
@pytest.mark.parametrize("keys, words", [
    ({"mode": "async"}, "needs mode=sync"),
    ({"selector": "oort"}, "needs selector=random"),
    ({"aggregation": "fedhl"}, r"non-linearly \(products, medians\)"),
    ({"aggregation": "fedmedian"}, r"non-linearly \(products, medians\)"),
    ({"dp-adaptive-clip": True, "clients-per-round": 5}, "needs clients-per-round > 10"),
    ({"dp-clip": 0.0}, "`dp-clip` must be a finite number > 0"),
    ({"target-epsilon": 1.0, "num-rounds": 50}, "not one version fits"),
])
def test_unsound_combinations_are_refused(keys, words):
    with pytest.raises(ConfigError, match=words):
        RunConfig.from_mapping({**DP, **keys})


def test_target_epsilon_refused_up_front_names_what_fits():
    with pytest.raises(ConfigError, match=r"lower num-rounds to \d+"):
        RunConfig.from_mapping({**DP, "dp-noise-multiplier": 2.0, "clients-per-round": 2, "min-nodes": 20,
                                "num-rounds": 500, "target-epsilon": 3.0})


def test_mixed_ranks_are_refused_when_they_join(tmp_path):
    nodes = [FakeNode(1, rank=2), FakeNode(2, rank=4)]
    run = federation(tmp_path, nodes, SYNC, **{**DP, "aggregation": "auto", "max-rank": 4})
    with pytest.raises(ConfigError, match="needs one rank for all sites"):
        run.run()


@pytest.mark.slow
def test_a_private_simulation_reports_the_accountants_epsilon(tmp_path):
    """A real `corolla sim` (Ray) with dp=central: ε in summary.json and status equals Opacus's for its rounds."""
    import json
    import subprocess

    from tests.conftest import COROLLA, run_sim

    out = tmp_path / "run"
    sets = {"model": "tiny-bert", "num-rounds": 2, "clients-per-round": 2, "min-nodes": 3, "local-steps": 2,
            "max-length": 16, "dp": "central", "aggregation": "fedavg", "lora-rank": 4, "ranks": "4",
            "dp-noise-multiplier": 0.8, "dp-clip": 0.05}
    code, log = run_sim(tmp_path, out, 3, sets)
    assert code == 0, log[-3000:]
    ref = RDPAccountant()
    for _ in range(2):
        ref.step(noise_multiplier=0.8, sample_rate=2 / 3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["versions"] == 2 and summary["epsilon"] == pytest.approx(ref.get_epsilon(1e-5))
    rounds = read_jsonl(out / "rounds.jsonl")
    assert all(r["dp_clip"] == 0.05 and r["dp_sigma"] == pytest.approx(0.8 * 0.05 / 2) for r in rounds)
    status = subprocess.run([*COROLLA, "status", str(out)], capture_output=True, text=True, timeout=120)
    assert f"ε = {summary['epsilon']:.4g}" in status.stdout


@pytest.mark.parametrize("name", ["ffa", "fedsvd"])
def test_private_frozen_a_federation_keeps_a_as_the_aggregator_says(tmp_path, name):
    """Sites are told to freeze A; with DP noise on the step, FFA's A still never moves and FedSVD's stays orthonormal."""
    from corolla.proto import wire

    nodes = [FakeNode(i) for i in range(1, 4)]
    run = federation(tmp_path, nodes, SYNC, **{**DP, "aggregation": name, "clients-per-round": 3})
    init = {k: v.copy() for k, v in run.evaluator.initial_adapter(2, LoraSpec(), 0).items()}
    summary = run.run()
    assert summary["versions"] == 3 and summary["rejected_updates"] == 0 and summary["epsilon"] > 0
    assert all(p.config[wire.FREEZE_A] for p in run.grid.train_jobs())
    for layer, (a, _) in run.fed.aggregator.factors.items():
        if name == "ffa":
            np.testing.assert_array_equal(a, init[f"{layer}.lora_A.weight"])
        else:
            np.testing.assert_allclose(a @ a.T, np.eye(a.shape[0]), atol=1e-5)
