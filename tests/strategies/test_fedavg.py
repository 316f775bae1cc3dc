import numpy as np
import pytest

from corolla.strategies import AggregationError, FedAvg, InvalidUpdateError, LoraSpec, RankMismatchError
from corolla.strategies.server_opt import ServerSGD, ServerSGDConfig
from tests.strategies.helpers import LAYERS, adapter, perturbed, update


def test_fedavg_equals_example_weighted_average():
    agg = FedAvg(adapter(2, 0), LoraSpec(alpha=4))
    d = agg.dispatch(2)
    a1, a2 = perturbed(d, 1), perturbed(d, 2)
    w = agg.aggregate([update(1, d, a1, n=10), update(2, d, a2, n=30)])
    np.testing.assert_allclose(w.lora, [0.25, 0.75])
    new = agg.dispatch(2).arrays
    for k in d.arrays:
        np.testing.assert_allclose(new[k], np.average([a1[k], a2[k]], axis=0, weights=[10, 30]), rtol=1e-5, atol=1e-6)
    assert agg.version == 1


def test_fedavg_server_lr_moves_part_of_the_way():
    agg = FedAvg(adapter(2, 0), LoraSpec(alpha=4))
    agg.optimizer = ServerSGD(ServerSGDConfig(lr=0.5))
    d = agg.dispatch(2)
    a1 = perturbed(d, 1)
    agg.aggregate([update(1, d, a1)])
    k = f"{LAYERS[0]}.lora_A.weight"
    np.testing.assert_allclose(agg.dispatch(2).arrays[k], d.arrays[k] + 0.5 * (a1[k] - d.arrays[k]), rtol=1e-6)


def test_fedavg_merged_delta_uses_alpha_over_rank():
    init = adapter(2, 0)
    agg = FedAvg(init, LoraSpec(alpha=4))
    k = LAYERS[1]
    expected = 2.0 * init[f"{k}.lora_B.weight"] @ init[f"{k}.lora_A.weight"]  # s = 4 / 2
    np.testing.assert_allclose(agg.merged().deltas[k], expected, rtol=1e-6)
    np.testing.assert_array_equal(agg.merged().dense["m.head.weight"], init["m.head.weight"])


def test_fedavg_refuses_other_ranks():
    agg = FedAvg(adapter(2, 0), LoraSpec())
    with pytest.raises(RankMismatchError, match="aggregation=fedhl"):
        agg.dispatch(4)
    other = FedAvg(adapter(4, 0), LoraSpec()).dispatch(4)
    with pytest.raises(RankMismatchError, match="rank 4"):
        agg.aggregate([update(1, other, perturbed(other, 1))])
    assert agg.version == 0


def test_fedavg_rejects_bad_updates_without_touching_state():
    agg = FedAvg(adapter(2, 0), LoraSpec())
    d = agg.dispatch(2)
    before = agg.merged().deltas
    bad = perturbed(d, 1)
    bad[f"{LAYERS[0]}.lora_A.weight"][0, 0] = np.nan
    with pytest.raises(InvalidUpdateError, match="NaN"):
        agg.aggregate([update(1, d, perturbed(d, 2)), update(2, d, bad)])
    missing = perturbed(d, 1)
    del missing["m.head.weight"]
    with pytest.raises(InvalidUpdateError, match="missing"):
        agg.aggregate([update(1, d, missing)])
    for k, v in before.items():
        np.testing.assert_array_equal(agg.merged().deltas[k], v)
    assert agg.version == 0


@pytest.mark.parametrize("counts", [[], [0, 0]])
def test_fedavg_needs_positive_examples(counts):
    agg = FedAvg(adapter(2, 0), LoraSpec())
    d = agg.dispatch(2)
    with pytest.raises(AggregationError):
        agg.aggregate([update(i, d, perturbed(d, i), n=n) for i, n in enumerate(counts)])
