"""The trainer raising and resolving emergencies through the sidecar (R7.1, R7.3, R8.2).

`Emergencies.raise_` records the signal in the run history, emits a CRITICAL-priority event
and asks the sidecar to broadcast it (which returns the control-block generation);
`resolve` closes it. Without a sidecar the emergency is still recorded and logged; the
generation is then 0 and nothing waits on it. Times come from the injected `Clock` (monotonic)
and `wall_ns` (wall clock for timestamps), so tests pin both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from leyline import (
    SCHEMA_VERSION,
    AnomalyKind,
    EmergencyLevel,
    EmergencyRecord,
    EmergencyResolution,
    EmergencySignal,
    EmergencyState,
    MessagePriority,
    Participant,
    TelemetryLevel,
)
from tolaria_trainer.history import RunHistory
from tolaria_trainer.protocols import Clock, EventSink
from tolaria_trainer.recovery.link import SidecarLink, SidecarUnavailable
from tolaria_trainer.recovery.participant import EmergencyParticipant

logger = logging.getLogger(__name__)

EVENT_EMERGENCY = "tolaria.emergency"
ORIGIN = "tolaria-trainer"


class Emergencies:
    """Raises and resolves this trainer's emergencies; see the module docstring."""

    def __init__(
        self,
        *,
        run_id: str,
        link: SidecarLink,
        history: RunHistory,
        events: EventSink,
        clock: Clock,
        wall_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._run_id = run_id
        self._link = link
        self._history = history
        self._events = events
        self._clock = clock
        self._wall_ns = wall_ns
        self.participant: EmergencyParticipant | None = None
        """Set once attached: the trainer's own raises are marked so it does not act twice."""

    def raise_(
        self,
        level: EmergencyLevel.ValueType,
        kind: AnomalyKind.ValueType,
        detail: str,
        *,
        step: int,
        epoch: int,
        freeze: bool = True,
    ) -> int:
        """Records and broadcasts one emergency; returns its generation (0: not broadcast).

        A CRITICAL freezes this trainer at once (before the watcher sees the broadcast) unless
        `freeze` is False (a halt that ends the run now needs no freeze).
        """
        signal = EmergencySignal(
            version=SCHEMA_VERSION,
            level=level,
            reason=detail,
            origin=ORIGIN,
            monotonic_time_ms=self._clock.now_ns() // 1_000_000,
            run_id=self._run_id,
            kind=kind,
            global_step=step,
            epoch=epoch,
            source=Participant.PARTICIPANT_TRAINER,
        )
        signal.triggered_at.FromNanoseconds(self._wall_ns())
        record = EmergencyRecord(signal=signal, final_state=EmergencyState.EMERGENCY_STATE_RAISED)
        self._history.emergencies.append(record)
        self._events.event(
            EVENT_EMERGENCY,
            TelemetryLevel.TELEMETRY_LEVEL_CRITICAL
            if level >= EmergencyLevel.EMERGENCY_LEVEL_SEVERE
            else TelemetryLevel.TELEMETRY_LEVEL_WARNING,
            MessagePriority.MESSAGE_PRIORITY_CRITICAL,
            emergency_level=EmergencyLevel.Name(level),
            kind=AnomalyKind.Name(kind),
            detail=detail,
        )
        try:
            reply = self._link.raise_emergency(signal)
        except SidecarUnavailable as err:
            logger.error("emergency %s not broadcast: %s", EmergencyLevel.Name(level), err)
            return 0
        record.signal.generation = reply.generation
        if self.participant is not None:
            self.participant.own(reply.generation)
            if level == EmergencyLevel.EMERGENCY_LEVEL_CRITICAL and freeze:
                self.participant.freeze_now()
        return int(reply.generation)

    def resolve(self, generation: int, reason: str) -> None:
        """Closes the emergency of `generation` (0: nothing to close)."""
        if generation == 0:
            return
        resolution = EmergencyResolution(
            version=SCHEMA_VERSION,
            generation=generation,
            resolved_by=ORIGIN,
            reason=reason,
            run_id=self._run_id,
        )
        resolution.resolved_at.FromNanoseconds(self._wall_ns())
        for record in reversed(self._history.emergencies):
            if record.signal.generation == generation:
                record.final_state = EmergencyState.EMERGENCY_STATE_RESOLVED
                record.resolution.CopyFrom(resolution)
                break
        try:
            self._link.resolve_emergency(resolution)
        except SidecarUnavailable as err:
            logger.warning("resolution of emergency %d not delivered: %s", generation, err)
