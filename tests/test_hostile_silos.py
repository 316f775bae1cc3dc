"""What one hostile site can do to a federation, on fakes: profiles bounded at join, two-site steps bounded.

A site's profile (rank, example count, memory, text) and every reply are its own claims. The
server bounds each before it allocates or weighs anything by it (server/nodes.py), and bounds
each reply by what the job's optimizer can do (`adam_change_bound`), which needs no crowd: a
two-site federation, the common cross-silo case, is held as firmly as a large one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from corolla.strategies.guard import adam_change_bound, excess_change
from tests.fakes import FakeNode, LyingNode
from tests.test_drivers import ASYNC, HEAD, SYNC, by_version, federation, lying_federation, task_identity  # noqa: F401

PROFILE_LIES = [
    (FakeNode(3, rank=math.inf), "profile declares `lora-rank` = inf, not an integer in [0, 65536]"),
    (FakeNode(3, rank=10**9), "profile declares `lora-rank` = 1000000000, not an integer in [0, 65536]"),
    (FakeNode(3, rank=2.5), "profile declares `lora-rank` = 2.5, not an integer in [0, 65536]"),
    (FakeNode(3, num_examples=10**15), "profile declares `num-examples` = 1000000000000000, not an integer in"),
    (FakeNode(3, device="x" * 10_000), "profile declares `device` that is not printable text of at most 256"),
    (FakeNode(3, fingerprint="a\nb"), "profile declares `model-fingerprint` that is not printable text"),
]


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("node3,reason", PROFILE_LIES, ids=["rank-inf", "rank-huge", "rank-fraction", "examples",
                                                             "device", "fingerprint"])
def test_a_profile_out_of_bounds_refuses_the_node_and_the_run_goes_on(tmp_path, mode, node3, reason):
    run = federation(tmp_path, [FakeNode(1, delay=1.0), FakeNode(2, delay=1.0), node3], SYNC if mode == "sync" else ASYNC)
    summary = run.run()

    rows = run.node_rows()
    assert rows[3]["status"] == "refused" and rows[3]["reason"].startswith(reason), rows[3]
    assert rows[3]["reason"].endswith("no corolla trainer reports this, so the node is not trusted")
    assert summary["versions"] == 3 and run.grid.train_jobs(3) == []


def test_fedavg_global_rank_comes_from_the_configuration_not_from_the_lowest_node(tmp_path):
    # node 1 joins first with rank 32: before, the lowest id's rank became the global rank and the honest were refused
    nodes = [FakeNode(1, rank=32), FakeNode(2, rank=2), FakeNode(3, rank=2)]
    run = federation(tmp_path, nodes, SYNC, **{"aggregation": "fedavg", "lora-rank": 2})
    summary = run.run()

    rows = run.node_rows()
    assert rows[1]["status"] == "refused" and "asked for rank 32 but the global adapter has rank 2" in rows[1]["reason"]
    assert rows[2]["status"] == rows[3]["status"] == "ok" and summary["versions"] == 3


def test_a_rank_above_max_rank_is_refused_before_anything_is_allocated(tmp_path):
    nodes = [FakeNode(1, rank=4096), FakeNode(2, rank=2), FakeNode(3, rank=2)]
    run = federation(tmp_path, nodes, SYNC, **{"max-rank": 32})
    summary = run.run()

    assert run.node_rows()[1]["reason"] == ("declares rank 4096, above the run's max-rank 32; start its trainer with "
                                            "--rank 32 or less, or raise max-rank")
    assert summary["versions"] == 3 and run.fed.aggregator.name == "fedavg"  # auto over the two servable nodes


def test_two_sites_a_rogue_claiming_a_huge_silo_gets_at_most_half_of_every_step(tmp_path):
    # it declares 10^12 examples at join (so its replies are not capped): FedAvg alone would give it all but 10^-11
    nodes = [FakeNode(1, num_examples=100, step=0.1), FakeNode(2, num_examples=10**12, step=0.3)]
    run = lying_federation(tmp_path, nodes, SYNC, **{"clients-per-round": 2})
    run.run()

    for rows in by_version(run.updates("accepted")).values():
        assert {r["node"]: r["weight"] for r in rows} == pytest.approx({1: 0.5, 2: 0.5})
        assert {r["node"]: r["weight_capped_from"] for r in rows}[2] == pytest.approx(1.0)
    # the head moves by the mean of the two steps each round: 3 rounds × (0.1 + 0.3) / 2
    np.testing.assert_allclose(run.global_model()[f"dense/{HEAD}"], 3 * 0.2, rtol=1e-5)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_two_sites_a_rogue_scaling_its_factors_is_rejected_by_the_optimizer_bound(tmp_path, mode):
    # the run's real learning rate: 10 AdamW steps at 0.003 move a value at most ≈ 0.03, and 10⁴× factors move it by
    # thousands; with two sites there is no median to clip against on the first asynchronous step, this bound needs none
    honest = {"lr": 0.003, "lr-decay": 1.0}
    nodes = [FakeNode(1, step=0.01, delay=1.0), LyingNode(2, step=0.01, delay=1.0, lies=["scale"])]
    base = {**SYNC, "clients-per-round": 2} if mode == "sync" else {**ASYNC, "async-rule": "fedasync"}
    run = lying_federation(tmp_path, nodes, base, **honest)
    summary = run.run()

    rejected = run.updates("rejected")
    assert rejected and all(r["node"] == 2 for r in rejected)
    assert all("more than 10 AdamW steps at lr 0.003 can move it (0.0305)" in r["reason"] for r in rejected)
    assert all(r["node"] == 1 for r in run.updates("accepted")) and summary["versions"] == 3
    head = run.global_model()[f"dense/{HEAD}"]
    assert np.all(np.isfinite(head)) and np.allclose(head, 3 * 0.01, rtol=1e-5)


# ---- the optimizer bound against torch's AdamW ------------------------------------------------------------------
def _adamw_change(grads: np.ndarray, lr: float) -> float:
    """The largest change of any coordinate after torch's AdamW (the trainer's settings) follows `grads` (steps × dims)."""
    p = torch.nn.Parameter(torch.zeros(grads.shape[1], dtype=torch.float64))
    opt = torch.optim.AdamW([p], lr=lr, weight_decay=0.0)
    for g in grads:
        p.grad = torch.as_tensor(g, dtype=torch.float64)
        opt.step()
    return float(p.detach().abs().max())


@pytest.mark.parametrize("steps", [1, 2, 10, 50])
def test_adam_change_bound_holds_for_adversarial_gradients_and_is_tight_for_a_constant_one(steps):
    rng = np.random.default_rng(steps)
    lr = 0.003
    bound = adam_change_bound(lr, steps)
    t = np.arange(steps)[:, None]
    sequences = [
        np.ones((steps, 4)),  # constant: exactly lr per step
        rng.normal(size=(steps, 64)),
        rng.normal(size=(steps, 64)) * np.exp(rng.normal(size=(steps, 64)) * 3),  # heavy-tailed
        (0.999 / 0.9) ** t * np.ones((steps, 4)),  # growing by β₂/β₁: equality in the bound's Cauchy–Schwarz step
        np.where(t == steps - 1, 1e6, 1e-3) * np.ones((steps, 4)),  # a spike at the end
        np.where(t == 0, 1e6, 1e-3) * np.ones((steps, 4)),  # a spike at the start
    ]
    changes = [_adamw_change(g, lr) for g in sequences]
    assert max(changes) <= bound * (1 + 1e-9)
    assert changes[0] == pytest.approx(lr * steps, rel=1e-6)
    assert bound <= 1.1 * lr * steps if steps <= 10 else bound <= 3 * lr * steps  # tight where jobs live


def test_excess_change_allows_wire_rounding_and_names_the_largest_change():
    sent = np.array([1.0, -2.0, 0.5], np.float32)
    assert excess_change(sent + 0.01, sent, 0.01, steps=10, wire_dtype="float32") is None
    # bfloat16 rounds a value of 2 by up to 2^-7: allowed on top of the bound
    assert excess_change(sent + np.float32(0.01 + 2**-8), sent, 0.01, steps=10, wire_dtype="bfloat16") is None
    assert excess_change(sent * 10_000, sent, 0.0305, steps=10, wire_dtype="float32") == pytest.approx(19_998.0)


# ---- nothing non-finite reaches the global model, nor its checkpoint ---------------------------------------------
def test_a_step_that_could_overflow_float32_is_refused_before_anything_changes():
    from corolla.strategies import FedAvg
    from corolla.strategies.base import ClientUpdate, LoraSpec, Weights
    from corolla.strategies.exceptions import AggregationError
    from tests.strategies.helpers import adapter

    agg = FedAvg(adapter(2, 0), LoraSpec(alpha=8))
    d = agg.dispatch(2)
    before = {k: v.copy() for k, v in agg.state().items()}
    huge = {k: (v + np.float32(1e20)).astype(np.float32) for k, v in d.arrays.items()}  # finite in float32, products not
    ups = [ClientUpdate(node_id=7, arrays=huge, sent=d, num_examples=1),
           ClientUpdate(node_id=8, arrays=dict(d.arrays), sent=d, num_examples=1)]
    with pytest.raises(AggregationError, match=r"node 7: `.*` holds values up to 1e\+20, beyond 1e\+15 where sums and "
                                               "LoRA products could leave float32's range; the step is refused"):
        agg.step(ups, Weights(lora=np.array([0.5, 0.5]), dense=np.array([0.5, 0.5])))
    assert agg.version == 0 and all(np.array_equal(before[k], v) for k, v in agg.state().items())
    with pytest.raises(AggregationError, match="weights are not all finite"):
        agg.step(ups[1:], Weights(lora=np.array([np.nan]), dense=np.array([1.0])))


def test_a_non_finite_global_model_is_never_checkpointed(tmp_path):
    from corolla.server import checkpoint
    from corolla.strategies.base import NonFiniteModelError

    run = federation(tmp_path, [FakeNode(1), FakeNode(2)], SYNC)
    run.fed.start()
    run.fed.checkpoint()
    good = (run.dir / checkpoint.CHECKPOINT).read_bytes()
    key = sorted(run.fed.aggregator.state())[0]
    run.fed.aggregator.state()[key][...] = np.inf  # a bug's result: no reply can bring this about (tests above)
    with pytest.raises(NonFiniteModelError, match=f"`{key}` became non-finite at version 0; the run stops before "
                                                  "checkpointing it"):
        run.fed.checkpoint()
    assert (run.dir / checkpoint.CHECKPOINT).read_bytes() == good  # the last good version is what stays on disk
