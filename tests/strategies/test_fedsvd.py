"""FFA-LoRA and FedSVD against hand-computed numbers: B averaged on a fixed A, B·A re-factorized by SVD."""

from __future__ import annotations

import numpy as np
import pytest

from corolla.config import ConfigError, RunConfig
from corolla.spec import LoraSpec
from corolla.strategies.exceptions import InvalidUpdateError
from corolla.strategies.fedsvd import FedSVD, FrozenA, refactorize
from tests.strategies.helpers import LAYERS, adapter, update

RANK = 3


def test_refactorize_matches_the_svd_of_the_product():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(RANK, 7)).astype(np.float32), rng.normal(size=(6, RANK)).astype(np.float32)
    a2, b2 = refactorize(a, b)
    product = b.astype(np.float64) @ a.astype(np.float64)
    np.testing.assert_allclose(b2 @ a2, product, rtol=1e-5, atol=1e-5)  # the model is unchanged
    np.testing.assert_allclose(a2 @ a2.T, np.eye(RANK), atol=1e-5)  # A' has orthonormal rows
    u, s, vt = np.linalg.svd(product)  # by hand: A' = the top-r right singular vectors (up to sign), B' = U Σ
    np.testing.assert_allclose(np.abs(a2 @ vt[:RANK].T), np.eye(RANK), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(b2, axis=0), s[:RANK], rtol=1e-5)
    np.testing.assert_allclose(np.abs(b2), np.abs(u[:, :RANK] * s[:RANK]), rtol=1e-4, atol=1e-5)


def test_refactorize_keeps_a_rank_deficient_product():
    a = np.random.default_rng(1).normal(size=(RANK, 5)).astype(np.float32)
    b = np.zeros((4, RANK), np.float32)  # peft's B = 0: ΔW = 0
    a2, b2 = refactorize(a, b)
    assert np.allclose(b2 @ a2, 0) and np.allclose(a2 @ a2.T, np.eye(RANK), atol=1e-5)


def _round(agg, updates_b: list[np.ndarray], counts: list[int]):
    d = agg.dispatch(RANK)
    ups = []
    for i, (db, n) in enumerate(zip(updates_b, counts)):
        arrays = dict(d.arrays)
        for layer in LAYERS:
            arrays[f"{layer}.lora_B.weight"] = d.arrays[f"{layer}.lora_B.weight"] + db
        ups.append(update(i + 1, d, arrays, n=n))
    agg.aggregate(ups)
    return d


def test_fedsvd_step_is_the_averaged_b_times_the_old_a_then_refactorized():
    agg = FedSVD(adapter(RANK, seed=2), LoraSpec())
    rng = np.random.default_rng(3)
    dbs = [rng.normal(size=(5, RANK)).astype(np.float32) for _ in range(2)]
    d = _round(agg, dbs, counts=[10, 30])
    s = LoraSpec().scale(RANK)
    for layer in LAYERS:
        a0, b0 = d.arrays[f"{layer}.lora_A.weight"], d.arrays[f"{layer}.lora_B.weight"]
        b_avg = b0 + 0.25 * dbs[0] + 0.75 * dbs[1]  # example-count weights 10 : 30
        np.testing.assert_allclose(agg.merged().deltas[layer], s * b_avg @ a0, rtol=1e-4, atol=1e-5)
        a_new, _ = agg.factors[layer]
        np.testing.assert_allclose(a_new @ a_new.T, np.eye(RANK), atol=1e-5)  # the next round trains on Vᵀ


def test_ffa_keeps_a_for_good():
    init = adapter(RANK, seed=4)
    agg = FrozenA(init, LoraSpec())
    rng = np.random.default_rng(5)
    for _ in range(3):
        _round(agg, [rng.normal(size=(5, RANK)).astype(np.float32)], counts=[1])
    for layer in LAYERS:
        np.testing.assert_array_equal(agg.factors[layer][0], init[f"{layer}.lora_A.weight"])


def test_a_site_that_trained_a_is_rejected_but_bfloat16_rounding_is_not():
    agg = FrozenA(adapter(RANK, seed=6), LoraSpec())
    d = agg.dispatch(RANK)
    key = f"{LAYERS[0]}.lora_A.weight"
    moved = {**d.arrays, key: d.arrays[key] + np.float32(0.1)}
    with pytest.raises(InvalidUpdateError, match="must keep frozen"):
        agg.check(update(1, d, moved))
    rounded = {**d.arrays, key: (d.arrays[key] * np.float32(1 + 2**-9)).astype(np.float32)}
    agg.aggregate([update(1, d, rounded)])  # accepted, and its rounding never reaches the global A
    np.testing.assert_array_equal(agg.factors[LAYERS[0]][0], d.arrays[key])


@pytest.mark.parametrize("keys, words", [
    ({"aggregation": "fedsvd", "server-optimizer": "fedadam"}, "use server-optimizer=sgd"),
    ({"aggregation": "fedsvd", "mode": "async"}, "fedsvd"),
    ({"aggregation": "ffa", "mode": "async"}, "ffa"),
])
def test_what_frozen_a_refuses(keys, words):
    with pytest.raises(ConfigError, match=words):
        RunConfig.from_mapping(keys)


def test_dp_accepts_the_frozen_a_aggregators():
    for name in ("ffa", "fedsvd"):
        assert RunConfig.from_mapping({"dp": "central", "aggregation": name}).privacy().enabled
