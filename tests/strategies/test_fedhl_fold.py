"""FedHL's deferred fold: the next version's SVD is taken matrix-free, the O(d²·Σr) fold runs in a thread.

Everything must equal the inline route (fold first, then the dense randomized SVD) to float
rounding: the dispatched factors, the truncation errors, the global W, and a checkpoint
taken while a change is still pending.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from corolla.strategies import ClientUpdate, FedHL, LoraSpec, lora_ops

#: a tall layer (96 × 80) and a wide one (72 × 112: svd_lowrank's transposed branch), big enough that `auto` is randomized
SHAPES = {"m.l0.q": (96, 80), "m.l1.v": (72, 112)}
MAX_RANK = 8
LORA = LoraSpec(alpha=16)
REAL_PAYS = lora_ops.matrix_free_pays


@pytest.fixture(autouse=True)
def matrix_free_everywhere(monkeypatch):
    """These layers are small enough that folding first is cheaper (`matrix_free_pays`); take the 4096² route anyway."""
    monkeypatch.setattr(lora_ops, "matrix_free_pays", lambda shape, k, niter=2: True)


def start(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for layer, (d_out, d_in) in SHAPES.items():
        out[f"{layer}.lora_A.weight"] = rng.normal(size=(MAX_RANK, d_in)).astype(np.float32)
        out[f"{layer}.lora_B.weight"] = np.zeros((d_out, MAX_RANK), np.float32)
    out["m.head.weight"] = rng.normal(size=(3, 80)).astype(np.float32)
    return out


def trained(d, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + 0.3 * rng.normal(size=v.shape)).astype(np.float32) for k, v in d.arrays.items()}


def run(fold: str, versions: int = 4, ranks=(2, 4, 8, 8, 3), stale: bool = True, **kw):
    """Several versions of mixed-rank updates (one stale update per version); every dispatch and W along the way."""
    agg = FedHL(start(), LORA, max_rank=MAX_RANK, fold=fold, **kw)
    agg.keep_versions = 2
    trail, held = [], None
    for v in range(versions):
        sent = [agg.dispatch(r) for r in ranks]
        trail.append(sent)
        updates = [ClientUpdate(node_id=i, arrays=trained(d, 100 * v + i), sent=d, num_examples=10 + i)
                   for i, d in enumerate(sent)]
        if stale and held is not None:
            updates.append(held)
        held = ClientUpdate(node_id=99, arrays=trained(sent[0], 7 + v), sent=sent[0], num_examples=4)
        agg.aggregate(updates)
    return agg, trail


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖_F / ‖b‖_F."""
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def same_svd(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, want: lora_ops.TopSVD) -> None:
    """Equal to float rounding: singular values to 1e-5 of σ_max; each singular pair to 1e-4 of its own norm.

    The two routes sum the same products in another order, so entries differ by rounding that the SVD
    amplifies by 1/gap; a pair is unique up to its sign, which such rounding may flip.
    """
    assert float((s - want.s).abs().max()) <= 1e-5 * float(want.s[0])
    sign = torch.sign((u * want.u).sum(0))
    assert float(torch.linalg.norm(u * sign - want.u, dim=0).max()) < 1e-4
    assert float(torch.linalg.norm(vh * sign[:, None] - want.vh, dim=1).max()) < 1e-4


def test_matrix_free_pays_on_large_layers_only():
    # 4096², q = 72: 2·3·2·8192·72 = 7.1 M flops per returned column against the fold's 2·4096² = 33.6 M
    assert REAL_PAYS((4096, 4096), 64) and REAL_PAYS((1024, 4096), 64)
    # 512², q = 72: 2·3·2·1024·72 = 0.88 M against 0.52 M: fold first
    assert not REAL_PAYS((512, 512), 64) and not REAL_PAYS((96, 80), 8)


def test_matrix_free_svd_is_the_dense_randomized_svd_of_the_sum():
    rng = np.random.default_rng(1)
    for d_out, d_in in SHAPES.values():
        w = torch.from_numpy(rng.normal(size=(d_out, d_in)).astype(np.float32))
        terms = [(float(c), rng.normal(size=(d_out, r)).astype(np.float32), rng.normal(size=(r, d_in)).astype(np.float32))
                 for c, r in ((0.5, 3), (-1.5, 8), (2.0, 1))]
        dense = w.clone()
        lora_ops.add_products(dense, terms)
        want = lora_ops.top_svd(dense, MAX_RANK, "randomized", seed=3)
        u, s, vh = lora_ops.top_svd_of_sum(w, terms, MAX_RANK, seed=3)
        same_svd(u, s, vh, want)
        torch.testing.assert_close(w, w.clone())  # W itself untouched


@pytest.mark.parametrize("svd_start", ["random", "warm"])
def test_background_fold_equals_inline_fold_dispatch_by_dispatch(svd_start):
    inline, trail_inline = run("inline", svd_start=svd_start)
    background, trail_bg = run("background", svd_start=svd_start)
    for sent_i, sent_b in zip(trail_inline, trail_bg):
        for d_i, d_b in zip(sent_i, sent_b):
            for k in d_i.arrays:
                np.testing.assert_allclose(d_b.arrays[k], d_i.arrays[k], rtol=1e-3, atol=1e-4)
            # made before their version's fold ended, filled in by it
            assert (d_b.truncation_error, d_b.relative_error) == pytest.approx(
                (d_i.truncation_error, d_i.relative_error), rel=1e-4, abs=1e-6)
    for layer in SHAPES:  # four versions of float32 rounding apart (different but equal products), nothing more
        assert close(background.w[layer], inline.w[layer]) < 1e-5
    assert trail_inline[-1][0].truncation_error > 0  # the route was exercised: W is past rank 8 and the errors are not zero


def test_a_dispatch_made_during_the_fold_gets_its_truncation_error_once_it_is_done():
    agg, _ = run("background", versions=2)
    d = agg.dispatch(2)  # the first dispatch of the version: SVD matrix-free, fold started
    assert agg._fold_thread is not None or not np.isnan(d.truncation_error)
    agg.settle()
    assert np.isfinite(d.truncation_error) and 0 <= d.relative_error <= 1
    again = agg.dispatch(2)
    assert again is d and again.truncation_error == d.truncation_error


def test_a_checkpoint_with_a_change_pending_resumes_to_the_same_model():
    inline, _ = run("inline", versions=2)
    agg, _ = run("background", versions=2)
    assert agg._pending  # aggregated, not yet folded (no dispatch since)
    restored = pickle.loads(pickle.dumps(agg))
    for layer in SHAPES:
        assert close(restored.w[layer], inline.w[layer]) < 1e-5
    again = pickle.loads(pickle.dumps(restored))  # a second round trip: nothing of the thread or lock travels
    assert again.dispatch(4).rank == 4


def test_a_failed_fold_is_an_error_not_a_silently_stale_model(monkeypatch):
    agg, _ = run("background", versions=1)

    def broken(w, terms):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(agg, "_add_products", broken)
    agg.dispatch(2)
    with pytest.raises(Exception, match="folding the last change into W failed: out of memory"):
        agg.settle()


def test_warm_started_matrix_free_svd_is_the_dense_warm_started_svd_of_the_sum():
    rng = np.random.default_rng(5)
    for d_out, d_in in SHAPES.values():
        w = torch.from_numpy(rng.normal(size=(d_out, d_in)).astype(np.float32))
        terms = [(0.7, rng.normal(size=(d_out, 4)).astype(np.float32), rng.normal(size=(4, d_in)).astype(np.float32))]
        start = lora_ops.warm_start(lora_ops.top_svd(w, MAX_RANK, "randomized", seed=1), (d_out, d_in))
        assert start.shape == ((d_in if d_out >= d_in else d_out), MAX_RANK)  # V for tall layers, U for wide ones
        dense = w.clone()
        lora_ops.add_products(dense, terms)
        want = lora_ops.top_svd(dense, MAX_RANK, "randomized", seed=3, start=start, niter=0)
        u, s, vh = lora_ops.top_svd_of_sum(w, terms, MAX_RANK, seed=3, start=start, niter=0)
        same_svd(u, s, vh, want)


def drifting(k: int = 8, d: tuple[int, int] = (300, 200), versions: int = 6, seed: int = 0) -> list[torch.Tensor]:
    """W_t of a run: a slowly decaying rank-k signal over a full-rank tail, each version adding a smaller change.

    The tail is heavy enough that a random start without power iterations misses ~30 % of the top-k energy.
    """
    rng = np.random.default_rng(seed)
    spectrum = 10.0 * 0.9 ** np.arange(k)
    w = rng.normal(size=(d[0], k)) * spectrum @ rng.normal(size=(k, d[1])) / np.sqrt(d[0] * d[1]) * 30
    w += 2.0 * rng.normal(size=d)
    out = [w]
    for t in range(1, versions):
        change = (rng.normal(size=(d[0], 16)) @ rng.normal(size=(16, d[1])) + rng.normal(size=d)) * 0.1 / t
        w = w + change
        out.append(w)
    return [torch.from_numpy(x.astype(np.float32)) for x in out]


def captured(svd: lora_ops.TopSVD, w: torch.Tensor, k: int) -> float:
    """Energy of W on the found rank-k subspace over the exact top-k energy (1: the best rank-k approximation)."""
    best = float((torch.linalg.svdvals(w.double())[:k] ** 2).sum())
    return float(torch.linalg.norm(svd.u[:, :k].T.double() @ w.double()) ** 2) / best


def test_a_warm_start_finds_the_top_subspace_with_2_products_as_well_as_a_random_start_does_with_6():
    ws, k = drifting(), MAX_RANK
    prev = lora_ops.top_svd(ws[0], k, "exact")
    for t, w in enumerate(ws[1:], start=1):
        warm = lora_ops.top_svd(w, k, "randomized", seed=t, start=lora_ops.warm_start(prev, tuple(w.shape)), niter=0)
        cold = lora_ops.top_svd(w, k, "randomized", seed=t, niter=2)
        cold0 = lora_ops.top_svd(w, k, "randomized", seed=t, niter=0)
        assert captured(warm, w, k) > 0.9999 and captured(warm, w, k) >= captured(cold, w, k) - 1e-4
        assert captured(cold0, w, k) < captured(warm, w, k) - 0.2  # the start is what does it, not luck
        assert warm.tail_energy(k) == pytest.approx(float((w.double() ** 2).sum()) - float((warm.s.double() ** 2).sum()))
        prev = warm


def test_fedhl_warm_start_is_used_from_the_second_version_and_never_from_a_dead_subspace():
    agg = FedHL(start(), LORA, max_rank=MAX_RANK, svd_start="warm")
    assert agg._start("m.l0.q") == (None, 2)  # version 0: nothing before it
    d = agg.dispatch(8)  # W = 0: every direction dead
    agg.aggregate([ClientUpdate(node_id=1, arrays=trained(d, 1), sent=d, num_examples=10)])
    assert agg._start("m.l0.q") == (None, 2)  # version 0's SVD of W = 0 is no start
    d = agg.dispatch(8)
    agg.aggregate([ClientUpdate(node_id=1, arrays=trained(d, 2), sent=d, num_examples=10)])
    warm, niter = agg._start("m.l0.q")
    assert niter == 0 and warm.shape == (80, MAX_RANK)  # tall 96 × 80: V
    assert agg.summary()["svd_start"] == "warm"
    with pytest.raises(ValueError, match="fedhl-svd-start"):
        FedHL(start(), LORA, svd_start="hot")
