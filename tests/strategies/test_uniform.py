import pytest

from corolla.strategies import Candidate, UniformSelector


def test_selects_distinct_ids_reproducibly_and_keeps_64bit_ids_exact():
    ids = [2**64 - 1, 2**63 + 7, 11378909323114401792, 5, 9]
    cands = [Candidate(node_id=i) for i in ids]
    a = UniformSelector(seed=3).select(cands, 3, step=1).picked
    b = UniformSelector(seed=3).select(cands, 3, step=1).picked
    assert a == b and len(set(a)) == 3 and set(a) <= set(ids)
    assert all(type(x) is int for x in a)


def test_k_larger_than_pool_returns_everyone():
    cands = [Candidate(node_id=i) for i in range(3)]
    assert sorted(UniformSelector().select(cands, 10, step=1).picked) == [0, 1, 2]
    assert UniformSelector().select([], 4, step=1).picked == []
    with pytest.raises(ValueError):
        UniformSelector().select(cands, -1, step=1)


def test_uniform_over_many_draws():
    sel = UniformSelector(seed=0)
    cands = [Candidate(node_id=i) for i in range(4)]
    counts = [0] * 4
    for t in range(2000):
        for i in sel.select(cands, 1, step=t).picked:
            counts[i] += 1
    assert all(abs(c / 2000 - 0.25) < 0.04 for c in counts)
