"""HeteRo-Select and Oort against hand-computed scores; robust to missing or nonsensical telemetry."""

import math

import numpy as np
import pytest

from corolla.strategies import Candidate, ClientUpdate, Dispatch, HeteRoSelect, HeteRoSelectConfig, LoraSpec, Oort, OortConfig
from corolla.strategies.selection_utils import clean_telemetry, minmax
from corolla.strategies.sketch import cosine, sketch_update
from tests.strategies.helpers import adapter, perturbed


def cands(losses=None, sizes=None):
    n = len(losses or sizes)
    return [Candidate(node_id=i, num_examples=(sizes or [10] * n)[i],
                      telemetry={} if losses is None else {"loss-mean": losses[i]}) for i in range(n)]


def test_minmax_and_telemetry_hygiene():
    np.testing.assert_allclose(minmax([1, 2, 3]), [0, 0.5, 1])
    np.testing.assert_allclose(minmax([2, 2]), [0.5, 0.5])
    clean, problems = clean_telemetry({"loss-mean": math.nan, "duration-s": -1.0, "loss-sq-mean": 2.0})
    assert clean == {"loss-sq-mean": 2.0} and len(problems) == 2 and "duration-s" in problems[1]


def test_heteroselect_temperature_schedule():
    h = HeteRoSelect(HeteRoSelectConfig(tau0=1.0, total_steps=100))
    assert [h.temperature(t) for t in (0, 50, 100, 400)] == [1.0, 0.75, 0.5, 0.5]


def test_heteroselect_first_round_scores_hand_computed():
    s = HeteRoSelect().scores(cands([1.0, 2.0, 3.0]), step=1)
    # V = (0, .5, 1); D = .5; F = 0 (no counts yet); St all equal -> .5; S = minmax(V + .15 + .1)
    assert [s[i]["usefulness"] for i in range(3)] == [0.0, 0.5, 1.0]
    assert all(s[i]["variety"] == 0.5 and s[i]["fairness"] == 0.0 and s[i]["staleness"] == 0.5 for i in range(3))
    assert [s[i]["score"] for i in range(3)] == pytest.approx([0.0, 0.5, 1.0])


def test_heteroselect_fairness_and_staleness_terms():
    h = HeteRoSelect()
    h.count = {0: 2, 1: 1, 2: 0}
    h.last = {0: 4, 1: 2}
    s = h.scores(cands([1.0, 1.0, 1.0]), step=5)
    assert [s[i]["fairness"] for i in range(3)] == [-1.0, 0.0, 1.0]
    st = [0.5 * math.log(1 + 5 - last) for last in (4, 2, 0)]
    np.testing.assert_allclose([s[i]["staleness"] for i in range(3)], minmax(st))


def test_heteroselect_variety_uses_update_directions():
    lora = LoraSpec(alpha=4)
    h = HeteRoSelect(lora=lora)
    init = adapter(2, 0)
    d = Dispatch(rank=2, version=0, arrays=init)
    same = perturbed(d, 1)
    opposite = {k: 2 * init[k] - same[k] for k in init}
    up = [ClientUpdate(node_id=0, arrays=same, sent=d, num_examples=1),
          ClientUpdate(node_id=1, arrays=opposite, sent=d, num_examples=1)]
    # B A is bilinear: negating the factor change is close to, not exactly, the opposite ΔW
    assert cosine(sketch_update(up[0], lora), sketch_update(up[1], lora)) < -0.95
    h.observe(up[:1], step=1)  # the server update's direction is client 0's
    h.direction[1] = sketch_update(up[1], lora)
    s = h.scores(cands([1.0, 1.0, 1.0]), step=2)
    assert s[0]["variety"] == pytest.approx(0.0, abs=1e-5)
    assert s[1]["variety"] == 1.0 and s[2]["variety"] == 0.5


def test_sketch_cosine_tracks_true_cosine():
    lora = LoraSpec(alpha=4)
    d = Dispatch(rank=2, version=0, arrays=adapter(2, 0))
    a, b = perturbed(d, 1), perturbed(d, 2)
    mix = {k: 0.5 * a[k] + 0.5 * b[k] for k in a}

    def flat(x):
        return np.concatenate([(x[k] - d.arrays[k]).ravel() for k in sorted(x) if "lora" not in k])
    true = cosine(flat(a), flat(mix))
    sk = cosine(sketch_update(ClientUpdate(node_id=0, arrays=a, sent=d, num_examples=1), lora, dim=256)[256:],
                sketch_update(ClientUpdate(node_id=1, arrays=mix, sent=d, num_examples=1), lora, dim=256)[256:])
    assert abs(sk - true) < 0.15


def test_heteroselect_samples_softmax_of_scores():
    counts = np.zeros(3)
    for seed in range(3000):
        counts[HeteRoSelect(seed=seed).select(cands([1.0, 2.0, 3.0]), 1, step=0).picked[0]] += 1
    p = np.exp([0.0, 0.5, 1.0])
    np.testing.assert_allclose(counts / 3000, p / p.sum(), atol=0.03)


def test_heteroselect_without_or_with_bad_telemetry_stays_schedulable():
    h = HeteRoSelect(seed=1)
    bad = [Candidate(node_id=0, telemetry={"loss-mean": math.nan, "duration-s": -5.0}),
           Candidate(node_id=1, telemetry={}), Candidate(node_id=2, telemetry={"loss-mean": 2.0})]
    sel = h.select(bad, 3, step=1)
    assert sorted(sel.picked) == [0, 1, 2]
    assert 0 in sel.problems and len(sel.problems[0]) == 2
    assert sel.scores[0]["usefulness"] == sel.scores[1]["usefulness"]  # both neutral


def oort_update(node, loss_sq, samples, duration):
    d = Dispatch(rank=2, version=0, arrays={})
    return ClientUpdate(node_id=node, arrays={}, sent=d, num_examples=samples,
                        metrics={"loss-sq-mean": loss_sq, "samples": samples, "duration-s": duration})


def test_oort_utility_duration_percentile_and_penalty():
    o = Oort()
    o.observe([oort_update(i, 4.0, 160, float(i + 1)) for i in range(10)], step=1)
    assert o.arms[0].utility == 160 * 2.0
    assert o.preferred_duration() == 4.0  # sorted durations 1..10, index int(10 * 0.3) = 3
    assert o._penalty(o.arms[7], 4.0) == pytest.approx((4 / 8) ** 2)
    assert o._penalty(o.arms[2], 4.0) == 1.0


def test_oort_scores_hand_computed():
    o = Oort()
    o.observe([oort_update(0, 1.0, 100, 1.0), oort_update(1, 9.0, 100, 1.0)], step=1)  # U = 100, 300
    scores = o.select(cands(sizes=[10, 10]), 1, step=3).scores
    lo, rng = 100 * 0.999, 300 - 100 * 0.999
    bonus = math.sqrt(0.1 * math.log(3) / 1)
    assert scores[0]["score"] == pytest.approx((100 - lo) / rng + bonus)
    assert scores[1]["score"] == pytest.approx((300 - lo) / rng + bonus)


def test_oort_explores_largest_first_then_exploits():
    o = Oort(seed=0)
    first = o.select(cands(sizes=[1, 1, 1, 1, 1, 1, 1, 1, 1000, 900]), 2, step=1).picked
    assert sorted(first) == [8, 9]  # window = 5 x 2 largest, sampled by size: the two giants dominate
    assert o.epsilon == pytest.approx(0.9 * 0.98)
    o.observe([oort_update(8, 1.0, 10, 1.0), oort_update(9, 1.0, 10, 1.0)], step=1)
    picked = o.select(cands(sizes=[1] * 8 + [1000, 900]), 4, step=2).picked
    assert len(set(picked)) == 4 and len(set(picked) & {8, 9}) <= 1  # int(4 x 0.86) = 3 explore slots


def test_oort_bad_telemetry_keeps_last_good_values():
    o = Oort()
    o.observe([oort_update(0, 4.0, 100, 2.0)], step=1)
    o.observe([oort_update(0, math.nan, 100, -1.0)], step=2)
    assert o.arms[0].utility == 200.0 and o.arms[0].duration == 2.0
    sel = o.select([Candidate(node_id=0, telemetry={"loss-sq-mean": math.inf})], 1, step=3)
    assert sel.picked == [0] and len(sel.problems[0]) == 3  # two from the bad reply, one from the bad candidate


def async_oort_run(oort, nodes=20, concurrency=4, picks=80):
    """One free slot per call, as the async driver asks: the oldest job returns when all `concurrency` slots are busy."""
    from collections import deque

    in_flight, first_pick, version = deque(), {}, 0
    for pick in range(picks):
        idle = [Candidate(node_id=i, num_examples=10 + i) for i in range(nodes) if i not in in_flight]
        (n,) = oort.select(idle, 1, step=max(version, 1)).picked
        first_pick.setdefault(n, pick)
        in_flight.append(n)
        if len(in_flight) == concurrency:
            done = in_flight.popleft()
            version += 1  # FedAsync-like: a version per reply; big utility for low ids, so exploitation is tempting
            oort.observe([oort_update(done, 100.0 / (1 + done), 100, 1.0)], step=version)
    return first_pick


def test_oort_explores_every_node_with_one_pick_per_call():
    """Defect 4: with k = 1 per call, int(1 · ε) = 0 exploration picks once anything was explored.

    A round of `round_size` (= concurrency) picks gets FedScale's int(round_size · ε) exploration
    picks, at least int(4 · 0.3) = 1 per round of 4 at the floor, so 20 nodes are all tried within 80 picks.
    """
    first_pick = async_oort_run(Oort(OortConfig(round_size=4), seed=0))
    assert len(first_pick) == 20, f"only {sorted(first_pick)} were ever picked"
    assert max(first_pick.values()) < 80


def test_oort_decays_epsilon_once_per_round_and_splits_each_round():
    o = Oort(OortConfig(round_size=4), seed=0)
    o.observe([oort_update(i, 1.0, 10, 1.0) for i in range(3)], step=1)  # three explored, seventeen not
    explore = []
    for call in range(12):
        picked = o.select(cands(sizes=[10] * 20), 1, step=2).picked
        explore.append(picked[0] >= 3)
        assert o.epsilon == pytest.approx(0.9 * 0.98 ** (call // 4 + 1))  # decays when a round starts
    # FedScale's rounding per round: int(4 · 0.882) = int(4 · 0.864) = int(4 · 0.847) = 3 exploration picks
    assert [sum(explore[r * 4: r * 4 + 4]) for r in range(3)] == [3, 3, 3]
    sync = Oort(seed=0)  # round_size 0: every call is a round (the synchronous driver's cohort)
    sync.observe([oort_update(i, 1.0, 10, 1.0) for i in range(3)], step=1)
    picked = sync.select(cands(sizes=[10] * 20), 4, step=2).picked
    assert sync.epsilon == pytest.approx(0.9 * 0.98) and sum(i >= 3 for i in picked) == 3
    with pytest.raises(ValueError, match="round-size"):
        OortConfig(round_size=-1)
