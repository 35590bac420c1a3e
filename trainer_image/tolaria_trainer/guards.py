"""The one gate components report to: breakers plus conservative mode (R1.4, R2).

Components call `success(breaker)` / `failure(breaker, reason)`; they never
decide policy themselves. A failure is recorded on the breaker, reported as an
event, and puts the run in conservative mode (R1.4). At each epoch end the
loop calls `end_epoch`, which leaves conservative mode after
`exitCleanEpochs` consecutive clean epochs with every breaker CLOSED (R2.3).
An epoch run in conservative mode is not a failure by itself: there is no
sticky halt.

Runs on the training thread only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from leyline import (
    BreakerId,
    CircuitBreakerState,
    ConservativeInterval,
    MessagePriority,
    TelemetryLevel,
)
from leyline.spec import BreakerSpec, ConservativeSpec
from tolaria_trainer.breaker import BreakerTransition, CircuitBreaker
from tolaria_trainer.protocols import Clock, EventSink

logger = logging.getLogger(__name__)

EVENT_BREAKER_FAILURE = "tolaria.breaker_failure"
EVENT_BREAKER_TRANSITION = "tolaria.breaker_transition"
EVENT_CONSERVATIVE_ENTERED = "tolaria.conservative_mode_entered"
EVENT_CONSERVATIVE_EXITED = "tolaria.conservative_mode_exited"

GUARDED = tuple(v for v in BreakerId.values() if v != BreakerId.BREAKER_ID_UNSPECIFIED)
"""Every breaker the runtime keeps, one per guarded operation (R2.1)."""


@dataclass
class ConservativeMode:
    """Whether the run sheds non-essential work, and the intervals it did so (R2.2)."""

    spec: ConservativeSpec
    active: bool = False
    clean_streak: int = 0
    intervals: list[ConservativeInterval] = field(default_factory=list)

    def enter(self, reason: str, epoch: int, step: int) -> bool:
        """Enters (or stays in) conservative mode; returns True when this call entered it."""
        self.clean_streak = 0
        if self.active:
            return False
        self.active = True
        self.intervals.append(
            ConservativeInterval(entered_epoch=epoch, entered_step=step, reason=reason)
        )
        return True

    def end_epoch(self, epoch: int, step: int, *, clean: bool, all_closed: bool) -> bool:
        """Counts a clean epoch; returns True when this epoch ends conservative mode (R2.3)."""
        if not self.active:
            return False
        self.clean_streak = self.clean_streak + 1 if clean else 0
        if self.clean_streak < self.spec.exit_clean_epochs or not all_closed:
            return False
        self.active = False
        interval = self.intervals[-1]
        interval.exited = True
        interval.exited_epoch = epoch
        interval.exited_step = step
        interval.exit_reason = f"{self.clean_streak} clean epochs with every breaker closed"
        self.clean_streak = 0
        return True


class Guards:
    """Breakers for every guarded operation and the conservative-mode decision."""

    def __init__(
        self,
        breaker_spec: BreakerSpec,
        conservative_spec: ConservativeSpec,
        clock: Clock,
        events: EventSink,
    ) -> None:
        self._events = events
        self.breakers = {
            b: CircuitBreaker(b, breaker_spec, clock, self._on_transition) for b in GUARDED
        }
        self.conservative = ConservativeMode(conservative_spec)
        self.epoch = 0
        self.step = 0
        self._failures_this_epoch = 0

    def at(self, epoch: int, step: int) -> None:
        """Tells the gate where training is, for the intervals it records."""
        self.epoch = epoch
        self.step = step

    def allow(self, breaker: BreakerId.ValueType) -> bool:
        return self.breakers[breaker].allow()

    def success(self, breaker: BreakerId.ValueType) -> None:
        self.breakers[breaker].record_success()

    def failure(self, breaker: BreakerId.ValueType, reason: str) -> None:
        """Records a failure, reports it, and enters conservative mode (R1.4)."""
        self._failures_this_epoch += 1
        self.breakers[breaker].record_failure(reason)
        name = BreakerId.Name(breaker)
        self._events.event(
            EVENT_BREAKER_FAILURE,
            TelemetryLevel.TELEMETRY_LEVEL_WARNING,
            MessagePriority.MESSAGE_PRIORITY_HIGH,
            breaker=name,
            reason=reason,
            epoch=str(self.epoch),
            step=str(self.step),
        )
        self.enter_conservative(f"{name}: {reason}")

    def enter_conservative(self, reason: str) -> None:
        if self.conservative.enter(reason, self.epoch, self.step):
            logger.warning("conservative mode entered at epoch %d: %s", self.epoch, reason)
            self._events.event(
                EVENT_CONSERVATIVE_ENTERED,
                TelemetryLevel.TELEMETRY_LEVEL_WARNING,
                MessagePriority.MESSAGE_PRIORITY_HIGH,
                reason=reason,
                epoch=str(self.epoch),
                step=str(self.step),
            )

    def all_closed(self) -> bool:
        return all(b.is_closed for b in self.breakers.values())

    def open_breakers(self) -> list[str]:
        return [
            BreakerId.Name(b.breaker)
            for b in self.breakers.values()
            if b.state != CircuitBreakerState.CIRCUIT_STATE_CLOSED
        ]

    def end_epoch(self, epoch: int, step: int) -> bool:
        """Closes the epoch's books; returns True when conservative mode was left (R2.3)."""
        clean = self._failures_this_epoch == 0
        self._failures_this_epoch = 0
        exited = self.conservative.end_epoch(epoch, step, clean=clean, all_closed=self.all_closed())
        if exited:
            reason = self.conservative.intervals[-1].exit_reason
            logger.info("conservative mode left at epoch %d: %s", epoch, reason)
            self._events.event(
                EVENT_CONSERVATIVE_EXITED,
                TelemetryLevel.TELEMETRY_LEVEL_INFO,
                MessagePriority.MESSAGE_PRIORITY_NORMAL,
                reason=reason,
                epoch=str(epoch),
                step=str(step),
            )
        return exited

    @property
    def epoch_is_clean(self) -> bool:
        return self._failures_this_epoch == 0

    def trips(self) -> int:
        return sum(b.trips for b in self.breakers.values())

    def _on_transition(self, t: BreakerTransition) -> None:
        opened = t.new == CircuitBreakerState.CIRCUIT_STATE_OPEN
        self._events.event(
            EVENT_BREAKER_TRANSITION,
            TelemetryLevel.TELEMETRY_LEVEL_WARNING
            if opened
            else TelemetryLevel.TELEMETRY_LEVEL_INFO,
            MessagePriority.MESSAGE_PRIORITY_HIGH
            if opened
            else MessagePriority.MESSAGE_PRIORITY_NORMAL,
            breaker=BreakerId.Name(t.breaker),
            old=CircuitBreakerState.Name(t.old),
            new=CircuitBreakerState.Name(t.new),
            reason=t.reason,
        )
