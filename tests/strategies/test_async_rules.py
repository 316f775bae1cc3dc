"""FedBuff, FedAsync, FedFix and staleness weights against hand-computed cases; the clock is injected."""

import copy

import numpy as np
import pytest

from corolla.strategies import FedAvg, FedHL, InvalidUpdateError, LoraSpec
from corolla.strategies.base import ClientUpdate
from corolla.strategies.fedbuff import FedAsync, FedBuff, FedBuffConfig
from corolla.strategies.fedfix import FedFix, FedFixConfig
from corolla.strategies.server_opt import ServerSGD, ServerSGDConfig
from corolla.strategies.staleness import (
    ConstantStaleness,
    HingeStaleness,
    PolynomialStaleness,
    PolynomialStalenessConfig,
)
from tests.strategies.helpers import LAYERS, adapter, perturbed


def upd(node, d, arrays, n=10, staleness=0, job=""):
    return ClientUpdate(node_id=node, arrays=arrays, sent=d, num_examples=n, staleness=staleness, job_id=job)


@pytest.mark.parametrize("tau,expected", [(0, 1.0), (3, 0.5), (8, 1 / 3)])
def test_polynomial_staleness(tau, expected):
    assert PolynomialStaleness(PolynomialStalenessConfig(exponent=0.5)).weight(tau) == pytest.approx(expected)


def test_hinge_and_constant_staleness():
    h = HingeStaleness(a=10, b=4)
    assert h.weight(4) == 1.0 and h.weight(5) == pytest.approx(1 / 11)
    assert ConstantStaleness().weight(100) == 1.0
    with pytest.raises(ValueError, match="future version"):
        ConstantStaleness().weight(-1)


def test_fedbuff_waits_for_k_then_applies_staleness_weights():
    agg = FedAvg(adapter(2, 0), LoraSpec(alpha=4))
    rule = FedBuff(agg, FedBuffConfig(buffer_size=2), staleness=PolynomialStaleness(PolynomialStalenessConfig(exponent=0.5)))
    old = agg.dispatch(2)
    for _ in range(3):  # three versions pass while `old` trains; an unchanged reply leaves the state as it was
        agg.aggregate([upd(9, agg.dispatch(2), agg.dispatch(2).arrays)])
    d = agg.dispatch(2)
    assert (old.version, d.version) == (0, 3)
    a1, a2 = perturbed(d, 1), perturbed(old, 2)
    rule.admit(upd(1, d, a1, n=10, staleness=0))
    assert rule.step(now=0.0) is None and agg.version == 3
    rule.admit(upd(2, old, a2, n=30, staleness=0))  # τ is re-measured when applied: 3, whatever the caller said
    step = rule.step(now=1.0)
    assert step is not None and agg.version == 4 and rule.buffer == [] and step.staleness == [0, 3]
    np.testing.assert_allclose(step.lora_weights, [0.25 * 1.0, 0.75 * 0.5])
    k = f"{LAYERS[0]}.lora_A.weight"
    expected = d.arrays[k] + 0.25 * (a1[k] - d.arrays[k]) + 0.375 * (a2[k] - old.arrays[k])
    np.testing.assert_allclose(agg.dispatch(2).arrays[k], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base", ["fedavg", "fedhl"])
def test_fedbuff_with_constant_weight_and_full_buffer_equals_sync(base):
    make = (lambda: FedAvg(adapter(4, 0), LoraSpec(alpha=8))) if base == "fedavg" else \
        (lambda: FedHL(adapter(4, 0, b_zero=True), LoraSpec(alpha=8), max_rank=4))
    sync, asyn = make(), make()
    ranks = [4, 4, 4] if base == "fedavg" else [1, 2, 4]
    ds = [sync.dispatch(r) for r in ranks]
    outs = [perturbed(d, i) for i, d in enumerate(ds)]
    sync.aggregate([upd(i, d, o, n=10 * (i + 1)) for i, (d, o) in enumerate(zip(ds, outs))])
    rule = FedBuff(asyn, FedBuffConfig(buffer_size=3), staleness=ConstantStaleness())
    ds2 = [asyn.dispatch(r) for r in ranks]
    for i, (d, o) in enumerate(zip(ds2, outs)):
        rule.admit(upd(i, d, o, n=10 * (i + 1)))
    rule.step(now=0.0)
    for k, v in sync.merged().deltas.items():
        np.testing.assert_allclose(asyn.merged().deltas[k], v, atol=1e-5)


def test_async_drops_stale_duplicate_and_malformed_updates_without_touching_state():
    agg = FedAvg(adapter(2, 0), LoraSpec())
    rule = FedBuff(agg, FedBuffConfig(buffer_size=1, max_staleness=2), staleness=PolynomialStaleness())
    d = agg.dispatch(2)
    before = copy.deepcopy(agg.merged().deltas)
    with pytest.raises(InvalidUpdateError, match="3 versions stale, above max-staleness 2"):
        rule.admit(upd(1, d, perturbed(d, 1), staleness=3))
    bad = perturbed(d, 2)
    bad["m.head.weight"] = bad["m.head.weight"][:, :2]
    with pytest.raises(InvalidUpdateError, match="wrong shape"):
        rule.admit(upd(2, d, bad))
    rule.buffer_size = 5
    good = upd(3, d, perturbed(d, 3), job="m3")
    rule.admit(good)
    with pytest.raises(InvalidUpdateError, match="duplicate reply to job m3"):
        rule.admit(upd(3, d, perturbed(d, 4), job="m3"))
    assert len(rule.buffer) == 1 and agg.version == 0
    for k, v in before.items():
        np.testing.assert_array_equal(agg.merged().deltas[k], v)


def test_fedasync_applies_every_update():
    agg = FedAvg(adapter(2, 0), LoraSpec())
    agg.optimizer = ServerSGD(ServerSGDConfig(lr=0.5))
    rule = FedAsync(agg, staleness=PolynomialStaleness())
    for i in range(3):
        d = agg.dispatch(2)
        rule.admit(upd(i, d, perturbed(d, i), staleness=i))
        assert rule.step(now=float(i)).version == i + 1


def test_fedfix_unbiased_weights_and_interval_clock():
    agg = FedAvg(adapter(2, 0), LoraSpec())
    rule = FedFix(agg, FedFixConfig(interval=10.0, weighting="paper"), now=0.0)
    for node, n in ((1, 10), (2, 30), (3, 60)):
        rule.register(node, n)
    rule.observe(1, 5.0)
    rule.observe(2, 25.0)
    rule.observe(2, 25.0)
    d = agg.dispatch(2)
    rule.admit(upd(1, d, perturbed(d, 1), n=10))
    assert rule.step(now=9.9) is None and agg.version == 0
    rule.admit(upd(2, d, perturbed(d, 2), n=30))
    step = rule.step(now=10.0)
    # p = (0.1, 0.3, 0.6); ⌈5/10⌉ = 1, ⌈25/10⌉ = 3
    np.testing.assert_allclose(step.lora_weights, [0.1, 0.9])
    assert rule.deadline == 20.0
    assert rule.step(now=35.0) is None and rule.deadline == 40.0  # empty intervals make no version
    assert agg.version == 1


def test_fedfix_duration_ema_and_bad_values():
    rule = FedFix(FedAvg(adapter(2, 0), LoraSpec()), FedFixConfig(interval=10.0, duration_ema=0.5), now=0.0)
    rule.observe(1, 10.0)
    rule.observe(1, 30.0)
    assert rule.durations[1] == 20.0
    rule.observe(1, float("nan"))
    rule.observe(1, -3.0)
    assert rule.durations[1] == 20.0
    with pytest.raises(ValueError, match="interval"):
        FedFix(FedAvg(adapter(2, 0), LoraSpec()), FedFixConfig(interval=0), now=0)
    with pytest.raises(ValueError, match="buffer-size"):
        FedBuff(FedAvg(adapter(2, 0), LoraSpec()), FedBuffConfig(buffer_size=0), staleness=ConstantStaleness())


def test_fedbuff_takes_exactly_k_in_arrival_order():
    agg = FedAvg(adapter(2, 0), LoraSpec())
    rule = FedBuff(agg, FedBuffConfig(buffer_size=2), staleness=ConstantStaleness())
    d = agg.dispatch(2)
    for i in range(3):
        rule.admit(upd(i, d, perturbed(d, i)))
    assert rule.step(now=0.0).node_ids == [0, 1]
    assert [u.node_id for u in rule.buffer] == [2] and rule.step(now=0.0) is None


def test_fedbuff_leftover_update_is_weighted_by_its_staleness_when_applied():
    """Three replies land together with K = 2: the third is applied to version 1, so τ = 1, not 0."""
    agg = FedAvg(adapter(2, 0), LoraSpec())
    rule = FedBuff(agg, FedBuffConfig(buffer_size=2), staleness=PolynomialStaleness(PolynomialStalenessConfig(exponent=0.5)))
    d = agg.dispatch(2)
    for i in range(4):
        rule.admit(upd(i, d, perturbed(d, i)))
    first, second = rule.step(now=0.0), rule.step(now=0.0)
    assert first.staleness == [0, 0] and second.staleness == [1, 1]
    assert [u.staleness for u in second.updates] == [1, 1] and second.version == 2
    np.testing.assert_allclose(second.lora_weights, [0.5 / np.sqrt(2), 0.5 / np.sqrt(2)])


def test_buffered_update_that_outgrows_max_staleness_is_expired_untouched():
    agg = FedAvg(adapter(2, 0), LoraSpec())
    rule = FedBuff(agg, FedBuffConfig(buffer_size=2, max_staleness=0), staleness=ConstantStaleness())
    d = agg.dispatch(2)
    for i in range(3):
        rule.admit(upd(i, d, perturbed(d, i)))
    assert rule.expire() == [] and rule.step(now=0.0).version == 1
    before = copy.deepcopy(agg.merged().deltas)
    (u, why), = rule.expire()
    assert u.node_id == 2 and rule.buffer == []
    assert why == "node 2: update became 1 versions stale while buffered, above max-staleness 0; it is dropped."
    assert rule.step(now=1.0) is None and agg.version == 1
    for k, v in before.items():
        np.testing.assert_array_equal(agg.merged().deltas[k], v)


def test_fedbuff_second_job_of_one_node_at_one_version_is_a_distinct_update():
    """Defect 1: a fast node re-dispatched before the version changes starts from the same shared Dispatch.

    Its second reply answers a different job (message id) and must be buffered, not dropped as a
    duplicate; with one node and K = 2 the old check (`u.sent is update.sent`) stalled FedBuff for ever.
    """
    agg = FedAvg(adapter(2, 0), LoraSpec())
    rule = FedBuff(agg, FedBuffConfig(buffer_size=2), staleness=ConstantStaleness())
    for job in range(6):  # one node, re-dispatched at once after each reply, as the driver does
        d = agg.dispatch(2)
        rule.admit(upd(7, d, perturbed(d, job), job=f"m{job}"))
        rule.step(now=float(job))
    assert agg.version == 3 and rule.buffer == []
    d = agg.dispatch(2)
    assert agg.dispatch(2) is d  # the premise: both jobs of one version share one Dispatch
    rule.admit(upd(7, d, perturbed(d, 10), job="m10"))
    with pytest.raises(InvalidUpdateError, match="node 7: duplicate reply to job m10"):
        rule.admit(upd(7, d, perturbed(d, 11), job="m10"))  # the same job twice is a duplicate
    assert len(rule.buffer) == 1


def test_fedfix_normalized_weights_keep_the_papers_ratios_and_sum_to_one():
    """The default `fedfix-weighting=normalized`: d_i = p_i ⌈τ_i/Δt⌉ over the interval's Σ d_i."""
    agg = FedAvg(adapter(2, 0), LoraSpec())
    rule = FedFix(agg, FedFixConfig(interval=10.0), now=0.0)
    assert rule.weighting == "normalized" and rule.summary()["weighting"] == "normalized"
    for node, n in ((1, 10), (2, 30), (3, 60)):
        rule.register(node, n)
    rule.observe(2, 25.0)
    rule.observe(3, 12.0)
    d = agg.dispatch(2)
    rule.admit(upd(2, d, perturbed(d, 2), n=30))
    rule.admit(upd(3, d, perturbed(d, 3), n=60))
    step = rule.step(now=10.0)
    paper = np.array([0.3 * 3, 0.6 * 2])  # 0.9 and 1.2: Σ = 2.1
    np.testing.assert_allclose(step.lora_weights, paper / paper.sum())
    np.testing.assert_allclose(step.dense_weights, paper / paper.sum())
    with pytest.raises(ValueError, match="fedfix-weighting"):
        FedFixConfig(weighting="hajek")
