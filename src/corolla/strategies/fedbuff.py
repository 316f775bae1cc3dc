"""FedBuff (and FedAsync, its K = 1 case): buffered asynchronous aggregation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np

from corolla.strategies.base import Aggregator, ClientUpdate, StalenessWeight, Weights
from corolla.strategies.exceptions import AggregationError, InvalidUpdateError, StrategyError
from corolla.strategies.options import option
from corolla.strategies.staleness import ConstantStaleness


@dataclass(frozen=True)
class AsyncStep:
    """What one asynchronous aggregation did (for the run directory)."""

    updates: list[ClientUpdate] = field(repr=False)
    lora_weights: list[float]
    dense_weights: list[float]
    version: int

    @property
    def node_ids(self) -> list[int]:
        """The nodes whose updates formed this version, in arrival order."""
        return [u.node_id for u in self.updates]

    @property
    def staleness(self) -> list[int]:
        """Each update's τ, measured against the version it was applied to."""
        return [u.staleness for u in self.updates]


def _max_staleness() -> int:
    return option(-1, key="max-staleness", low=-1, help="drop updates staler than this many versions (-1: never)")


class AsyncRule:
    """Decides when buffered updates become a new version and with which weights.

    The driver owns the clock and passes `now` in, so these rules never sleep and
    tests drive them with hand-picked times. The driver talks to every rule through
    the same hooks — `register` (a node and its example count), `may_dispatch` (may a
    freed node get a job now), `observe` (a reply's measured duration), `admit`,
    `expire` and `step` — and never asks which rule it holds.
    """

    name: ClassVar[str] = "async"
    #: whether this rule multiplies updates by a staleness weight s(τ) (the `staleness` keys apply)
    uses_staleness: ClassVar[bool] = True

    def __init__(self, aggregator: Aggregator, staleness: StalenessWeight | None = None, *,
                 max_staleness: int = -1) -> None:
        self.aggregator = aggregator
        self.staleness = staleness or ConstantStaleness()
        self.max_staleness = None if max_staleness < 0 else max_staleness
        self.buffer: list[ClientUpdate] = []

    def register(self, node_id: int, num_examples: int) -> None:  # noqa: B027 - optional hook
        """A usable node and the example count it declared at join (FedFix's p_i)."""

    def may_dispatch(self, node_id: int, now: float) -> bool:
        """Whether a freed node may start a new job now (default: at once)."""
        return True

    def shift_clock(self, seconds: float) -> None:  # noqa: B027 - optional hook
        """The driver's clock jumped by `seconds` (a resumed run's new process): move any deadline with it."""

    def observe(self, node_id: int, duration_s: float) -> None:  # noqa: B027 - optional hook
        """A reply arrived `duration_s` after its job was pushed (FedFix's τ_i)."""

    def admit(self, update: ClientUpdate) -> None:
        """Validate and buffer an update; raise InvalidUpdateError (nothing buffered) when it must be dropped.

        A duplicate is a second reply to one *job* (`ClientUpdate.job_id`, the driver's message id),
        never a second update starting from one Dispatch: every job of one (version, rank) shares a
        Dispatch, so a fast node re-dispatched before the version changes returns distinct updates
        from the very same object (algorithms.md §5). Updates without a job id cannot be told apart
        and are all admitted; the driver always sets it.
        """
        if self.max_staleness is not None and update.staleness > self.max_staleness:
            raise InvalidUpdateError(
                f"node {update.node_id}: update is {update.staleness} versions stale, above max-staleness "
                f"{self.max_staleness}; it is dropped.")
        if update.job_id and any(u.job_id == update.job_id for u in self.buffer):
            raise InvalidUpdateError(
                f"node {update.node_id}: duplicate reply to job {update.job_id}; it is dropped.")
        self.aggregator.check(update)
        self.buffer.append(update)

    def expire(self) -> list[tuple[ClientUpdate, str]]:
        """Remove buffered updates that grew older than max-staleness while they waited; return them with why.

        An update admitted at τ = max-staleness is one version too old once the buffer ahead of
        it becomes a version, so the bound is checked again before every aggregation.
        """
        if self.max_staleness is None:
            return []
        kept, expired = [], []
        for u in self.buffer:
            tau = self.aggregator.version - u.sent.version
            if tau <= self.max_staleness:
                kept.append(u)
            else:
                expired.append((u, f"node {u.node_id}: update became {tau} versions stale while buffered, above "
                                   f"max-staleness {self.max_staleness}; it is dropped."))
        self.buffer = kept
        return expired

    def next_deadline(self) -> float | None:
        """The next time at which `step` may aggregate with no new reply (None: only replies make versions).

        The driver hands it to its clock, so a virtual clock stops there instead of jumping past it.
        """
        return None

    def ready(self, now: float) -> bool:
        """True when the buffered updates should become a new version."""
        raise NotImplementedError

    def weights(self, updates: Sequence[ClientUpdate], now: float) -> Weights:
        """Weights applied to Σ w_i (returned_i − sent_i)."""
        raise NotImplementedError

    def step(self, now: float) -> AsyncStep | None:
        """Aggregate the buffer if `ready(now)`; return what was done (None: nothing)."""
        if not self.ready(now) or not self.buffer:
            self._after_step(now, aggregated=False)
            return None
        # τ is measured when the update is applied, not when it arrived: an update left in the
        # buffer behind a full one (FedBuff) is applied to a newer version than it was received at.
        updates = [replace(u, staleness=self.aggregator.version - u.sent.version) for u in self._take()]
        try:
            w = self.weights(updates, now)
            self.aggregator.step(updates, w)
        except StrategyError as e:  # the taken updates are gone: say which, so the driver records each of them
            self._after_step(now, aggregated=False)
            raise AggregationError(e.reason, dropped=updates) from e
        self._after_step(now, aggregated=True)
        return AsyncStep(updates, w.lora.tolist(), w.dense.tolist(), self.aggregator.version)

    def _take(self) -> list[ClientUpdate]:
        """Remove and return the updates that form the next version (default: all buffered)."""
        updates, self.buffer = self.buffer, []
        return updates

    def _after_step(self, now: float, aggregated: bool) -> None:
        pass

    def summary(self) -> dict:
        """Hyper-parameters, logged once at start."""
        return {"async": self.name, "staleness": type(self.staleness).__name__, "max_staleness": self.max_staleness}


@dataclass(frozen=True, kw_only=True)
class FedBuffConfig:
    """FedBuff's options."""

    buffer_size: int = option(2, key="buffer-size", low=1, help="FedBuff: updates per new version (K)")
    max_staleness: int = _max_staleness()

    def __post_init__(self) -> None:
        if self.buffer_size < 1:
            raise ValueError(f"`buffer-size` must be >= 1, got {self.buffer_size}")


@dataclass(frozen=True, kw_only=True)
class FedAsyncConfig:
    """FedAsync's options."""

    max_staleness: int = _max_staleness()


class FedBuff(AsyncRule):
    """FedBuff (algorithms.md §5): aggregate every K updates with staleness weights.

    Implementation based on https://arxiv.org/abs/2106.06639. Buffered deltas are
    combined as Σ_i p_i s(τ_i) (returned_i − sent_i), where p_i are the
    aggregator's own weights over the buffer (FedAvg: n_i / Σn, i.e. the paper's
    optional example weighting; FedHL: truncation-aware) — with s ≡ 1 and K equal
    to the cohort this is exactly synchronous aggregation (tested). The paper's
    Δ̄ / K is the uniform-p case; η_g and momentum are the server optimizer's.
    """

    name = "fedbuff"

    def __init__(self, aggregator: Aggregator, config: FedBuffConfig | None = None, *,
                 staleness: StalenessWeight | None = None, now: float = 0.0) -> None:
        self.config = config or FedBuffConfig()
        super().__init__(aggregator, staleness, max_staleness=self.config.max_staleness)
        self.buffer_size = self.config.buffer_size

    def ready(self, now: float) -> bool:
        """True once K updates are buffered."""
        return len(self.buffer) >= self.buffer_size

    def _take(self) -> list[ClientUpdate]:
        """The first K buffered updates (arrival order); later arrivals wait for the next version."""
        updates, self.buffer = self.buffer[: self.buffer_size], self.buffer[self.buffer_size :]
        return updates

    def weights(self, updates: Sequence[ClientUpdate], now: float) -> Weights:
        """p_i · s(τ_i)."""
        base = self.aggregator.weights(updates)
        s = np.array([self.staleness.weight(u.staleness) for u in updates])
        return Weights(lora=base.lora * s, dense=base.dense * s)

    def summary(self) -> dict:
        """Hyper-parameters including K."""
        return {**super().summary(), "buffer_size": self.buffer_size}


class FedAsync(FedBuff):
    """Asynchronous FedAvg: every update is applied on arrival, weighted by s(τ) (FedBuff with K = 1)."""

    name = "fedasync"

    def __init__(self, aggregator: Aggregator, config: FedAsyncConfig | None = None, *,
                 staleness: StalenessWeight | None = None, now: float = 0.0) -> None:
        cfg = config or FedAsyncConfig()
        super().__init__(aggregator, FedBuffConfig(buffer_size=1, max_staleness=cfg.max_staleness),
                         staleness=staleness, now=now)
