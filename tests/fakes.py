"""Fakes for the runtime's Protocols, shared by tests (no inheritance needed)."""

from __future__ import annotations

from dataclasses import dataclass, field

from leyline import MessagePriority, TelemetryLevel, TelemetryPacket


class FakeClock:
    """A `Clock` that moves only when a test advances it."""

    def __init__(self, start_ns: int = 1_000_000_000) -> None:
        self.ns = start_ns

    def now_ns(self) -> int:
        return self.ns

    def advance_ms(self, ms: float) -> None:
        self.ns += int(ms * 1_000_000)

    def advance_s(self, seconds: float) -> None:
        self.ns += int(seconds * 1_000_000_000)


@dataclass
class RecordedEvent:
    name: str
    level: int
    priority: int
    attributes: dict[str, str]


@dataclass
class RecordingEvents:
    """An `EventSink` that keeps every event for assertions."""

    events: list[RecordedEvent] = field(default_factory=list)

    def event(
        self,
        name: str,
        level: TelemetryLevel.ValueType,
        priority: MessagePriority.ValueType,
        **attributes: str,
    ) -> None:
        self.events.append(RecordedEvent(name, level, priority, dict(attributes)))

    def named(self, name: str) -> list[RecordedEvent]:
        return [e for e in self.events if e.name == name]


@dataclass
class ListSink:
    """A `TelemetrySink` that keeps delivered packets in order."""

    packets: list[TelemetryPacket] = field(default_factory=list)

    def deliver(self, packet: TelemetryPacket) -> None:
        self.packets.append(packet)
