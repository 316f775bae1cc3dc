"""FedHL's weighting rules: the paper's fixed-ε rule is not scale-invariant; the relative rules are."""

import numpy as np
import pytest
import torch

from corolla.strategies import FedHL, LoraSpec
from corolla.strategies.fedhl import EPSILON_RELATIVE
from tests.strategies.helpers import LAYERS, adapter, perturbed, update


def grown(scale: float, weighting: str) -> FedHL:
    """A FedHL whose W has a decaying spectrum, scaled so that ‖W‖_F² is proportional to `scale`²."""
    agg = FedHL(adapter(4, 0, b_zero=True), LoraSpec(alpha=4), max_rank=4, weighting=weighting, svd="exact")
    rng = np.random.default_rng(1)
    for layer in LAYERS:
        u, _ = np.linalg.qr(rng.normal(size=(5, 4)))
        v, _ = np.linalg.qr(rng.normal(size=(4, 4)))
        w = scale * (u * np.array([1.0, 0.5, 0.25, 0.125])) @ v.T
        agg.w[layer].copy_(torch.from_numpy(w.astype(np.float32)))
    return agg


def weights_by_rank(agg: FedHL, ranks=(1, 2, 4), n=(10, 10, 10)) -> np.ndarray:
    ups = []
    for i, (r, k) in enumerate(zip(ranks, n)):
        d = agg.dispatch(r)
        ups.append(update(i, d, perturbed(d, i), n=k))
    return agg.weights(ups).lora


def test_paper_rule_collapses_as_w_grows():
    """The issue's measurement: uniform at small ‖W‖, nearly all weight on the top rank once ‖W‖ grows."""
    small = weights_by_rank(grown(1e-2, "truncation"))
    large = weights_by_rank(grown(1.0, "truncation"))
    np.testing.assert_allclose(small, [1 / 3] * 3, atol=1e-3)
    assert large[2] > 0.97


@pytest.mark.parametrize("weighting", ["relative", "relative-examples"])
def test_relative_rules_are_scale_invariant(weighting):
    ref = weights_by_rank(grown(1.0, weighting))
    for scale in (1e-3, 1e-1, 10.0):
        np.testing.assert_allclose(weights_by_rank(grown(scale, weighting)), ref, rtol=1e-5)


def test_relative_weights_hand_computed():
    agg = grown(1.0, "relative")
    d = [agg.dispatch(r) for r in (1, 2, 4)]
    spectrum = np.array([1.0, 0.5, 0.25, 0.125]) ** 2
    rel = [spectrum[r:].sum() / spectrum.sum() for r in (1, 2, 4)]  # same in both layers
    np.testing.assert_allclose([x.relative_error for x in d], rel, rtol=1e-5)
    inv = 1 / (np.array(rel) ** 2 + EPSILON_RELATIVE)
    np.testing.assert_allclose(weights_by_rank(agg), inv / inv.sum(), rtol=1e-5)
    ex = grown(1.0, "relative-examples")
    inv_n = np.array([10, 30, 60]) / (np.array(rel) ** 2 + EPSILON_RELATIVE)
    np.testing.assert_allclose(weights_by_rank(ex, n=(10, 30, 60)), inv_n / inv_n.sum(), rtol=1e-5)


def test_relative_weights_are_uniform_at_version_zero_and_bad_names_refused():
    agg = FedHL(adapter(4, 0, b_zero=True), LoraSpec(), max_rank=4, weighting="relative")
    np.testing.assert_allclose(weights_by_rank(agg), [1 / 3] * 3)
    with pytest.raises(ValueError, match="`fedhl-weighting` must be one of"):
        FedHL(adapter(4, 0), LoraSpec(), max_rank=4, weighting="oracle")
