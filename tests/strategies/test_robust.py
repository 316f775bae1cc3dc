"""The server's bounds on lying silos (strategies/guard.py), against hand-computed numbers.

Weight shares are bounded with the excess handed to the others in proportion (sums kept);
update changes above the norm bound are scaled back towards what was sent; FedMedian and
FedTrimmedAvg take robust centres of the client deltas and stay exact under async weights.
"""

import math

import numpy as np
import pytest

from corolla.config import ConfigError, RunConfig
from corolla.strategies import FedAvg, LoraSpec, RankMismatchError, Weights
from corolla.strategies.base import ClientUpdate
from corolla.strategies.guard import GuardConfig, UpdateGuard, auto_share, cap_shares, clip_update, lower_median, update_norm
from corolla.strategies.robust import FedMedian, FedTrimmedAvg, TrimConfig, coordinate_median, trim_count, trimmed_mean
from tests.strategies import test_async_identity as identity
from tests.strategies.helpers import adapter

LORA = LoraSpec(alpha=8)
HEAD = "m.head.weight"


def shifted(d, shifts: dict[str, float], default: float = 0.0) -> dict[str, np.ndarray]:
    """What a client returns when every array moved by a constant (per key)."""
    return {k: (v + np.float32(shifts.get(k, default))).astype(np.float32) for k, v in d.arrays.items()}


# ---- weight shares ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights,cap,expected", [
    # 0.6 is bounded to 0.5; its 0.1 goes to the others 1:3 (0.025, 0.075)
    ([0.1, 0.3, 0.6], 0.5, [0.125, 0.375, 0.5]),
    # two passes: 0.8 → 0.4, the others ×3 (0.06, 0.54); 0.54 → 0.4, the rest (0.2) to the first
    ([0.02, 0.18, 0.8], 0.4, [0.2, 0.4, 0.4]),
    # asynchronous weights keep their sum (1.75): the bound is 0.6 × 1.75 = 1.05
    ([0.25, 1.5], 0.6, [0.7, 1.05]),
    # a bound below an equal share cannot be met: equal shares
    ([0.1, 0.2, 0.7], 0.2, [1 / 3, 1 / 3, 1 / 3]),
    # nothing above the bound, or no bound: unchanged
    ([0.2, 0.3, 0.5], 0.5, [0.2, 0.3, 0.5]),
    ([0.01, 0.99], 1.0, [0.01, 0.99]),
])
def test_cap_shares_bounds_and_redistributes_in_proportion(weights, cap, expected):
    out = cap_shares(weights, cap)
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    assert out.sum() == pytest.approx(sum(weights))


@pytest.mark.parametrize("k,share", [(1, 1.0), (2, 0.5), (3, 2 / 3), (4, 0.5), (6, 0.5), (100, 0.5)])
def test_auto_share_is_two_equal_shares_then_the_majority_bound(k, share):
    assert auto_share(k) == pytest.approx(share)


def test_a_lied_example_count_gets_at_most_the_bounded_share():
    # counts 10, 30, 10^12: FedAvg gives the liar ≈ 1; the bound (k = 3: 2/3) leaves 1/3 to the others, 1:3
    agg = FedAvg(adapter(2, 0), LORA)
    agg.guard = UpdateGuard(GuardConfig(max_update_norm=-1))
    d = agg.dispatch(2)
    ups = [ClientUpdate(node_id=i, arrays=shifted(d, {}, s), sent=d, num_examples=n)
           for i, (n, s) in enumerate([(10, 0.1), (30, 0.2), (10**12, 0.3)])]
    head0 = d.arrays[HEAD].copy()
    w = agg.aggregate(ups)
    np.testing.assert_allclose(w.lora, [1 / 12, 1 / 4, 2 / 3], rtol=1e-9)
    np.testing.assert_allclose(w.dense, [1 / 12, 1 / 4, 2 / 3], rtol=1e-9)
    np.testing.assert_allclose(agg.dense[HEAD] - head0, 0.1 / 12 + 0.2 / 4 + 0.3 * 2 / 3, rtol=1e-5)
    assert [n.weight_before_cap for n in agg.guard.last] == [pytest.approx(1e-11), pytest.approx(3e-11),
                                                             pytest.approx(1.0)]


# ---- update norms -------------------------------------------------------------------------------------------
def test_update_norm_and_clip_by_hand():
    agg = FedAvg(adapter(2, 0), LORA)
    d = agg.dispatch(2)
    a_key = "m.l0.q.lora_A.weight"
    arrays = {k: v.copy() for k, v in d.arrays.items()}
    arrays[a_key][0, 0] += 3.0
    arrays[HEAD][1, 2] += 4.0
    u = ClientUpdate(node_id=1, arrays=arrays, sent=d, num_examples=1)
    assert update_norm(u) == pytest.approx(5.0, rel=1e-6)  # √(3² + 4²)
    c = clip_update(u, 0.2)
    assert c.arrays[a_key][0, 0] == pytest.approx(d.arrays[a_key][0, 0] + 0.6, abs=1e-6)
    assert c.arrays[HEAD][1, 2] == pytest.approx(d.arrays[HEAD][1, 2] + 0.8, abs=1e-6)
    assert update_norm(c) == pytest.approx(1.0, rel=1e-5) and c.sent is d


@pytest.mark.parametrize("values,median", [([3.0], 3.0), ([1.0, 9.0], 1.0), ([5.0, 1.0, 9.0], 5.0),
                                           ([4.0, 1.0, 3.0, 2.0], 2.0)])
def test_lower_median(values, median):
    assert lower_median(values) == median


def _guard_step(guard: UpdateGuard, norms: list[float]):
    """Updates whose head alone changed by `norm` (all other arrays unchanged), through the guard."""
    agg = FedAvg(adapter(2, 0), LORA)
    d = agg.dispatch(2)
    size = d.arrays[HEAD].size
    ups = [ClientUpdate(node_id=i, arrays=shifted(d, {HEAD: n / math.sqrt(size)}), sent=d, num_examples=1)
           for i, n in enumerate(norms)]
    w = np.full(len(norms), 1 / len(norms))
    return guard(ups, Weights(lora=w, dense=w))


def test_adaptive_bound_is_a_multiple_of_the_lower_median_and_remembers_clipped_norms():
    guard = UpdateGuard()  # adaptive, 4 × the lower median, from two norms on
    out, _ = _guard_step(guard, [1.0, 2.0])  # two norms: the lower one, 1, sets the bound 4
    assert [n.bound for n in guard.last] == pytest.approx([4.0, 4.0]) and [n.clipped for n in guard.last] == [None, None]
    assert [update_norm(u) for u in out] == pytest.approx([1, 2], 1e-5)
    out, _ = _guard_step(guard, [10_000.0])  # pool 1, 2, 10⁴: median 2, bound 8
    [note] = guard.last
    assert note.bound == pytest.approx(8.0) and note.clipped == pytest.approx(8e-4)
    assert update_norm(out[0]) == pytest.approx(8.0, rel=1e-4)
    assert list(guard.norms) == pytest.approx([1.0, 2.0, 8.0], rel=1e-5)  # the clipped norm is remembered
    _guard_step(guard, [30.0, 3.0])  # pool 1, 2, 8, 30, 3: lower median 3, bound 12
    assert [n.bound for n in guard.last] == pytest.approx([12.0, 12.0])
    assert [n.clipped for n in guard.last] == [pytest.approx(0.4), None]


def test_two_sites_are_bounded_by_the_lower_norm_and_a_lone_first_update_is_not():
    guard = UpdateGuard()
    _guard_step(guard, [7.0])  # one norm, nothing remembered: nothing to compare with (the optimizer bound is the server's)
    assert guard.last[0].bound is None and guard.last[0].clipped is None
    guard = UpdateGuard()
    out, weights = _guard_step(guard, [1.0, 10_000.0])  # an honest site and a rogue: the rogue is clipped to 4×
    assert guard.last[1].clipped == pytest.approx(4e-4) and update_norm(out[1]) == pytest.approx(4.0, rel=1e-4)


def test_fixed_and_disabled_norm_bounds():
    guard = UpdateGuard(GuardConfig(max_update_norm=1.5))
    _guard_step(guard, [5.0, 1.0])
    assert [n.clipped for n in guard.last] == [pytest.approx(0.3), None]
    guard = UpdateGuard(GuardConfig(max_update_norm=-1))
    _guard_step(guard, [1.0, 1.0, 1e9])
    assert [n.clipped for n in guard.last] == [None, None, None] and guard.last[0].bound is None


def test_guard_config_refuses_nonsense():
    with pytest.raises(ValueError, match="update-norm-multiple"):
        GuardConfig(update_norm_multiple=0.5)
    with pytest.raises(ValueError, match="max-weight-share"):
        GuardConfig(max_weight_share=-0.1)


# ---- robust centres -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,fraction,t", [(2, 0.2, 0), (3, 0.2, 1), (5, 0.2, 1), (10, 0.2, 2), (10, 0.0, 0),
                                          (4, 0.45, 1), (7, 0.4, 2), (11, 0.49, 5)])
def test_trim_count(k, fraction, t):
    assert trim_count(k, fraction) == t


def test_median_and_trimmed_mean_by_hand():
    xs = [np.array([1.0, -5.0]), np.array([2.0, 0.0]), np.array([100.0, 1.0])]
    np.testing.assert_allclose(coordinate_median(xs), [2.0, 0.0])
    np.testing.assert_allclose(coordinate_median([*xs, np.array([3.0, 2.0])]), [2.5, 0.5])
    ys = [np.array([v]) for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    np.testing.assert_allclose(trimmed_mean(ys, 0.2), [3.0])  # drops 1 and 100
    np.testing.assert_allclose(trimmed_mean(ys, 0.0), [22.0])  # the mean
    with pytest.raises(ValueError, match="trim-fraction"):
        TrimConfig(trim_fraction=0.5)


@pytest.mark.parametrize("cls,expected", [(FedMedian, 0.2), (FedTrimmedAvg, 0.2), (FedAvg, None)])
def test_robust_aggregators_ignore_one_outlier_of_three(cls, expected):
    agg = cls(adapter(2, 0), LORA)
    d = agg.dispatch(2)
    before = {k: v.copy() for k, v in d.arrays.items()}
    ups = [ClientUpdate(node_id=i, arrays=shifted(d, {}, s), sent=d, num_examples=n)
           for i, (s, n) in enumerate([(0.1, 10), (0.2, 10), (50.0, 10**6)])]
    w = agg.aggregate(ups)
    moved = agg.dense[HEAD] - before[HEAD]
    if expected is None:  # FedAvg follows the liar's count
        assert moved.mean() > 40
        return
    np.testing.assert_allclose(w.lora, [1 / 3] * 3)
    np.testing.assert_allclose(moved, expected, rtol=1e-5)
    a, b = agg.factors["m.l0.q"]
    np.testing.assert_allclose(a - before["m.l0.q.lora_A.weight"], expected, rtol=1e-5)
    np.testing.assert_allclose(b - before["m.l0.q.lora_B.weight"], expected, rtol=1e-5)


def test_robust_centre_is_scaled_by_the_steps_total_weight():
    # asynchronous weights (here Σ = 0.5) scale the centre: Σw × median of the deltas 0.1, 0.3, 0.2
    agg = FedMedian(adapter(2, 0), LORA)
    d = agg.dispatch(2)
    head0 = d.arrays[HEAD].copy()
    ups = [ClientUpdate(node_id=i, arrays=shifted(d, {}, s), sent=d, num_examples=1) for i, s in enumerate([0.1, 0.3, 0.2])]
    agg.step(ups, Weights(lora=np.array([0.1, 0.2, 0.2]), dense=np.array([0.1, 0.2, 0.2])))
    np.testing.assert_allclose(agg.dense[HEAD] - head0, 0.5 * 0.2, rtol=1e-5)


def test_five_updates_two_trimmed_each_side_of_every_coordinate():
    agg = FedTrimmedAvg(adapter(2, 0), LORA, trim_fraction=0.4)  # k = 5: ⌊2⌋ = 2 at each end
    d = agg.dispatch(2)
    head0 = d.arrays[HEAD].copy()
    ups = [ClientUpdate(node_id=i, arrays=shifted(d, {}, s), sent=d, num_examples=1)
           for i, s in enumerate([-9.0, 0.1, 0.2, 0.3, 9.0])]
    agg.aggregate(ups)
    np.testing.assert_allclose(agg.dense[HEAD] - head0, 0.2, rtol=1e-5)


def test_robust_aggregators_pin_the_rank_of_the_first_dispatch():
    init = adapter(8, 0, b_zero=True)  # the factory's max-rank initial adapter
    agg = FedMedian(init, LORA)
    d = agg.dispatch(4)
    assert agg.rank == 4 and d.arrays["m.l0.q.lora_A.weight"].shape == (4, 4)
    np.testing.assert_array_equal(d.arrays["m.l0.q.lora_A.weight"], init["m.l0.q.lora_A.weight"][:4])
    with pytest.raises(RankMismatchError, match="rank 8"):
        agg.dispatch(8)


@pytest.mark.parametrize("rule_name", ["fedbuff", "fedasync", "fedfix"])
@pytest.mark.parametrize("agg_name,cls", [("fedmedian", FedMedian), ("fedtrimmedavg", FedTrimmedAvg)])
def test_robust_aggregators_leave_the_model_unchanged_on_identity_replies(monkeypatch, agg_name, cls, rule_name):
    """`supports_async` is honest: stale and fresh unchanged replies under weights that do not sum to 1 move nothing."""
    assert cls.supports_async
    monkeypatch.setitem(identity.FACTORIES, agg_name, (lambda: cls(adapter(4, 0), LORA), (4, 4, 4)))
    identity.test_identity_replies_leave_the_global_model_unchanged(agg_name, rule_name)


# ---- configuration ------------------------------------------------------------------------------------------
def test_guard_and_trim_keys_in_the_run_configuration():
    cfg = RunConfig.from_mapping({"aggregation": "fedtrimmedavg", "trim-fraction": "0.3", "max-weight-share": "0.4",
                                  "max-update-norm": "2.5"})
    assert cfg.component_config("aggregation").trim_fraction == 0.3
    g = GuardConfig.from_mapping(cfg.to_mapping())
    assert (g.max_weight_share, g.max_update_norm, g.update_norm_multiple) == (0.4, 2.5, 4.0)
    with pytest.raises(ConfigError, match="`trim-fraction` = 0.3 would be ignored"):
        RunConfig.from_mapping({"aggregation": "fedmedian", "trim-fraction": 0.3})
    with pytest.raises(ConfigError, match="`update-norm-multiple` = 2.0 would be ignored: it applies only with "
                                          "max-update-norm=0.0"):
        RunConfig.from_mapping({"max-update-norm": 1.0, "update-norm-multiple": 2.0})
    with pytest.raises(ConfigError, match="trim-fraction"):
        RunConfig.from_mapping({"aggregation": "fedtrimmedavg", "trim-fraction": 0.5})
    with pytest.raises(ConfigError, match="`update-norm-multiple` = 0.5 is too small"):
        RunConfig.from_mapping({"update-norm-multiple": 0.5})
    RunConfig.from_mapping({"mode": "async", "aggregation": "fedmedian"})  # delta form: allowed asynchronously
