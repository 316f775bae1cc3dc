"""FedFix: aggregation at fixed time intervals, weights p_i⌈τ_i/Δt⌉ (normalised per interval by default)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from corolla.strategies.base import Aggregator, ClientUpdate, StalenessWeight, Weights, example_weights
from corolla.strategies.exceptions import AggregationError
from corolla.strategies.fedbuff import AsyncRule, _max_staleness
from corolla.strategies.options import option

#: how an interval's weights d_i = p_i ⌈τ_i/Δt⌉ become the step: `normalized` divides them by their sum over the
#: interval (a weighted mean, the self-normalised / Hájek form); `paper` applies them as they are (Fraboni et al.)
FEDFIX_WEIGHTINGS = ("normalized", "paper")


@dataclass(frozen=True, kw_only=True)
class FedFixConfig:
    """FedFix's options."""

    interval: float = option(20.0, key="interval", low=0.001, help="FedFix: seconds between aggregations (Δt)")
    weighting: str = option("normalized", key="fedfix-weighting", choices=FEDFIX_WEIGHTINGS,
                            help="FedFix: normalized (each step is the weighted mean of the interval's changes, "
                                 "weights ∝ p_i⌈τ_i/Δt⌉) or paper (d_i = p_i⌈τ_i/Δt⌉ as they are: unbiased when "
                                 "every client always trains, unbounded when Δt is below the job durations)")
    max_staleness: int = _max_staleness()
    duration_ema: float = option(0.5, key=None, help="weight of the newest duration in τ_i's moving average")

    def __post_init__(self) -> None:
        if not self.interval > 0:
            raise ValueError(f"`interval` must be > 0 seconds, got {self.interval}")
        if self.weighting not in FEDFIX_WEIGHTINGS:
            raise ValueError(f"`fedfix-weighting` must be one of {list(FEDFIX_WEIGHTINGS)}; got {self.weighting!r}")
        if not 0 < self.duration_ema <= 1:
            raise ValueError(f"`duration-ema` must be in (0, 1], got {self.duration_ema}")


class FedFix(AsyncRule):
    """FedFix-Δt (algorithms.md §6).

    Implementation based on Fraboni et al., JMLR 2023 (https://arxiv.org/abs/2206.10189).
    Every Δt the server aggregates the updates that returned since the last
    aggregation: θ ← θ + η Σ_i d_i (θ_i^returned − θ_i^sent) with
    d_i = p_i ⌈τ_i / Δt⌉ r_i, p_i = n_i / Σ_j n_j over every client known to the server,
    and τ_i the client's time per job, estimated online as an exponential moving
    average of its observed durations (first observation: the observation).

    Scheduling (`may_dispatch`): as in the paper, only the clients that returned during
    ((n−1)Δt, nΔt] receive the new model, at the boundary nΔt; a client that has
    returned since the last aggregation is not dispatched again until the next one,
    while the others keep working on their copy. A client thus contributes exactly once
    every ⌈τ_i/Δt⌉ aggregations and keeps its expected share p_i per interval (tested on
    a virtual clock: tests/strategies/test_fedfix_schedule.py). Re-dispatching a freed
    client at once instead (the previous behaviour) let a client with τ_i < Δt return
    several times per interval, each at full weight: with N = 5, Δt = 10 s, p_i = 0.2 and
    τ = 3/9/11/15/25 s the weights per interval were 0.40/0.22/0.36/0.27/0.24 (sum 1.49).
    Because the driver pushes at the boundary, an observed duration holds no idle wait.

    Composition with the aggregator's weights: r_i = w_i^agg / w_i^examples over the
    interval's updates (w^examples = n_i / Σ_S n), separately for LoRA and dense weights:
    the aggregator's preference relative to example weighting. r_i = 1 for FedAvg, FLoRA
    and FedHL `examples`, so FedFix is then exactly the paper's rule; FedHL's truncation
    weights move weight between the interval's updates (Σ_S w^examples r = 1) instead
    of being dropped. An update with zero examples gets r_i = 1 (its p_i is normally 0 too).

    Weighting (`fedfix-weighting`). `paper` applies d_i as they are: the Horvitz–Thompson
    form, unbiased per client when every client always trains (test above), but its step is
    unbounded: ⌈τ_i/Δt⌉ grows without limit as Δt falls below the job durations, and the
    interval's total Σ_S d_i swings around its mean (1 with every client training, about C/N
    with C of N training). On the virtual-clock text benchmark (Δt = 4 s, jobs 5–50 s, 8 of
    16 clients, η_g = 2) single updates got 2.6, whole versions up to 7.2, and every seed
    collapsed to one class (bench/results/async_speed_text_virtual.md). `normalized` (the
    default) divides the interval's weights by their sum — the self-normalised (Hájek) form
    of the same estimator: within an interval the updates keep the paper's relative weights
    p_i⌈τ_i/Δt⌉ r_i, but every step is a weighted mean of the interval's changes (weights ≥ 0
    that sum to 1), so the global change is never larger than the largest client change,
    whatever Δt, and needs no η_g = N/C to make up for clients that are not training. The
    price: a client's mean share per interval is no longer exactly p_i (ratio-estimator bias).

    An interval in which nobody returned produces no new version. Decisions: p_i uses
    the example counts of the clients known so far; a client that never returned (at the
    start, or with concurrency < N a client taking a freed slot) may start at any time;
    a client whose reply was rejected also waits for the boundary (it returned).
    """

    name = "fedfix"

    uses_staleness = False

    def __init__(self, aggregator: Aggregator, config: FedFixConfig | None = None, *,
                 staleness: StalenessWeight | None = None, now: float = 0.0) -> None:
        self.config = config or FedFixConfig()
        super().__init__(aggregator, staleness, max_staleness=self.config.max_staleness)
        self.interval = self.config.interval
        self.deadline = now + self.interval
        self.ema = self.config.duration_ema
        self.weighting = self.config.weighting
        self.durations: dict[int, float] = {}
        self.examples: dict[int, int] = {}
        #: clients that returned since the last aggregation boundary: they restart at the next one
        self.returned: set[int] = set()

    def register(self, node_id: int, num_examples: int) -> None:
        """Make a client known (its example count enters every p_i)."""
        self.examples[node_id] = num_examples

    def may_dispatch(self, node_id: int, now: float) -> bool:
        """False for a client that returned in the current interval: it gets the next aggregation's model."""
        return node_id not in self.returned

    def shift_clock(self, seconds: float) -> None:
        """Keep the next boundary at the same distance from now after a resume."""
        self.deadline += seconds

    def observe(self, node_id: int, seconds: float) -> None:
        """Fold one observed job duration (push → reply) into τ_i; the client now waits for the boundary."""
        self.returned.add(node_id)
        if not math.isfinite(seconds) or seconds < 0:
            return
        old = self.durations.get(node_id)
        self.durations[node_id] = seconds if old is None else (1 - self.ema) * old + self.ema * seconds

    def admit(self, update: ClientUpdate) -> None:
        """Buffer an update (see AsyncRule.admit); its client, returned, waits for the next boundary."""
        self.returned.add(update.node_id)
        super().admit(update)

    def next_deadline(self) -> float | None:
        """The end of the current interval: the next boundary nΔt."""
        return self.deadline

    def ready(self, now: float) -> bool:
        """True once the current interval has ended."""
        return now >= self.deadline

    def _after_step(self, now: float, aggregated: bool) -> None:
        if now >= self.deadline:  # skip whole intervals that passed
            self.deadline += self.interval * (1 + math.floor((now - self.deadline) / self.interval))
            self.returned.clear()  # the boundary's model is out: the clients that returned restart

    def weights(self, updates: Sequence[ClientUpdate], now: float) -> Weights:
        """d_i = p_i ⌈τ_i / Δt⌉ r_i (times s(τ) when a staleness weight is configured); `normalized`: over Σ_S d_i.

        Raises
        ------
        AggregationError
            When the known clients' example counts do not sum to a positive number.

        """
        for u in updates:
            self.examples.setdefault(u.node_id, u.num_examples)
        total = float(sum(self.examples.values()))
        if total <= 0:
            raise AggregationError(f"fedfix: the clients' example counts sum to {total:g}, so p_i is undefined; "
                                   "the interval's updates are dropped.")
        d = np.array([
            self.examples[u.node_id] / total
            * max(1, math.ceil(self.durations.get(u.node_id, self.interval) / self.interval))
            * self.staleness.weight(u.staleness)
            for u in updates
        ])
        agg, ex = self.aggregator.weights(updates), example_weights(updates)
        lora, dense = d * _relative(agg.lora, ex), d * _relative(agg.dense, ex)
        if self.weighting == "normalized":
            lora, dense = _normalized(lora), _normalized(dense)
        return Weights(lora=lora, dense=dense)

    def summary(self) -> dict:
        """Hyper-parameters including Δt and the weighting."""
        return {**super().summary(), "interval_s": self.interval, "weighting": self.weighting,
                "duration_ema": self.ema}


def _normalized(weights: np.ndarray) -> np.ndarray:
    """Weights over their sum (unchanged when the sum is not positive: nothing to normalise)."""
    total = float(np.sum(weights))
    return weights / total if total > 0 else weights


def _relative(weights: np.ndarray, examples: np.ndarray) -> np.ndarray:
    """r_i = w_i / e_i: an aggregator's weights relative to example weights (1 where e_i = 0)."""
    w = np.asarray(weights, dtype=np.float64)
    return np.divide(w, examples, out=np.ones_like(w), where=examples > 0)
