"""Staleness weights s(τ): how much an update computed τ versions ago still counts."""

from __future__ import annotations

from dataclasses import dataclass

from corolla.strategies.base import StalenessWeight
from corolla.strategies.options import option


@dataclass(frozen=True, kw_only=True)
class PolynomialStalenessConfig:
    """The polynomial weight's exponent."""

    exponent: float = option(0.5, key="staleness-exponent", low=0.0,
                             help="polynomial staleness s(τ) = (1+τ)^-a (FedBuff: a = 0.5)")


class ConstantStaleness(StalenessWeight):
    """s(τ) = 1: staleness is ignored (FedBuff's degenerate case that equals synchronous FedAvg)."""

    def __init__(self, config: None = None) -> None:
        pass

    def weight(self, staleness: int) -> float:
        """Return 1."""
        _check(staleness)
        return 1.0


class PolynomialStaleness(StalenessWeight):
    """s(τ) = (1 + τ)^(−a); a = 0.5 is FedBuff's 1/√(1+τ)."""

    def __init__(self, config: PolynomialStalenessConfig | None = None) -> None:
        self.config = config or PolynomialStalenessConfig()
        if self.config.exponent < 0:
            raise ValueError(f"`staleness-exponent` must be >= 0, got {self.config.exponent}")
        self.exponent = self.config.exponent

    def weight(self, staleness: int) -> float:
        """Return (1 + τ)^(−a)."""
        _check(staleness)
        return float((1.0 + staleness) ** -self.exponent)


class HingeStaleness(StalenessWeight):
    """s(τ) = 1 for τ ≤ b, else 1 / (a (τ − b) + 1) (FedAsync's hinge)."""

    def __init__(self, config: None = None, *, a: float = 10.0, b: int = 4) -> None:
        self.a, self.b = a, b

    def weight(self, staleness: int) -> float:
        """Return the hinge weight."""
        _check(staleness)
        return 1.0 if staleness <= self.b else 1.0 / (self.a * (staleness - self.b) + 1.0)


def _check(staleness: int) -> None:
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}: an update cannot start from a future version")

