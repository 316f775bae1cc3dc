"""Robust centres: FedAvg's weighted mean of the client deltas replaced by a median or a trimmed mean.

`FedMedian` and `FedTrimmedAvg` take the coordinate-wise median or trimmed mean
(Yin et al. 2018, https://arxiv.org/abs/1803.01498).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from numpy.typing import NDArray

from corolla.strategies import lora_ops
from corolla.strategies.base import ClientUpdate, Dispatch, LoraSpec, Weights
from corolla.strategies.exceptions import AggregationError
from corolla.strategies.fedavg import FedAvg
from corolla.strategies.options import option


def coordinate_median(arrays: Sequence[NDArray[np.floating]]) -> NDArray[np.float32]:
    """The coordinate-wise median (an even count averages the two middle values)."""
    return np.median(np.stack([np.asarray(a, np.float64) for a in arrays]), axis=0).astype(np.float32)


def trim_count(k: int, fraction: float) -> int:
    """How many values to drop at each end of k: ⌊fraction·k⌋, at least 1 when fraction > 0 and k >= 3, at most (k−1)//2."""
    t = math.floor(fraction * k + 1e-9)
    if fraction > 0 and k >= 3:
        t = max(t, 1)
    return min(t, (k - 1) // 2)


def trimmed_mean(arrays: Sequence[NDArray[np.floating]], fraction: float) -> NDArray[np.float32]:
    """The coordinate-wise mean after dropping the `trim_count` largest and smallest values of every coordinate."""
    x = np.sort(np.stack([np.asarray(a, np.float64) for a in arrays]), axis=0)
    t = trim_count(x.shape[0], fraction)
    return x[t: x.shape[0] - t].mean(axis=0).astype(np.float32)


@dataclass(frozen=True, kw_only=True)
class TrimConfig:
    """FedTrimmedAvg's option."""

    trim_fraction: float = option(0.2, key="trim-fraction", low=0.0, help=(
        "FedTrimmedAvg: fraction of the updates dropped at each end of every coordinate (at least one when k >= 3)"))

    def __post_init__(self) -> None:
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"`trim-fraction` must be in [0, 0.5), got {self.trim_fraction}")


class _RobustCentre(FedAvg):
    """FedAvg's state, dispatch and checks, with a robust centre of the client deltas instead of their weighted mean.

    Every update is taken as a delta against what its client was sent (returned − sent), so a
    stale asynchronous update is measured against its own start and an unchanged reply moves
    nothing: `supports_async` holds. The centre ignores the individual weights — a lied example
    count cannot pull it — and the step's total weight Σw only scales it: 1 in a synchronous
    round, Σ p_i s(τ_i) for a FedBuff buffer, Σ d_i for a FedFix interval.

    Rank: one rank for all clients, as FedAvg. The factory builds the heterogeneous methods'
    initial adapter at `max-rank` for every aggregation but fedavg, so the global rank is pinned
    at the first dispatch by truncating peft's initialisation (A's rows do not depend on r, B is 0).
    """

    supports_async: ClassVar[bool] = True

    def __init__(self, initial: Mapping[str, NDArray[np.floating]], lora: LoraSpec) -> None:
        super().__init__(initial, lora)
        self._rank_pinned = False

    def _make_dispatch(self, rank: int) -> Dispatch:
        """Pin the global rank at the first dispatch (version 0), then serve it as FedAvg does."""
        if not self._rank_pinned and self.version == 0 and 0 < rank < self.rank:
            self.factors = {layer: (np.array(a[:rank], np.float32, copy=True), np.array(b[:, :rank], np.float32, copy=True))
                            for layer, (a, b) in self.factors.items()}
            self.rank = rank
        self._rank_pinned = True
        return super()._make_dispatch(rank)

    def weights(self, updates: Sequence[ClientUpdate]) -> Weights:
        """Equal weights 1/k (what is recorded; the centre itself is unweighted)."""
        if not updates:
            raise AggregationError("aggregate: no updates to aggregate; the global model is unchanged.")
        w = np.full(len(updates), 1.0 / len(updates))
        return Weights(lora=w, dense=w.copy())

    def centre(self, deltas: Sequence[NDArray[np.floating]]) -> NDArray[np.float32]:
        """The robust centre of the client deltas of one array."""
        raise NotImplementedError

    def apply(self, updates: Sequence[ClientUpdate], weights: Weights, server_lr: float = 1.0) -> None:
        """Move A, B and dense parameters by Σw × the centre of the client deltas."""
        lr_l = np.float32(server_lr * float(np.sum(weights.lora)))
        lr_d = np.float32(server_lr * float(np.sum(weights.dense)))
        for layer, (a, b) in self.factors.items():
            ka, kb = lora_ops.a_key(layer), lora_ops.b_key(layer)
            a += lr_l * self.centre([u.arrays[ka] - u.sent.arrays[ka] for u in updates])
            b += lr_l * self.centre([u.arrays[kb] - u.sent.arrays[kb] for u in updates])
        for k in self.dense_keys:
            self.dense[k] += lr_d * self.centre([np.asarray(u.arrays[k], np.float32) - u.sent.arrays[k] for u in updates])
        self.version += 1


class FedMedian(_RobustCentre):
    """Coordinate-wise median of the client deltas (Yin et al. 2018, https://arxiv.org/abs/1803.01498).

    Robust while fewer than half of a step's updates are bad: with k = 2 the median is the mean,
    so asynchronously it wants buffer-size >= 3 (FedAsync, K = 1, is the update itself).
    """

    name = "fedmedian"

    def centre(self, deltas: Sequence[NDArray[np.floating]]) -> NDArray[np.float32]:
        """The coordinate-wise median."""
        return coordinate_median(deltas)


class FedTrimmedAvg(_RobustCentre):
    """Coordinate-wise trimmed mean of the client deltas (Yin et al. 2018, https://arxiv.org/abs/1803.01498).

    Drops `trim_count(k, trim-fraction)` values at each end of every coordinate: ⌊βk⌋ as in the
    paper and Flower's FedTrimmedAvg, but at least one once k >= 3 (⌊0.2·3⌋ = 0 would trim nothing)
    and never all. Tolerates that many bad updates per step.
    """

    name = "fedtrimmedavg"

    def __init__(self, initial: Mapping[str, NDArray[np.floating]], lora: LoraSpec, trim_fraction: float = 0.2) -> None:
        super().__init__(initial, lora)
        self.trim_fraction = TrimConfig(trim_fraction=trim_fraction).trim_fraction

    def centre(self, deltas: Sequence[NDArray[np.floating]]) -> NDArray[np.float32]:
        """The coordinate-wise trimmed mean."""
        return trimmed_mean(deltas, self.trim_fraction)

    def summary(self) -> dict:
        """Hyper-parameters including the trim fraction."""
        return {**super().summary(), "trim_fraction": self.trim_fraction}
