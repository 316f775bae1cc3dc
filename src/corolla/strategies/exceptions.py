"""Named errors raised by the pure algorithms; each carries a `reason` sentence."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class StrategyError(Exception):
    """Base class: `reason` says what went wrong and what happens next; `dropped` lists updates it discarded."""

    def __init__(self, reason: str, dropped: Sequence[Any] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.dropped = list(dropped)


class AggregationError(StrategyError):
    """Updates cannot be combined (no updates, zero total weight, inconsistent keys)."""


class RankMismatchError(StrategyError):
    """An adapter's LoRA rank differs from the rank the strategy or the dispatch expects."""


class InvalidUpdateError(StrategyError):
    """A single client update is malformed (missing keys, wrong shapes, non-finite values)."""
