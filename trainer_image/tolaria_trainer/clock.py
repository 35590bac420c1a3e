"""The production monotonic clock; tests inject their own `Clock`."""

from __future__ import annotations

import time


class MonotonicClock:
    """`time.perf_counter_ns`: the clock every budget is measured with (R1.2)."""

    def now_ns(self) -> int:
        return time.perf_counter_ns()


NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000


def ms_to_ns(ms: float) -> int:
    """Milliseconds (the unit of budgets in the manifest) to nanoseconds."""
    return int(ms * NS_PER_MS)


def ns_to_ms(ns: int) -> float:
    """Nanoseconds (the unit of measurement) to milliseconds, converted once at the edge."""
    return ns / NS_PER_MS
