"""Server optimizers (FedAvgM, FedAdam, FedYogi) against steps computed by hand, on every aggregator's own state."""

import numpy as np
import pytest

from corolla.strategies import FedAvg, FedHL, LoraSpec
from corolla.strategies.fedbuff import FedBuff, FedBuffConfig
from corolla.strategies.server_opt import (
    FedAdam,
    FedAdamConfig,
    FedAvgM,
    FedAvgMConfig,
    FedYogi,
    ServerSGD,
    ServerSGDConfig,
)
from corolla.strategies.staleness import ConstantStaleness
from tests.strategies.helpers import LAYERS, adapter, perturbed, update

KA, KH = f"{LAYERS[0]}.lora_A.weight", "m.head.weight"


def two_steps(agg, rank, optimizer):
    """Aggregate one client's change twice; return the states before/after each step and the client changes."""
    agg.optimizer = optimizer
    states, deltas = [], []
    for seed in (1, 2):
        d = agg.dispatch(rank)
        states.append({k: np.array(v, copy=True) for k, v in agg.state().items()})
        out = perturbed(d, seed)
        agg.aggregate([update(seed, d, out)])
        deltas.append({k: out[k] - d.arrays[k] for k in out})
    states.append({k: np.array(v, copy=True) for k, v in agg.state().items()})
    return states, deltas


def test_fedavgm_two_steps_by_hand():
    states, (d1, d2) = two_steps(FedAvg(adapter(2, 0), LoraSpec()), 2, FedAvgM(FedAvgMConfig(lr=0.8, momentum=0.5)))
    s0, s1, s2 = states
    for k in (KA, KH):
        np.testing.assert_allclose(s1[k], s0[k] + 0.8 * d1[k], atol=1e-6)
        np.testing.assert_allclose(s2[k], s1[k] + 0.8 * (0.5 * d1[k] + d2[k]), atol=1e-6)


def test_fedadam_two_steps_by_hand():
    b1, b2, tau, lr = 0.9, 0.99, 1e-3, 0.1
    opt = FedAdam(FedAdamConfig(lr=lr, beta1=b1, beta2=b2, tau=tau))
    states, (d1, d2) = two_steps(FedAvg(adapter(2, 0), LoraSpec()), 2, opt)
    s0, s1, s2 = states
    for k in (KA, KH):
        m1 = (1 - b1) * d1[k]
        v1 = b2 * tau**2 + (1 - b2) * d1[k] ** 2
        np.testing.assert_allclose(s1[k], s0[k] + lr * m1 / (np.sqrt(v1) + tau), rtol=1e-4, atol=1e-6)
        m2 = b1 * m1 + (1 - b1) * d2[k]
        v2 = b2 * v1 + (1 - b2) * d2[k] ** 2
        np.testing.assert_allclose(s2[k], s1[k] + lr * m2 / (np.sqrt(v2) + tau), rtol=1e-4, atol=1e-6)


def test_fedyogi_two_steps_by_hand():
    b1, b2, tau, lr = 0.9, 0.99, 1e-3, 0.1
    opt = FedYogi(FedAdamConfig(lr=lr, beta1=b1, beta2=b2, tau=tau))
    states, (d1, d2) = two_steps(FedAvg(adapter(2, 0), LoraSpec()), 2, opt)
    s0, s1, s2 = states
    for k in (KA, KH):
        m1 = (1 - b1) * d1[k]
        v0 = np.full_like(d1[k], tau**2)
        v1 = v0 - (1 - b2) * d1[k] ** 2 * np.sign(v0 - d1[k] ** 2)
        np.testing.assert_allclose(s1[k], s0[k] + lr * m1 / (np.sqrt(v1) + tau), rtol=1e-4, atol=1e-6)
        m2 = b1 * m1 + (1 - b1) * d2[k]
        v2 = v1 - (1 - b2) * d2[k] ** 2 * np.sign(v1 - d2[k] ** 2)
        np.testing.assert_allclose(s2[k], s1[k] + lr * m2 / (np.sqrt(v2) + tau), rtol=1e-4, atol=1e-6)
    # Yogi's v grows additively: after a large change it is below Adam's, which jumps multiplicatively
    assert not np.allclose(s2[KA], two_steps(FedAvg(adapter(2, 0), LoraSpec()), 2,
                                             FedAdam(FedAdamConfig(lr=lr)))[0][2][KA])


def test_fedhl_momentum_acts_on_the_dense_global_update():
    agg = FedHL(adapter(4, 0, b_zero=True), LoraSpec(alpha=8), max_rank=4)
    states, (d1, d2) = two_steps(agg, 4, FedAvgM(FedAvgMConfig(lr=1.0, momentum=0.9)))
    w0, w1, w2 = (s[LAYERS[0]] for s in states)
    step2 = w2 - w1
    assert np.linalg.norm(w1 - w0) > 0
    np.testing.assert_allclose(states[2][KH] - states[1][KH], 0.9 * d1[KH] + d2[KH], atol=1e-6)
    fresh = FedHL(adapter(4, 0, b_zero=True), LoraSpec(alpha=8), max_rank=4)
    plain, _ = two_steps(fresh, 4, ServerSGD())
    np.testing.assert_allclose(step2, (plain[2][LAYERS[0]] - plain[1][LAYERS[0]]) + 0.9 * (w1 - w0), atol=1e-5)


@pytest.mark.parametrize("make", [lambda: FedAvg(adapter(2, 0), LoraSpec()),
                                  lambda: FedHL(adapter(2, 0, b_zero=True), LoraSpec(), max_rank=2)])
def test_zero_momentum_equals_plain_sgd(make):
    a, b = make(), make()
    a.optimizer = ServerSGD(ServerSGDConfig(lr=0.7))
    b.optimizer = FedAvgM(FedAvgMConfig(lr=0.7, momentum=0.0))
    d = a.dispatch(2)
    out = perturbed(d, 3)
    a.aggregate([update(1, d, out)])
    b.aggregate([update(1, b.dispatch(2), out)])
    for k, v in a.state().items():
        np.testing.assert_allclose(np.asarray(b.state()[k]), np.asarray(v), atol=1e-6)


def test_async_rule_steps_through_the_server_optimizer():
    agg = FedAvg(adapter(2, 0), LoraSpec())
    agg.optimizer = FedAvgM(FedAvgMConfig(lr=1.0, momentum=0.5))
    rule = FedBuff(agg, FedBuffConfig(buffer_size=1), staleness=ConstantStaleness())
    d = agg.dispatch(2)
    out = perturbed(d, 1)
    rule.admit(update(1, d, out))
    rule.step(now=0.0)
    np.testing.assert_allclose(agg.optimizer.slots[KA]["m"], out[KA] - d.arrays[KA], atol=1e-6)
    assert agg.summary()["server_optimizer"] == "fedavgm"


@pytest.mark.parametrize("cfg,match", [
    (lambda: FedAvgMConfig(momentum=1.0), r"`server-momentum` must be in \[0, 1\), got 1.0"),
    (lambda: FedAdamConfig(beta2=1.5), r"`server-beta2` must be in \[0, 1\)"),
    (lambda: FedAdamConfig(tau=0.0), r"`server-tau` must be > 0"),
    (lambda: ServerSGDConfig(lr=0.0), r"`server-lr` must be > 0"),
])
def test_bad_optimizer_options_are_refused(cfg, match):
    with pytest.raises(ValueError, match=match):
        cfg()
