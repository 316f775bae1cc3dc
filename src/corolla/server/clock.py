"""The server's clock, injected: real time in production, fake time in tests, simulated time under `--clock virtual`."""

from __future__ import annotations

import heapq
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

    def wake_at(self, t: float) -> None:
        """Announce that the caller has something to do at monotonic time `t` (a virtual clock stops there)."""


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

    def wake_at(self, t: float) -> None:
        """Nothing to do: real time reaches `t` by itself."""


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

    def wake_at(self, t: float) -> None:
        """Nothing to do: a fake clock moves only when told to."""


class VirtualClock:
    """Discrete-event time: `sleep` jumps to the next scheduled event instead of waiting.

    Events are wake-ups registered with `wake_at` — a simulated job's completion (the
    virtual Grid registers it when the job is pushed) or a time a driver acts at by
    itself (FedFix's next Δt boundary, via `AsyncRule.next_deadline`). `sleep(dt)`
    moves to the earliest pending wake-up however far it is, or by `dt` when none is
    pending. After a jump, the next `sleep` returns at once, without moving: the driver
    gets one more pass at the event's instant to act on what it just learned (push a
    job to the node that just replied, or to the nodes a FedFix boundary released), so
    a freed node is re-dispatched with no delay. Nothing here reads the host's clock.
    """

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self._wakes: list[float] = []
        self._pending: set[float] = set()
        self._settle = False

    def monotonic(self) -> float:
        """The current virtual time."""
        return self.now

    def time(self) -> float:
        """The same virtual time (stamped into jobs in place of epoch seconds)."""
        return self.now

    def wake_at(self, t: float) -> None:
        """Schedule a wake-up at virtual time `t` (ignored when `t` has passed; duplicates are merged)."""
        if t >= self.now and t not in self._pending:
            self._pending.add(t)
            heapq.heappush(self._wakes, t)

    def next_wake(self) -> float | None:
        """The earliest pending wake-up (None: none)."""
        self._drop_past()
        return self._wakes[0] if self._wakes else None

    def sleep(self, seconds: float) -> None:
        """Jump to the earliest pending wake-up, or advance by `seconds` when none is pending (see the class)."""
        if self._settle:
            self._settle = False
            return
        t = self.next_wake()
        if t is None:
            self.now += max(seconds, 0.0)
            return
        self.advance_to(t)
        self._settle = True

    def advance_to(self, t: float) -> None:
        """Move to virtual time `t` (never back), dropping the wake-ups it passes (a blocking wait does this)."""
        self.now = max(self.now, t)
        self._settle = False
        self._drop_past(inclusive=True)

    def _drop_past(self, inclusive: bool = False) -> None:
        while self._wakes and (self._wakes[0] < self.now or (inclusive and self._wakes[0] == self.now)):
            self._pending.discard(heapq.heappop(self._wakes))
