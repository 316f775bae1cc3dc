"""Server momentum (heavy ball on the aggregator's own state) against hand-computed two-step cases."""

import numpy as np
import pytest

from strategies import FedAvg, FedHL, LoraSpec
from strategies.fedbuff import FedBuff
from strategies.staleness import ConstantStaleness
from tests.strategies.helpers import LAYERS, adapter, perturbed, update

KA, KH = f"{LAYERS[0]}.lora_A.weight", "m.head.weight"


def two_steps(agg, rank, beta, lr):
    """Aggregate one client's change twice; return the state before, after step 1 and after step 2, and the deltas."""
    agg.server_momentum = beta
    states, deltas = [], []
    for seed in (1, 2):
        d = agg.dispatch(rank)
        states.append({k: np.array(v, copy=True) for k, v in agg.state().items()})
        out = perturbed(d, seed)
        agg.aggregate([update(seed, d, out)], server_lr=lr)
        deltas.append({k: out[k] - d.arrays[k] for k in out})
    states.append({k: np.array(v, copy=True) for k, v in agg.state().items()})
    return states, deltas


def test_fedavg_momentum_two_steps_by_hand():
    states, (d1, d2) = two_steps(FedAvg(adapter(2, 0), LoraSpec()), 2, beta=0.5, lr=0.8)
    s0, s1, s2 = states
    for k in (KA, KH):
        np.testing.assert_allclose(s1[k], s0[k] + 0.8 * d1[k], atol=1e-6)
        np.testing.assert_allclose(s2[k], s1[k] + 0.8 * (0.5 * d1[k] + d2[k]), atol=1e-6)


def test_fedhl_momentum_acts_on_the_dense_global_update():
    agg = FedHL(adapter(4, 0, b_zero=True), LoraSpec(alpha=8), max_rank=4)
    states, (d1, d2) = two_steps(agg, 4, beta=0.9, lr=1.0)
    w0, w1, w2 = (s[LAYERS[0]] for s in states)
    # one full-rank client: ΔW of a step = s·(B A − B₀ A₀), so W₂ = W₁ + 0.9 (W₁ − W₀) + (client change of step 2)
    step2 = w2 - w1
    assert np.linalg.norm(w1 - w0) > 0
    np.testing.assert_allclose(states[2][KH] - states[1][KH], 0.9 * d1[KH] + d2[KH], atol=1e-6)
    assert not np.allclose(step2, w1 - w0)  # momentum moved W by more than the second client's own change
    fresh = FedHL(adapter(4, 0, b_zero=True), LoraSpec(alpha=8), max_rank=4)
    no_mom, _ = two_steps(fresh, 4, beta=0.0, lr=1.0)
    np.testing.assert_allclose(step2, (no_mom[2][LAYERS[0]] - no_mom[1][LAYERS[0]]) + 0.9 * (w1 - w0), atol=1e-5)


@pytest.mark.parametrize("make", [lambda: FedAvg(adapter(2, 0), LoraSpec()),
                                  lambda: FedHL(adapter(2, 0, b_zero=True), LoraSpec(), max_rank=2)])
def test_zero_momentum_is_exactly_plain_apply(make):
    a, b = make(), make()
    b.server_momentum = 0.0
    d = a.dispatch(2)
    out = perturbed(d, 3)
    w = a.weights([update(1, d, out)])
    a.apply([update(1, d, out)], w, 0.7)
    b.step([update(1, b.dispatch(2), out)], w, 0.7)
    for k, v in a.state().items():
        np.testing.assert_array_equal(np.asarray(b.state()[k]), np.asarray(v))


def test_async_rule_uses_momentum_and_rejects_bad_beta():
    agg = FedAvg(adapter(2, 0), LoraSpec())
    agg.server_momentum = 0.5
    rule = FedBuff(agg, ConstantStaleness(), buffer_size=1)
    d = agg.dispatch(2)
    out = perturbed(d, 1)
    rule.admit(update(1, d, out))
    rule.step(now=0.0)
    assert agg._velocity and rule.summary()["server_momentum"] == 0.5
    np.testing.assert_allclose(agg._velocity[KA], out[KA] - d.arrays[KA], atol=1e-6)
    agg.server_momentum = 1.0
    before = {k: np.array(v, copy=True) for k, v in agg.state().items()}
    d2 = agg.dispatch(2)
    with pytest.raises(ValueError, match=r"server momentum must be in \[0, 1\), got 1.0"):
        agg.aggregate([update(2, d2, perturbed(d2, 2))])
    for k, v in before.items():
        np.testing.assert_array_equal(agg.state()[k], v)
    assert agg.version == 1
