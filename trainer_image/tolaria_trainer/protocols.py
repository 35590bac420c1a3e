"""The seams of the training runtime, as `typing.Protocol`s.

Fakes in tests satisfy these without inheritance. Every blocking method takes
its deadline as an absolute `time.perf_counter_ns()` value and says what it
must never do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from leyline import (
    AdaptationCommand,
    MessagePriority,
    SeedState,
    SystemStatePacket,
    TelemetryLevel,
    TelemetryPacket,
)

JsonDict = dict[str, Any]
"""A JSON-serialisable mapping: the only form non-tensor state is saved in (never pickle)."""


class Clock(Protocol):
    """Monotonic time in nanoseconds (`time.perf_counter_ns` in production)."""

    def now_ns(self) -> int:
        """Current monotonic time; never goes backwards."""
        ...


@runtime_checkable
class TamiyoPolicy(Protocol):
    """The strategic policy consulted once per epoch by the end-of-epoch hook (R1.1, R1.3)."""

    def decide(self, state: SystemStatePacket, *, deadline_ns: int) -> AdaptationCommand:
        """Answer before `deadline_ns` or be abandoned; never mutate `state` or wait on a process.

        A late answer is discarded and replaced by a fallback command. The call
        runs on a worker thread, so it must not touch the model or optimizer.
        """
        ...

    def state_dict(self) -> JsonDict:
        """Policy state for snapshots and checkpoints, JSON-serialisable."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores what `state_dict` returned."""
        ...


@runtime_checkable
class SeedManager(Protocol):
    """Kasmina: owns the seeds and their lifecycle; applies Tamiyo's seed commands (R1.1, R5)."""

    def apply_command(self, command: AdaptationCommand, *, deadline_ns: int) -> str:
        """Applies a command within the 1.5 ms command share; returns what was done, for the report.

        Raises `ValueError` for a command it refuses (e.g. a seed operation
        while conservative); must not block on I/O or another process.
        """
        ...

    def export_seed_states(self) -> Sequence[SeedState]:
        """Current seeds with stage, age and `metrics["alpha"]` (R5.1)."""
        ...

    def state_dict(self) -> JsonDict:
        """Seed metadata for snapshots and checkpoints, JSON-serialisable."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores what `state_dict` returned."""
        ...


class TelemetrySink(Protocol):
    """Where delivered telemetry packets go (a log file, a bus, a test list)."""

    def deliver(self, packet: TelemetryPacket) -> None:
        """Takes one packet; must return quickly and never raise for a bad packet."""
        ...


class EventSink(Protocol):
    """What components use to report a named event (R8); implemented by `TelemetryHub`."""

    def event(
        self,
        name: str,
        level: TelemetryLevel.ValueType,
        priority: MessagePriority.ValueType,
        **attributes: str,
    ) -> None:
        """Records an event; CRITICAL priority is delivered before anything queued (R8.1)."""
        ...
