"""HetLoRA, FlexLoRA and FLoRA against hand-computed cases and the style guide's equivalences."""

import numpy as np
import pytest
import torch

from corolla.strategies import AGGREGATORS, FlexLoRA, FLoRA, HetLoRA, LoraSpec, RankMismatchError, lora_ops
from corolla.strategies.hetlora import norm_weights
from tests.strategies.helpers import LAYERS, adapter, perturbed, update


def test_registry_names():
    assert sorted(AGGREGATORS) == ["fedavg", "fedhl", "fedmedian", "fedsvd", "fedtrimmedavg", "ffa", "flexlora", "flora",
                                   "hetlora"]


def test_hetlora_norm_weights_hand_computed():
    np.testing.assert_allclose(norm_weights([1.0, 3.0]), [0.25, 0.75])
    np.testing.assert_allclose(norm_weights([0.0, 0.0]), [0.5, 0.5])


def test_hetlora_pads_weights_and_truncates():
    init = adapter(4, 0)
    agg = HetLoRA(init, LoraSpec(alpha=4), max_rank=4)
    d1, d4 = agg.dispatch(1), agg.dispatch(4)
    k = LAYERS[0]
    np.testing.assert_array_equal(d1.arrays[f"{k}.lora_A.weight"], init[f"{k}.lora_A.weight"][:1])
    np.testing.assert_array_equal(d1.arrays[f"{k}.lora_B.weight"], init[f"{k}.lora_B.weight"][:, :1])
    o1, o4 = perturbed(d1, 1), perturbed(d4, 2)
    w = agg.aggregate([update(1, d1, o1), update(2, d4, o4)])
    norm = [np.sqrt(sum(np.sum(lora_ops.delta(o[f"{k}.lora_A.weight"], o[f"{k}.lora_B.weight"], 4 / r) ** 2)
                        for k in LAYERS)) for o, r in ((o1, 1), (o4, 4))]
    np.testing.assert_allclose(w.lora, np.array(norm) / sum(norm), rtol=1e-5)
    a_g = agg.factors[k][0]
    np.testing.assert_allclose(a_g[0], w.lora[0] * o1[f"{k}.lora_A.weight"][0] + w.lora[1] * o4[f"{k}.lora_A.weight"][0],
                               rtol=1e-5)
    np.testing.assert_allclose(a_g[1:], w.lora[1] * o4[f"{k}.lora_A.weight"][1:], rtol=1e-5)  # zero pads shrink
    with pytest.raises(RankMismatchError):
        agg.dispatch(5)


def test_flexlora_single_client_reproduces_its_delta_w():
    agg = FlexLoRA(adapter(4, 0, b_zero=True), LoraSpec(alpha=8), max_rank=4)
    d = agg.dispatch(2)
    out = perturbed(d, 3)
    agg.aggregate([update(1, d, out)])
    for k in LAYERS:
        expected = lora_ops.delta(out[f"{k}.lora_A.weight"], out[f"{k}.lora_B.weight"], 4.0)
        np.testing.assert_allclose(agg.merged().deltas[k], expected, atol=1e-5)
        d2 = agg.dispatch(2)  # rank-2 ΔW: its rank-2 SVD split is exact
        np.testing.assert_allclose(
            lora_ops.delta(d2.arrays[f"{k}.lora_A.weight"], d2.arrays[f"{k}.lora_B.weight"], 4.0), expected, atol=1e-4)


def test_flexlora_replaces_with_example_weighted_delta_w():
    agg = FlexLoRA(adapter(4, 0, b_zero=True), LoraSpec(alpha=8), max_rank=4)
    d1, d4 = agg.dispatch(1), agg.dispatch(4)
    o1, o4 = perturbed(d1, 1), perturbed(d4, 2)
    agg.aggregate([update(1, d1, o1, n=30), update(2, d4, o4, n=10)])
    for k in LAYERS:
        dw = [lora_ops.delta(o[f"{k}.lora_A.weight"], o[f"{k}.lora_B.weight"], 8 / r) for o, r in ((o1, 1), (o4, 4))]
        np.testing.assert_allclose(agg.merged().deltas[k], 0.75 * dw[0] + 0.25 * dw[1], atol=1e-5)


def test_flora_sends_fresh_lora_and_frozen_merge():
    init = adapter(4, 0, b_zero=True)
    agg = FLoRA(init, LoraSpec(alpha=8), max_rank=4)
    agg.w[LAYERS[0]] += 1.0
    d = agg.dispatch(2)
    k = LAYERS[0]
    assert not d.arrays[f"{k}.lora_B.weight"].any()
    np.testing.assert_array_equal(d.arrays[f"{k}.lora_A.weight"], init[f"{k}.lora_A.weight"][:2])
    np.testing.assert_array_equal(d.frozen[f"{k}.base_delta"], agg.w[k].numpy())
    assert set(d.frozen) == {f"{layer}.base_delta" for layer in LAYERS}


def test_flora_merge_equals_stacked_product():
    agg = FLoRA(adapter(4, 0, b_zero=True), LoraSpec(alpha=8), max_rank=4)
    before = {k: v.clone() for k, v in agg.w.items()}
    d1, d2 = agg.dispatch(1), agg.dispatch(3)
    o1, o2 = perturbed(d1, 1), perturbed(d2, 2)
    agg.aggregate([update(1, d1, o1, n=10), update(2, d2, o2, n=30)])
    for k in LAYERS:
        p = [0.25, 0.75]
        s = [8.0, 8 / 3]
        # FLoRA's stacking: B_stack = [p1 s1 B1, p2 s2 B2], A_stack = [A1; A2]
        b_stack = np.concatenate([p[0] * s[0] * o1[f"{k}.lora_B.weight"], p[1] * s[1] * o2[f"{k}.lora_B.weight"]], 1)
        a_stack = np.concatenate([o1[f"{k}.lora_A.weight"], o2[f"{k}.lora_A.weight"]], 0)
        torch.testing.assert_close(agg.w[k], before[k] + torch.from_numpy(b_stack @ a_stack), atol=1e-5, rtol=0)
