"""Leyline telemetry with priorities (R8.1) and health semantics (R8.2).

`TelemetryHub` is what every component emits through. CRITICAL packets are
delivered to the sinks synchronously, before anything queued, and never
dropped. Other packets go into one bounded queue drained by a background
thread in priority order; when the queue is full LOW packets are dropped
first, then NORMAL, and every drop is counted. While the run is conservative,
LOW and NORMAL packets are sampled (R2.2).

Emitting is cheap (append under a lock); sinks do their I/O on the drain
thread, never on the training thread, except for CRITICAL.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import json_format

from leyline import (
    HealthStatus,
    MessagePriority,
    MetricPoint,
    PriorityCount,
    SystemHealth,
    TelemetryEvent,
    TelemetryLevel,
    TelemetryPacket,
)
from leyline.spec import ConservativeSpec, TelemetrySpec
from tolaria_trainer.protocols import TelemetrySink

logger = logging.getLogger(__name__)

SOURCE = "tolaria"
PRIORITIES = tuple(
    p for p in MessagePriority.values() if p != MessagePriority.MESSAGE_PRIORITY_UNSPECIFIED
)
_DRAIN_ORDER = sorted(PRIORITIES, reverse=True)  # CRITICAL is never queued; HIGH first
_EVICT_ORDER = sorted(p for p in PRIORITIES if p != MessagePriority.MESSAGE_PRIORITY_CRITICAL)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_SAMPLED = frozenset(
    (MessagePriority.MESSAGE_PRIORITY_LOW, MessagePriority.MESSAGE_PRIORITY_NORMAL)
)


@dataclass
class HealthInputs:
    """What health is derived from (R8.2); the runtime updates it as things happen."""

    conservative: bool = False
    budget_breaches_this_epoch: int = 0
    open_breakers: Sequence[str] = ()
    rollback_in_progress: bool = False
    frozen: bool = False
    halted: bool = False
    sidecar_unreachable: str = ""
    """Why the last call to the sidecar failed; "" while it answers (set by `SidecarLink`)."""
    reason: str = ""


def assess_health(inputs: HealthInputs) -> SystemHealth:
    """HEALTHY / DEGRADED (sidecar unreachable, conservative, breaches) / UNHEALTHY (rollback,
    failing component) / CRITICAL (freeze, halt), with a one-line summary. An unreachable
    sidecar is named in the summary even when a worse condition sets the status."""
    away = f"sidecar unreachable ({inputs.sidecar_unreachable})"
    if inputs.halted or inputs.frozen:
        what = "halted" if inputs.halted else "frozen by a CRITICAL emergency"
        status, summary = HealthStatus.HEALTH_STATUS_CRITICAL, what
    elif inputs.rollback_in_progress:
        status, summary = HealthStatus.HEALTH_STATUS_UNHEALTHY, "rollback in progress"
    elif inputs.open_breakers:
        status = HealthStatus.HEALTH_STATUS_UNHEALTHY
        summary = "breaker open: " + ", ".join(inputs.open_breakers)
    elif inputs.sidecar_unreachable:
        # training goes on from the slots it has mapped; full rollbacks and the emergency
        # broadcast wait for the sidecar (R6.2): degraded, not failing
        status, summary = HealthStatus.HEALTH_STATUS_DEGRADED, away
    elif inputs.conservative:
        status, summary = HealthStatus.HEALTH_STATUS_DEGRADED, "conservative mode"
    elif inputs.budget_breaches_this_epoch:
        status = HealthStatus.HEALTH_STATUS_DEGRADED
        summary = f"{inputs.budget_breaches_this_epoch} budget breach(es) this epoch"
    else:
        status, summary = HealthStatus.HEALTH_STATUS_HEALTHY, "stable"
    if inputs.reason:
        summary = f"{summary}: {inputs.reason}"
    if inputs.sidecar_unreachable and summary != away:
        summary = f"{summary}; {away}"
    return SystemHealth(status=status, summary=summary)


@dataclass
class _Counts:
    emitted: dict[int, int] = field(default_factory=lambda: dict.fromkeys(PRIORITIES, 0))
    dropped: dict[int, int] = field(default_factory=lambda: dict.fromkeys(PRIORITIES, 0))


class TelemetryHub:
    """Builds, prioritises and delivers Leyline `TelemetryPacket`s."""

    def __init__(
        self,
        spec: TelemetrySpec,
        conservative: ConservativeSpec,
        run_id: str,
        sinks: Sequence[TelemetrySink] = (),
        *,
        is_conservative: Callable[[], bool] = lambda: False,
        start_thread: bool = True,
    ) -> None:
        self._spec = spec
        self._sample_every = conservative.telemetry_sample_every
        self._run_id = run_id
        self._sinks = list(sinks)
        self._is_conservative = is_conservative
        self.health_inputs = HealthInputs()
        self._queues: dict[int, deque[TelemetryPacket]] = {p: deque() for p in PRIORITIES}
        self._queued = 0
        self._counts = _Counts()
        self._sample_counter = 0
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._closed = False
        self._delivering = 0
        self._thread: threading.Thread | None = None
        if start_thread:
            self._thread = threading.Thread(
                target=self._drain_forever, name="telemetry", daemon=True
            )
            self._thread.start()

    # -- building ---------------------------------------------------------------------------
    def health(self) -> SystemHealth:
        return assess_health(self.health_inputs)

    def packet(
        self,
        level: TelemetryLevel.ValueType,
        *,
        metrics: Sequence[MetricPoint] = (),
        events: Sequence[TelemetryEvent] = (),
    ) -> TelemetryPacket:
        pkt = TelemetryPacket(
            packet_id=f"{self._run_id}-{next(self._ids)}",
            source_subsystem=SOURCE,
            level=level,
            metrics=metrics,
            events=events,
            system_health=self.health(),
        )
        pkt.timestamp.GetCurrentTime()
        return pkt

    def event(
        self,
        name: str,
        level: TelemetryLevel.ValueType,
        priority: MessagePriority.ValueType,
        **attributes: str,
    ) -> None:
        """One named event (the `EventSink` protocol)."""
        ev = TelemetryEvent(event_id=name, description=name, level=level, attributes=attributes)
        self.emit(self.packet(level, events=[ev]), priority)

    def metrics(
        self,
        values: dict[str, float],
        priority: MessagePriority.ValueType = MessagePriority.MESSAGE_PRIORITY_NORMAL,
        unit: str = "",
    ) -> None:
        points = [MetricPoint(name=k, value=v, unit=unit) for k, v in values.items()]
        self.emit(self.packet(TelemetryLevel.TELEMETRY_LEVEL_INFO, metrics=points), priority)

    # -- delivery ---------------------------------------------------------------------------
    def emit(self, packet: TelemetryPacket, priority: MessagePriority.ValueType) -> None:
        """CRITICAL: delivered now, before anything queued. Otherwise queued (bounded)."""
        if priority == MessagePriority.MESSAGE_PRIORITY_UNSPECIFIED:
            priority = MessagePriority.MESSAGE_PRIORITY_NORMAL
        packet.priority = priority
        if priority == MessagePriority.MESSAGE_PRIORITY_CRITICAL:
            with self._cond:
                self._counts.emitted[priority] += 1
            self._deliver(packet)
            return
        with self._cond:
            if priority in _SAMPLED and self._is_conservative():
                self._sample_counter += 1
                if self._sample_counter % self._sample_every:
                    self._counts.dropped[priority] += 1
                    return
            if self._queued >= self._spec.queue_capacity and not self._make_room(priority):
                self._counts.dropped[priority] += 1
                return
            self._queues[priority].append(packet)
            self._queued += 1
            self._counts.emitted[priority] += 1
            self._cond.notify()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Delivers everything queued (inline when there is no drain thread)."""
        if self._thread is None:
            while (pkt := self._pop()) is not None:
                self._deliver(pkt)
            return True
        with self._cond:
            return self._cond.wait_for(
                lambda: self._queued == 0 and self._delivering == 0, timeout=timeout_s
            )

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def counts(self) -> list[PriorityCount]:
        with self._cond:
            return [
                PriorityCount(
                    priority=p, emitted=self._counts.emitted[p], dropped=self._counts.dropped[p]
                )
                for p in PRIORITIES
            ]

    def _make_room(self, incoming: int) -> bool:
        """Evicts the oldest packet of the lowest priority not above `incoming` (LOW first)."""
        for victim in _EVICT_ORDER:
            if victim > incoming:
                return False
            queue = self._queues[victim]
            if queue:
                queue.popleft()
                self._queued -= 1
                self._counts.dropped[victim] += 1
                self._counts.emitted[victim] -= 1
                return True
        return False

    def _pop(self) -> TelemetryPacket | None:
        with self._cond:
            for p in _DRAIN_ORDER:
                if self._queues[p]:
                    self._queued -= 1
                    self._delivering += 1
                    return self._queues[p].popleft()
        return None

    def _drain_forever(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queued > 0 or self._closed)
                if self._closed and self._queued == 0:
                    return
            while (pkt := self._pop()) is not None:
                self._deliver(pkt)

    def _deliver(self, packet: TelemetryPacket) -> None:
        try:
            for sink in self._sinks:
                try:
                    sink.deliver(packet)
                except Exception:  # boundary: one bad sink must not stop telemetry
                    logger.exception("telemetry sink %r failed", sink)
        finally:
            if packet.priority != MessagePriority.MESSAGE_PRIORITY_CRITICAL:
                with self._cond:
                    self._delivering -= 1
                    self._cond.notify_all()


class JsonLinesSink:
    """Appends each packet as one line of canonical protobuf JSON (`telemetry.jsonl`).

    Each line goes to the file with its own `write` as it is delivered (no buffer to lose),
    so the file holds every packet up to a crash or a full disk. Telemetry only observes the
    run, so a write that fails (ENOSPC, EIO, ...) never fails it: the partial line is cut
    off, the sink stops writing, and `unwritten` counts what it could not write; `failure`
    says why, for the report's `warnings` (R13.5).
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _O_CLOEXEC, 0o644)
        self._lock = threading.Lock()
        self.written = 0
        """Packets written, one line each."""
        self.unwritten = 0
        """Packets delivered after the first failed write, which were not written."""
        self.failure = ""
        """Why writing stopped ("" while it goes on)."""

    def deliver(self, packet: TelemetryPacket) -> None:
        line = (json_format.MessageToJson(packet, indent=None) + "\n").encode("utf-8")
        with self._lock:
            if self.failure or self._fd < 0:
                self.unwritten += 1
                return
            end = os.lseek(self._fd, 0, os.SEEK_END)  # the only writer: where this line starts
            try:
                _write_all(self._fd, line)
            except OSError as err:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, end)  # no torn last line; frees what it took
                self.unwritten += 1
                self.failure = (
                    f"{self.path.name}: {err.strerror or err} after {self.written} packets; "
                    "telemetry stopped, training went on"
                )
                logger.error("telemetry stopped: %s", self.failure)
                return
            self.written += 1

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
