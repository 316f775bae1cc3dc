"""Dispatches are built once per (version, rank), shared by every client of that pair, and read-only."""

import numpy as np
import pytest

from corolla.strategies import FedAvg, FedHL, LoraSpec
from corolla.strategies.flora import FLoRA
from corolla.strategies.hetlora import HetLoRA
from tests.strategies.helpers import adapter, perturbed, update

MAKERS = {
    "fedavg": (lambda: FedAvg(adapter(4, 0), LoraSpec()), (4, 4)),
    "fedhl": (lambda: FedHL(adapter(4, 0, b_zero=True), LoraSpec(), max_rank=4), (2, 4)),
    "hetlora": (lambda: HetLoRA(adapter(4, 0), LoraSpec(), max_rank=4), (2, 4)),
    "flora": (lambda: FLoRA(adapter(4, 0, b_zero=True), LoraSpec(), max_rank=4), (2, 4)),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_one_read_only_dispatch_per_version_and_rank(name):
    make, (r1, r2) = MAKERS[name]
    agg = make()
    first = agg.dispatch(r1)
    assert agg.dispatch(r1) is first  # a second client of the same version and rank shares it
    if r2 != r1:
        assert agg.dispatch(r2) is not first and agg.dispatch(r2).rank == r2
    for arr in (*first.arrays.values(), *first.frozen.values()):
        with pytest.raises(ValueError, match="read-only"):
            arr[...] = 0.0
    kept = {k: v.copy() for k, v in first.arrays.items()}
    agg.aggregate([update(1, first, perturbed(first, 1))])
    second = agg.dispatch(r1)
    assert second is not first and second.version == first.version + 1
    assert len(agg._dispatches) == 1  # only the current version is cached; in-flight jobs hold older ones
    for k, v in kept.items():  # what the first clients were sent is untouched by the aggregation
        np.testing.assert_array_equal(first.arrays[k], v)
