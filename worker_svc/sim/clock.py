"""Time for a simulated worker: the wall clock, or virtual time that moves only when slept.

A sim worker asks its Clock to sleep for each iteration's modelled cost. With RealClock
it behaves like a GPU worker in real time; with VirtualClock a simulator can drive it
as fast as the CPU allows and read off the time the run would have taken.
"""
from __future__ import annotations

import math
import time
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    def now_ms(self) -> float:
        """Milliseconds since an arbitrary fixed origin; never decreases."""
        ...

    def sleep_ms(self, ms: float) -> None:
        """Return once ms milliseconds have passed on this clock; ms <= 0 returns at once,
        a non-finite ms raises ValueError."""
        ...


class RealClock:
    """time.monotonic, with sleeps that end close to their deadline.

    time.sleep can overshoot by tens of microseconds, more on a loaded host, so it
    covers all but the last spin_ms and a yielding spin covers the rest.
    """

    def __init__(self, spin_ms: float = 0.5):
        if not (math.isfinite(spin_ms) and spin_ms >= 0):
            raise ValueError(f"spin_ms must be finite and >= 0, got {spin_ms!r}")
        self._spin_ms = spin_ms

    def now_ms(self) -> float:
        return time.monotonic() * 1000.0

    def sleep_ms(self, ms: float) -> None:
        if _sleep_is_noop(ms):
            return
        deadline_ms = self.now_ms() + ms
        if ms > self._spin_ms:
            time.sleep((ms - self._spin_ms) / 1000.0)
        while self.now_ms() < deadline_ms:
            time.sleep(0)       # releases the GIL while spinning


class VirtualClock:
    """Time that advances only through sleep_ms, which returns at once.

    Safe for one writer (the thread that sleeps) and any number of readers: the time is
    one float attribute, replaced whole, so a reader sees it before or after a sleep.
    """

    def __init__(self, start_ms: float = 0.0):
        if not math.isfinite(start_ms):
            raise ValueError(f"start_ms must be finite, got {start_ms!r}")
        self._now_ms = float(start_ms)

    def now_ms(self) -> float:
        return self._now_ms

    def sleep_ms(self, ms: float) -> None:
        if not _sleep_is_noop(ms):
            self._now_ms += ms


def _sleep_is_noop(ms: float) -> bool:
    # An infinite or NaN duration is a cost-model bug; sleeping on it would hang or
    # poison the virtual time for the rest of the run.
    if not math.isfinite(ms):
        raise ValueError(f"sleep duration must be finite, got {ms!r} ms")
    return ms <= 0
