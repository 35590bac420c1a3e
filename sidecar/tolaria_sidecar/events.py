"""The sidecar's event log: Leyline `SidecarEvent`s in order, replayable by sequence.

Every component publishes here (`EventLog.publish`): emergencies, acks, resolutions,
snapshots, checkpoints, rollbacks, progress. `StreamEvents` subscribers read with
`Subscription.next_batch`; they replay buffered events after a sequence, then follow live.

Sequences increase by one per event and start at boot from `time.time_ns() // 1000`, so a
restarted sidecar continues above its predecessor and a client resumes with the last
sequence it saw. The buffer is a bounded ring: a producer never waits for a subscriber. A
subscriber that falls further behind than the ring loses the oldest events; the loss is
counted (`dropped`, `tolaria_sidecar_events_dropped_total`) and visible as a jump in
`sequence`. Never blocks a producer on a consumer, never grows without bound.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from google.protobuf.message import Message

from leyline.v1.sidecar_pb2 import SidecarEvent
from tolaria_sidecar.protocols import EventKind

BATCH_LIMIT = 512
"""Events handed to one subscriber per wake-up, so a replay of the whole ring streams out
in pieces instead of one 10 000-message list."""


class EventLog:
    """A bounded, thread-safe ring of `SidecarEvent`s with live subscribers."""

    def __init__(
        self,
        run_id: str,
        *,
        capacity: int,
        on_drop: Callable[[int], None] | None = None,
        wall_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"event buffer capacity must be >= 1, got {capacity}")
        self.run_id = run_id
        self.boot_sequence = wall_ns() // 1000
        """Sequence before this boot's first event (microseconds since the epoch at boot)."""
        self._wall_ns = wall_ns
        self._on_drop = on_drop
        self._ring: deque[SidecarEvent] = deque(maxlen=capacity)
        self._last = self.boot_sequence
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0
        """Events subscribers missed because they fell behind the ring."""

    @property
    def last_sequence(self) -> int:
        with self._cond:
            return self._last

    def publish(self, kind: EventKind, message: Message) -> int:
        """Appends one event (`kind` is the oneof field) and wakes subscribers; O(1)."""
        now = self._wall_ns()
        event = SidecarEvent(run_id=self.run_id)
        event.at.FromNanoseconds(now)
        getattr(event, kind).CopyFrom(message)
        with self._cond:
            self._last += 1
            event.sequence = self._last
            self._ring.append(event)
            self._cond.notify_all()
        return event.sequence

    def subscribe(self, after_sequence: int) -> Subscription:
        """A reader that starts after `after_sequence` (0: everything still buffered)."""
        return Subscription(self, after_sequence)

    def close(self) -> None:
        """Wakes every subscriber for good (shutdown)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def _read(self, after: int, timeout_s: float) -> tuple[list[SidecarEvent], int]:
        """Events after `after` (waiting up to `timeout_s` for one) and how many were lost."""
        with self._cond:
            if self._last <= after and not self._closed:
                self._cond.wait(timeout_s)
            if not self._ring or self._last <= after:
                return [], 0
            first = self._ring[0].sequence
            lost = 0
            if after >= self.boot_sequence and after + 1 < first:
                lost = first - after - 1
                self.dropped += lost
            start = max(after + 1, first) - first
            stop = min(start + BATCH_LIMIT, len(self._ring))
            batch = [self._ring[i] for i in range(start, stop)]
        if lost and self._on_drop is not None:
            self._on_drop(lost)
        return batch, lost


class Subscription:
    """One reader's position in the log; not shared between threads."""

    def __init__(self, log: EventLog, after_sequence: int) -> None:
        self._log = log
        self.after = after_sequence
        """Sequence of the last event handed out."""
        self.dropped = 0
        """Events this reader lost by falling behind the ring."""

    def next_batch(self, timeout_s: float) -> list[SidecarEvent]:
        """The next events in order, waiting up to `timeout_s`; empty on timeout or close."""
        batch, lost = self._log._read(self.after, timeout_s)
        self.dropped += lost
        if batch:
            self.after = batch[-1].sequence
        return batch

    @property
    def closed(self) -> bool:
        return self._log.closed
