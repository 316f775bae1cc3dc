"""FedFix: aggregation at fixed time intervals with unbiased weights."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from corolla.strategies.base import Aggregator, ClientUpdate, StalenessWeight, Weights
from corolla.strategies.fedbuff import AsyncRule, _max_staleness
from corolla.strategies.options import option


@dataclass(frozen=True, kw_only=True)
class FedFixConfig:
    """FedFix's options."""

    interval: float = option(20.0, key="interval", low=0.001, help="FedFix: seconds between aggregations (Δt)")
    max_staleness: int = _max_staleness()
    duration_ema: float = option(0.5, key=None, help="weight of the newest duration in τ_i's moving average")

    def __post_init__(self) -> None:
        if not self.interval > 0:
            raise ValueError(f"`interval` must be > 0 seconds, got {self.interval}")
        if not 0 < self.duration_ema <= 1:
            raise ValueError(f"`duration-ema` must be in (0, 1], got {self.duration_ema}")


class FedFix(AsyncRule):
    """FedFix-Δt (algorithms.md §6).

    Implementation based on Fraboni et al., JMLR 2023 (https://arxiv.org/abs/2206.10189).
    Every Δt the server aggregates the updates that returned since the last
    aggregation: θ ← θ + η Σ_i d_i (θ_i^returned − θ_i^sent) with
    d_i = p_i ⌈τ_i / Δt⌉, p_i = n_i / Σ_j n_j over every client known to the server,
    and τ_i the client's time per job, estimated online as an exponential moving
    average of its observed durations (first observation: the observation). A
    client that contributes once every ⌈τ_i/Δt⌉ aggregations thus keeps its expected
    share p_i. An interval in which nobody returned produces no new version.
    Decisions: p_i uses the example counts of the clients known so far; LoRA and
    dense parameters share d_i (FedFix defines one weight per client).
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
        self.durations: dict[int, float] = {}
        self.examples: dict[int, int] = {}

    def register(self, node_id: int, num_examples: int) -> None:
        """Make a client known (its example count enters every p_i)."""
        self.examples[node_id] = num_examples

    def observe(self, node_id: int, seconds: float) -> None:
        """Fold one observed job duration (push → reply) into τ_i."""
        if not math.isfinite(seconds) or seconds < 0:
            return
        old = self.durations.get(node_id)
        self.durations[node_id] = seconds if old is None else (1 - self.ema) * old + self.ema * seconds

    def ready(self, now: float) -> bool:
        """True once the current interval has ended."""
        return now >= self.deadline

    def _after_step(self, now: float, aggregated: bool) -> None:
        if now >= self.deadline:  # skip whole intervals that passed
            self.deadline += self.interval * (1 + math.floor((now - self.deadline) / self.interval))

    def weights(self, updates: Sequence[ClientUpdate], now: float) -> Weights:
        """d_i = p_i ⌈τ_i / Δt⌉ (times s(τ) when a staleness weight is configured)."""
        for u in updates:
            self.examples.setdefault(u.node_id, u.num_examples)
        total = float(sum(self.examples.values()))
        d = np.array([
            self.examples[u.node_id] / total
            * max(1, math.ceil(self.durations.get(u.node_id, self.interval) / self.interval))
            * self.staleness.weight(u.staleness)
            for u in updates
        ])
        return Weights(lora=d, dense=d)

    def summary(self) -> dict:
        """Hyper-parameters including Δt."""
        return {**super().summary(), "interval_s": self.interval, "duration_ema": self.ema}
