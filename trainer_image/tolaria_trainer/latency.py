"""Latency bookkeeping: a rolling window for budget judgement and all-run percentiles.

Budgets are judged on p95/p99 over a window of occurrences, not one (R12 note);
the run report gives p50/p95/p99/max over the whole run. Samples are kept as
nanosecond integers in a preallocated ring plus an `array` for the run.
"""

from __future__ import annotations

from array import array

from leyline import LatencySummary
from tolaria_trainer.clock import ns_to_ms


def percentile(sorted_values: list[int] | list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 100))))
    return float(sorted_values[rank - 1])


class LatencyStats:
    """Samples of one budgeted operation."""

    def __init__(self, budget_ms: float | None, window: int) -> None:
        self.budget_ms = budget_ms  # None: measured only, no budget (validation)
        self._window = [0] * window
        self._window_len = 0
        self._next = 0
        self._all = array("q")
        self.breaches = 0

    def add(self, elapsed_ns: int) -> bool:
        """Records a sample; returns True when it breached the budget."""
        self._window[self._next] = elapsed_ns
        self._next = (self._next + 1) % len(self._window)
        self._window_len = min(self._window_len + 1, len(self._window))
        self._all.append(elapsed_ns)
        breached = self.budget_ms is not None and ns_to_ms(elapsed_ns) > self.budget_ms
        if breached:
            self.breaches += 1
        return breached

    @property
    def count(self) -> int:
        return len(self._all)

    def window_percentile_ms(self, q: float) -> float:
        return ns_to_ms(int(percentile(sorted(self._window[: self._window_len]), q)))

    def summary(self) -> LatencySummary:
        values = sorted(self._all)
        n = len(values)
        return LatencySummary(
            count=n,
            p50_ms=ns_to_ms(int(percentile(values, 50))),
            p95_ms=ns_to_ms(int(percentile(values, 95))),
            p99_ms=ns_to_ms(int(percentile(values, 99))),
            max_ms=ns_to_ms(values[-1]) if values else 0.0,
            mean_ms=ns_to_ms(sum(values) // n) if n else 0.0,
            budget_ms=self.budget_ms or 0.0,
            breaches=self.breaches,
        )
