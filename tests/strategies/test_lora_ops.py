import numpy as np
import pytest

from corolla.strategies import InvalidUpdateError, LoraSpec, RankMismatchError, lora_ops
from tests.strategies.helpers import adapter


def test_split_keys_pairs_layers_and_dense():
    layers, dense = lora_ops.split_keys(adapter(3, 0))
    assert sorted(layers) == ["m.l0.q", "m.l1.q"]
    assert layers["m.l0.q"] == lora_ops.LayerShape(d_out=5, d_in=4)
    assert dense == ["m.head.weight"]


@pytest.mark.parametrize("drop,match", [("m.l0.q.lora_B.weight", "no `m.l0.q.lora_B"), ("m.l0.q.lora_A.weight", "no A factor")])
def test_split_keys_unpaired(drop, match):
    a = adapter(2, 0)
    del a[drop]
    with pytest.raises(InvalidUpdateError, match=match):
        lora_ops.split_keys(a)


def test_split_keys_rank_disagreement():
    a = adapter(2, 0)
    a["m.l0.q.lora_B.weight"] = np.zeros((5, 3), np.float32)
    with pytest.raises(InvalidUpdateError, match="do not form"):
        lora_ops.split_keys(a)


def test_rank_of_and_mixed_ranks():
    assert lora_ops.rank_of(adapter(3, 0)) == 3
    a = adapter(2, 0)
    a["m.l1.q.lora_A.weight"] = np.zeros((3, 4), np.float32)
    with pytest.raises(RankMismatchError):
        lora_ops.rank_of(a)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.pop("m.head.weight"), "missing"),
        (lambda a: a.update(extra=np.zeros(2, np.float32)), "unexpected"),
        (lambda a: a.update({"m.l0.q.lora_A.weight": np.zeros((3, 4), np.float32)}), "wrong rank"),
        (lambda a: a.update({"m.head.weight": np.zeros((3, 5), np.float32)}), "wrong shape"),
        (lambda a: a.update({"m.head.weight": np.zeros((3, 4), np.int32)}), "dtype"),
        (lambda a: a["m.head.weight"].__setitem__((0, 0), np.inf), "NaN or infinite"),
    ],
)
def test_check_same_layout(mutate, match):
    sent = adapter(2, 0)
    got = {k: v.copy() for k, v in sent.items()}
    mutate(got)
    with pytest.raises(InvalidUpdateError, match=match):
        lora_ops.check_same_layout(got, sent, node_id=7)


def test_scale_rules():
    assert LoraSpec(alpha=16).scale(8) == 2.0
    assert LoraSpec(alpha=16, rslora=True).scale(16) == 4.0
    with pytest.raises(ValueError):
        LoraSpec(alpha=0)
    with pytest.raises(ValueError):
        LoraSpec().scale(0)


def test_pad_rank():
    a, b = np.ones((2, 4), np.float32), np.ones((5, 2), np.float32)
    ap, bp = lora_ops.pad_rank(a, b, 4)
    assert ap.shape == (4, 4) and bp.shape == (5, 4)
    np.testing.assert_array_equal(bp @ ap, b @ a)
    with pytest.raises(RankMismatchError):
        lora_ops.pad_rank(ap, bp, 2)


def test_weighted_sum_is_the_same_whatever_order_the_replies_arrive_in():
    """A float32 running sum depends on the order; the aggregate must not (a resumed run re-aggregates them)."""
    rng = np.random.default_rng(0)
    xs = [(rng.standard_normal((64, 64)) * 10.0**e).astype(np.float32) for e in (-3, 0, 2, -1, 1)]
    w = rng.dirichlet(np.ones(len(xs)))
    first = lora_ops.weighted_sum(xs, w)
    assert first.dtype == np.float32
    np.testing.assert_allclose(first, np.einsum("i,ijk->jk", w, np.stack(xs).astype(np.float64)), rtol=1e-6, atol=1e-9)
    for perm in ([4, 3, 2, 1, 0], [2, 0, 4, 1, 3], [1, 4, 0, 3, 2]):
        np.testing.assert_array_equal(lora_ops.weighted_sum([xs[i] for i in perm], w[perm]), first)
