import numpy as np
import pytest
import torch

from corolla.strategies import FedHL, InvalidUpdateError, LoraSpec, lora_ops
from corolla.strategies.fedhl import truncation_weights
from tests.strategies.helpers import D_IN, D_OUT, LAYERS, adapter, perturbed, update


def orthonormal(n: int, k: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, k)))
    return q


def fedhl_with_w(sigmas, alpha=8.0, rslora=False, weighting="truncation", max_rank=4, svd="exact") -> FedHL:
    """A FedHL whose global W per layer has the given singular values."""
    agg = FedHL(adapter(max_rank, 0, b_zero=True), LoraSpec(alpha=alpha, rslora=rslora), weighting=weighting,
                max_rank=max_rank, svd=svd)
    for i, layer in enumerate(LAYERS):
        u, v = orthonormal(D_OUT, len(sigmas), i), orthonormal(D_IN, len(sigmas), 10 + i)
        agg.w[layer] = torch.from_numpy((u * np.asarray(sigmas)) @ v.T).float()
    return agg


def test_truncation_weights_hand_computed():
    p = truncation_weights([0.0, 1.0])
    inv = np.array([1 / 1e-6, 1 / (1 + 1e-6)])
    np.testing.assert_allclose(p, inv / inv.sum())
    np.testing.assert_allclose(truncation_weights([0.0, 0.0, 0.0]), [1 / 3] * 3)
    p = truncation_weights([2.0, 1.0])  # 1/4 vs 1/1 -> 0.2, 0.8
    np.testing.assert_allclose(p, [0.2, 0.8], rtol=1e-5)


@pytest.mark.parametrize("rank,expected", [(1, 2 * (4 + 1)), (2, 2 * 1), (3, 0.0), (4, 0.0)])
def test_truncation_error_is_sum_of_dropped_sigma_squared(rank, expected):
    agg = fedhl_with_w([3.0, 2.0, 1.0])
    assert agg.dispatch(rank).truncation_error == pytest.approx(expected, abs=1e-4)  # two layers


@pytest.mark.parametrize("rank", [1, 2, 3, 4])
@pytest.mark.parametrize("alpha,rslora", [(8.0, False), (16.0, False), (4.0, True)])
def test_dispatch_reproduces_truncated_w_at_every_rank(rank, alpha, rslora):
    agg = fedhl_with_w([3.0, 2.0, 1.0, 0.5], alpha=alpha, rslora=rslora)
    d = agg.dispatch(rank)
    s = LoraSpec(alpha=alpha, rslora=rslora).scale(rank)
    for layer in LAYERS:
        u, sig, vh = np.linalg.svd(agg.w[layer].numpy())
        w_r = (u[:, :rank] * sig[:rank]) @ vh[:rank]
        got = lora_ops.delta(d.arrays[f"{layer}.lora_A.weight"], d.arrays[f"{layer}.lora_B.weight"], s)
        np.testing.assert_allclose(got, w_r, atol=1e-5)


def test_round_zero_dispatch_is_peft_initialisation():
    init = adapter(4, 3, b_zero=True)
    agg = FedHL(init, LoraSpec(alpha=8), max_rank=4)
    d = agg.dispatch(2)
    for layer in LAYERS:
        np.testing.assert_array_equal(d.arrays[f"{layer}.lora_A.weight"], init[f"{layer}.lora_A.weight"][:2])
        assert not d.arrays[f"{layer}.lora_B.weight"].any()
    assert d.truncation_error == 0.0


def test_full_rank_clients_equal_weighted_fedavg_of_delta_w():
    agg = fedhl_with_w([3.0, 2.0, 1.0, 0.5], weighting="examples")
    w0 = {k: v.clone().numpy() for k, v in agg.w.items()}
    ds = [agg.dispatch(4) for _ in range(3)]
    outs = [perturbed(d, i) for i, d in enumerate(ds)]
    n = [5, 10, 25]
    agg.aggregate([update(i, d, o, n=k) for i, (d, o, k) in enumerate(zip(ds, outs, n))])
    s = agg.lora.scale(4)
    for layer in LAYERS:
        dws = [lora_ops.delta(o[f"{layer}.lora_A.weight"], o[f"{layer}.lora_B.weight"], s) for o in outs]
        np.testing.assert_allclose(agg.w[layer].numpy(), np.average(dws, axis=0, weights=n), atol=1e-5)
        # at full rank every client started from W itself
        np.testing.assert_allclose(
            lora_ops.delta(ds[0].arrays[f"{layer}.lora_A.weight"], ds[0].arrays[f"{layer}.lora_B.weight"], s),
            w0[layer], atol=1e-5)


def test_unchanged_client_leaves_w_unchanged():
    agg = fedhl_with_w([3.0, 2.0, 1.0])
    before = {k: v.clone() for k, v in agg.w.items()}
    d = agg.dispatch(1)
    agg.aggregate([update(1, d, {k: v.copy() for k, v in d.arrays.items()})])
    for k in LAYERS:
        torch.testing.assert_close(agg.w[k], before[k], atol=1e-5, rtol=0)


def test_components_above_client_rank_survive():
    agg = fedhl_with_w([3.0, 2.0, 1.0])
    before = {k: v.clone().numpy() for k, v in agg.w.items()}
    d = agg.dispatch(1)
    out = perturbed(d, 7, scale=0.5)
    agg.aggregate([update(1, d, out)])
    s = agg.lora.scale(1)
    for layer in LAYERS:
        u, sig, vh = np.linalg.svd(before[layer])
        tail = (u[:, 1:3] * sig[1:3]) @ vh[1:3]
        # one client, p = 1: W' = W + (s B'A' - W^(1)) = tail + s B'A'. What rank 1 could not see is kept.
        trained = lora_ops.delta(out[f"{layer}.lora_A.weight"], out[f"{layer}.lora_B.weight"], s)
        np.testing.assert_allclose(agg.w[layer].numpy() - trained, tail, atol=1e-5)
        assert np.linalg.norm(tail) > 1.0  # the check is not vacuous


def test_weights_sum_to_one_and_favour_low_truncation_error():
    agg = fedhl_with_w([3.0, 2.0, 1.0])
    ds = [agg.dispatch(r) for r in (1, 2, 3)]
    w = agg.weights([update(i, d, perturbed(d, i)) for i, d in enumerate(ds)])
    assert w.lora.sum() == pytest.approx(1.0)
    assert w.lora[2] > w.lora[1] > w.lora[0]
    assert w.dense.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("weighting", ["uniform", "examples"])
def test_named_weighting_alternatives(weighting):
    agg = fedhl_with_w([3.0, 2.0, 1.0], weighting=weighting)
    ds = [agg.dispatch(1), agg.dispatch(3)]
    w = agg.weights([update(0, ds[0], perturbed(ds[0], 0), n=10), update(1, ds[1], perturbed(ds[1], 1), n=30)])
    np.testing.assert_allclose(w.lora, [0.5, 0.5] if weighting == "uniform" else [0.25, 0.75])


def test_wrong_rank_reply_is_rejected_and_w_untouched():
    agg = fedhl_with_w([3.0, 2.0, 1.0])
    before = {k: v.clone() for k, v in agg.w.items()}
    d2, d1 = agg.dispatch(2), agg.dispatch(1)
    with pytest.raises(InvalidUpdateError, match="wrong rank"):
        agg.aggregate([update(1, d1, perturbed(d1, 1)), update(2, d1, perturbed(d2, 2))])
    for k in LAYERS:
        assert torch.equal(agg.w[k], before[k])
    assert agg.version == 0


def test_randomized_svd_keeps_exact_tail_energy_and_start_point():
    rng = np.random.default_rng(0)
    agg = FedHL(adapter(4, 0, b_zero=True), LoraSpec(alpha=8), max_rank=4, svd="randomized")
    for layer in LAYERS:
        agg.w[layer] = torch.from_numpy(rng.normal(size=(D_OUT, D_IN))).float()
    d = agg.dispatch(2)
    exact = sum(float((np.linalg.svd(agg.w[k].numpy(), compute_uv=False)[2:] ** 2).sum()) for k in LAYERS)
    assert d.truncation_error == pytest.approx(exact, rel=1e-4)


def test_rank_above_max_rank_is_refused():
    agg = FedHL(adapter(4, 0, b_zero=True), LoraSpec(), max_rank=4)
    with pytest.raises(ValueError, match="max-rank"):
        agg.dispatch(8)
    with pytest.raises(ValueError, match="largest client rank"):
        FedHL(adapter(2, 0, b_zero=True), LoraSpec(), max_rank=4)
    with pytest.raises(ValueError, match="fedhl-weighting"):
        FedHL(adapter(2, 0, b_zero=True), LoraSpec(), weighting="bogus")


def test_compact_start_point_equals_stored_factors():
    """Rebuilding Σ p_i W^(r_i) from the version's SVD equals subtracting each client's stored start."""
    import copy

    agg = fedhl_with_w([3.0, 2.0, 1.0, 0.5])
    ds = [agg.dispatch(r) for r in (1, 2, 4, 2)]
    ups = [update(i, d, perturbed(d, i), n=5 + i) for i, d in enumerate(ds)]
    stored = copy.deepcopy(agg)
    stored._svds_by_version.clear()  # forces the per-client stored-factor path
    agg.aggregate(ups)
    stored.aggregate(ups)
    for k in LAYERS:
        torch.testing.assert_close(agg.w[k], stored.w[k], atol=1e-5, rtol=0)


def test_stale_update_uses_its_own_start_after_the_version_moved_on():
    agg = fedhl_with_w([3.0, 2.0, 1.0])
    d_old = agg.dispatch(2)
    out_old = perturbed(d_old, 1)
    d = agg.dispatch(2)
    agg.aggregate([update(0, d, perturbed(d, 0))])  # version 0 -> 1
    agg.dispatch(2)  # a freed client gets version 1; version 0's SVD is dropped (keep_versions = 1)
    assert list(agg._svds_by_version) == [1]
    before = {k: v.clone() for k, v in agg.w.items()}
    agg.aggregate([update(1, d_old, out_old)])
    s = agg.lora.scale(2)
    for k in LAYERS:
        dw = lora_ops.delta(out_old[f"{k}.lora_A.weight"], out_old[f"{k}.lora_B.weight"], s)
        start = lora_ops.delta(d_old.arrays[f"{k}.lora_A.weight"], d_old.arrays[f"{k}.lora_B.weight"], s)
        np.testing.assert_allclose(agg.w[k].numpy(), before[k].numpy() + dw - start, atol=1e-5)
