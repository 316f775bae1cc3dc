"""The server's clock, injected so drivers and rules run on real time in production and fake time in tests."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Monotonic seconds, wall-clock seconds, and a way to wait."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (durations, deadlines)."""

    def time(self) -> float:
        """Wall-clock seconds since the epoch (stamped into jobs)."""

    def sleep(self, seconds: float) -> None:
        """Wait `seconds` (a fake clock advances instead)."""


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        """time.monotonic()."""
        return time.monotonic()

    def time(self) -> float:
        """time.time()."""
        return time.time()

    def sleep(self, seconds: float) -> None:
        """time.sleep()."""
        time.sleep(seconds)


class FakeClock:
    """A clock that moves only when told to (or when slept on): drivers run in milliseconds in tests."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def monotonic(self) -> float:
        """The current fake time."""
        return self.now

    def time(self) -> float:
        """The same fake time (as epoch seconds)."""
        return self.now

    def sleep(self, seconds: float) -> None:
        """Advance by `seconds`."""
        self.now += max(seconds, 0.0)

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.now += seconds
