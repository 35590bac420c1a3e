"""Wall-clock time as the operator writes it into status: the `Clock` seam and RFC 3339 text.

Every timestamp the operator writes (condition transitions, deadlines, incident timelines)
goes through `format_time`, and every one it reads back through `parse_time`, so a deadline
written by one operator process is enforced identically by the next. The reconciler and
the daemons receive a `Clock`; tests inject one driven by the event loop's (fake) time.
Durations inside one process (signal latency) use `time.perf_counter_ns`, never this.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current UTC time (timezone-aware); must never block."""
        ...


class SystemClock:
    """The machine's clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with milliseconds, e.g. `2026-11-25T12:00:03.250Z`."""
    text = moment.astimezone(UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def parse_time(text: str) -> datetime | None:
    """An RFC 3339 timestamp as written by `format_time` or the API server; None when empty
    or unreadable (a hand-edited status never crashes the operator)."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def seconds(value: float) -> timedelta:
    return timedelta(seconds=value)
