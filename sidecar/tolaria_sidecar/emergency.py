"""The emergency state machine (R7): levels, acknowledgements, escalation, halt, resolution.

Pure logic over the shared-memory `ControlBlock` and an injected `Clock` (monotonic ns, the
control block's clock), so tests advance time instead of sleeping. Called by the servicers
(`raise_signal`, `resolve`, the rollback deadline) and by the `EmergencyMonitor` thread
(`poll`: every millisecond while an acknowledgement is outstanding, every 100 ms otherwise).

Rules (R7.1, R7.3, R7.4):

* One incident at a time. While unresolved, a signal at or below its level returns the
  active generation and level; a higher one escalates the same incident under a new
  generation. Every publish (raise, escalation, halt, resolution) is a new generation in the
  control block, so participants polling the generation word see each of them.
* The action defaults to the level's (LOG, FULL_ROLLBACK, FAST_ROLLBACK, FREEZE) unless the
  signal names one.
* Required acks: CRITICAL needs every attached participant (the trainer's three lines of its
  current attempt, and the sidecar, which acks for itself at once); other levels need the
  TRAINER. A level's budget (`EmergencySpec`) passing with acks missing escalates one level,
  recording who was missing; at CRITICAL it halts (action HALT, state HALTED).
* CRITICAL unresolved for `halt_after_seconds` halts too. A halt is final for the incident:
  resolving it afterwards publishes RESUME but its record keeps the HALTED state.
* Resolution is explicit, for the active generation only; it publishes action RESUME with
  state RESOLVED.
* Stall watchdog: the TRAINER line's heartbeat older than `detection.stall_seconds` (after
  its first heartbeat, not while the rollback record shows a rollback in progress) raises
  CRITICAL STALLED_STEP; when the heartbeat moves again before a halt, the machine resolves
  that incident itself ("progress resumed").
* Full-rollback deadline: `start_rollback_deadline` arms a timer of
  `rollback.full_deadline_seconds`; no `finish_rollback` by then raises CRITICAL
  ROLLBACK_DEADLINE_MISSED.

Never blocks on a participant, never sleeps (except the monitor thread between polls), never
touches disk. Every transition appends an event and updates metrics; each incident's history
is kept as a Leyline `EmergencyRecord`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from leyline import (
    SCHEMA_VERSION,
    AnomalyKind,
    EmergencyAck,
    EmergencyAction,
    EmergencyLevel,
    EmergencyRecord,
    EmergencyResolution,
    EmergencySignal,
    EmergencyState,
    Participant,
)
from leyline.shm import PARTICIPANT_FLAG_ATTACHED, ControlBlock, ShmError
from leyline.shm import EmergencyRecord as ShmEmergency
from leyline.spec import DetectionSpec, EmergencySpec, RollbackSpec
from tolaria_sidecar.config import Tuning
from tolaria_sidecar.errors import NotFound, PreconditionFailed, RequestInvalid
from tolaria_sidecar.metrics import SidecarMetrics
from tolaria_sidecar.protocols import Clock, EventSink

logger = logging.getLogger(__name__)

L = EmergencyLevel
MINOR = L.EMERGENCY_LEVEL_MINOR
MAJOR = L.EMERGENCY_LEVEL_MAJOR
SEVERE = L.EMERGENCY_LEVEL_SEVERE
CRITICAL = L.EMERGENCY_LEVEL_CRITICAL
RAISED = EmergencyState.EMERGENCY_STATE_RAISED
ACKNOWLEDGED = EmergencyState.EMERGENCY_STATE_ACKNOWLEDGED
ESCALATED = EmergencyState.EMERGENCY_STATE_ESCALATED
RESOLVED = EmergencyState.EMERGENCY_STATE_RESOLVED
HALTED = EmergencyState.EMERGENCY_STATE_HALTED
TRAINER = Participant.PARTICIPANT_TRAINER
SIDECAR = Participant.PARTICIPANT_SIDECAR
TRAINER_SIDE = (TRAINER, Participant.PARTICIPANT_KASMINA, Participant.PARTICIPANT_TAMIYO)
"""Participants living in the trainer process; they register their own control-block lines."""

DEFAULT_ACTION: dict[int, EmergencyAction.ValueType] = {
    MINOR: EmergencyAction.EMERGENCY_ACTION_LOG,
    MAJOR: EmergencyAction.EMERGENCY_ACTION_FULL_ROLLBACK,
    SEVERE: EmergencyAction.EMERGENCY_ACTION_FAST_ROLLBACK,
    CRITICAL: EmergencyAction.EMERGENCY_ACTION_FREEZE,
}
_LOG_LEVEL = {MINOR: logging.WARNING, MAJOR: logging.ERROR, SEVERE: logging.ERROR}


def level_name(level: int) -> str:
    return EmergencyLevel.Name(level)  # type: ignore[arg-type]


def participant_name(participant: int) -> str:
    return Participant.Name(participant).removeprefix("PARTICIPANT_")  # type: ignore[arg-type]


def budget_ms(spec: EmergencySpec, level: int) -> float:
    """The response budget of `level` (R7.1)."""
    if level == MINOR:
        return spec.minor_ms
    if level == MAJOR:
        return spec.major_ms
    if level == SEVERE:
        return spec.severe_ms
    if level == CRITICAL:
        return spec.critical_ms
    raise ValueError(f"no response budget for emergency level {level}")


def _wall_ns_of(monotonic: int) -> int:
    """A CLOCK_MONOTONIC stamp (an ack's) converted to wall time."""
    return time.time_ns() - (time.monotonic_ns() - monotonic)


@dataclass
class _Incident:
    number: int
    signal: EmergencySignal
    raised_ns: int
    required: frozenset[int]
    record: EmergencyRecord
    state: EmergencyState.ValueType = RAISED
    critical_since_ns: int | None = None
    acked: dict[int, EmergencyAck] = field(default_factory=dict)

    @property
    def generation(self) -> int:
        return self.signal.generation

    @property
    def level(self) -> int:
        return self.signal.level


@dataclass
class _Stall:
    heartbeat_ns: int
    incident: int | None
    """The incident the watchdog opened or escalated (None: it merged into another)."""


@dataclass
class _Deadline:
    rollback_id: str
    deadline_ns: int


class EmergencyMachine:
    """See the module docstring. Thread-safe; every public method takes the machine's lock."""

    def __init__(
        self,
        *,
        run_id: str,
        control: ControlBlock,
        emergency: EmergencySpec,
        detection: DetectionSpec,
        rollback: RollbackSpec,
        tuning: Tuning,
        clock: Clock,
        events: EventSink,
        metrics: SidecarMetrics,
    ) -> None:
        """Adopts an unresolved incident found in the control block (sidecar restart) and
        continues its generation counter."""
        self._run_id = run_id
        self._control = control
        self._spec = emergency
        self._detection = detection
        self._rollback = rollback
        self._clock = clock
        self._events = events
        self._metrics = metrics
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._history: deque[_Incident] = deque(maxlen=tuning.emergency_history)
        self._active: _Incident | None = None
        self._incidents = 0
        self._trainer_attached: bool | None = None
        self._attempt: int | None = None
        self._stall: _Stall | None = None
        self._deadline: _Deadline | None = None
        self._missed_deadlines: deque[str] = deque(maxlen=64)
        self.on_raise: Callable[[], None] | None = None
        """Called after every publish that awaits acks (the monitor switches to 1 ms)."""
        control.register(SIDECAR, os.getpid(), 0)
        try:
            found = control.read_emergency()
        except ShmError:
            found = ShmEmergency()
        self._generation = max(found.generation, control.emergency_generation())
        if found.generation and found.state in (RAISED, ACKNOWLEDGED, ESCALATED, HALTED):
            self._adopt(found)

    # -- trainer attachment -------------------------------------------------------------------

    def attach_trainer(self, attempt: int) -> None:
        """A trainer attempt attached: its lines (this attempt only) count for CRITICAL."""
        with self._lock:
            self._trainer_attached = True
            self._attempt = attempt
            self._stall = None

    def detach_trainer(self) -> None:
        """The trainer detached: no trainer-side participant is required any more."""
        with self._lock:
            self._trainer_attached = False
            self._stall = None

    def _required(self, level: int) -> frozenset[int]:
        if level != CRITICAL:
            return frozenset({TRAINER})
        required = {SIDECAR}
        if self._trainer_attached is False:
            return frozenset(required)
        if self._trainer_attached:
            required.add(TRAINER)
        for participant in TRAINER_SIDE:
            line = self._control.participant(participant)
            attached = bool(line.flags & PARTICIPANT_FLAG_ATTACHED)
            if attached and (self._attempt is None or line.attempt == self._attempt):
                required.add(participant)
        return frozenset(required)

    # -- queries ------------------------------------------------------------------------------

    @property
    def awaiting_acks(self) -> bool:
        with self._lock:
            return self._active is not None and self._active.state in (RAISED, ESCALATED)

    def active(self) -> EmergencySignal | None:
        """The unresolved incident's current signal (a copy), or None."""
        with self._lock:
            if self._active is None:
                return None
            signal = EmergencySignal()
            signal.CopyFrom(self._active.signal)
            return signal

    def active_state(self) -> EmergencyState.ValueType | None:
        with self._lock:
            return None if self._active is None else self._active.state

    def history(self) -> list[EmergencyRecord]:
        """Every kept incident, oldest first, the active one with its current state."""
        with self._lock:
            out = []
            for incident in self._history:
                record = EmergencyRecord()
                record.CopyFrom(incident.record)
                if incident is self._active:
                    record.final_state = incident.state
                out.append(record)
            return out

    def find_ack(self, generation: int, participant: int) -> EmergencyAck | None:
        with self._lock:
            for incident in reversed(self._history):
                for ack in incident.record.acks:
                    if ack.generation == generation and ack.participant == participant:
                        return ack
            return None

    def wait_for_ack(
        self, generation: int, participant: int, timeout_s: float
    ) -> EmergencyAck | None:
        """Blocks a servicer thread until `participant` acked `generation` (collected by the
        monitor's `poll`), or `timeout_s` passes (real time)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                ack = self.find_ack(generation, participant)
                if ack is not None:
                    return ack
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    # -- raising ------------------------------------------------------------------------------

    def raise_signal(self, signal: EmergencySignal) -> tuple[int, EmergencyLevel.ValueType]:
        """Raises `signal`; returns (generation, effective level). See the module rules."""
        if signal.level not in DEFAULT_ACTION:
            raise RequestInvalid("level", f"must be MINOR..CRITICAL (1..4), got {signal.level}")
        with self._lock:
            generation, level, _ = self._raise(signal)
            return generation, level  # type: ignore[return-value]

    def _raise(self, signal: EmergencySignal) -> tuple[int, int, bool]:
        """(generation, level, whether this signal opened or escalated the incident)."""
        active = self._active
        if active is not None:
            if signal.level <= active.level:
                logger.info(
                    "%s signal (%s) merged into active %s emergency generation %d",
                    level_name(signal.level),
                    signal.reason,
                    level_name(active.level),
                    active.generation,
                )
                return active.generation, active.level, False
            self._escalate(active, signal.level, signal.reason, (), signal=signal)
            return active.generation, active.level, True
        incident = self._open(signal)
        return incident.generation, incident.level, True

    def _next_generation(self) -> int:
        self._generation += 1
        return self._generation

    def _open(self, signal: EmergencySignal) -> _Incident:
        now = self._clock.now_ns()
        published = EmergencySignal()
        published.CopyFrom(signal)
        published.version = SCHEMA_VERSION
        published.generation = self._next_generation()
        published.action = signal.action or DEFAULT_ACTION[signal.level]
        published.run_id = self._run_id
        published.monotonic_time_ms = now // 1_000_000
        if not published.HasField("triggered_at"):
            published.triggered_at.GetCurrentTime()
        self._incidents += 1
        incident = _Incident(
            number=self._incidents,
            signal=published,
            raised_ns=now,
            required=self._required(signal.level),
            record=EmergencyRecord(),
            critical_since_ns=now if signal.level == CRITICAL else None,
        )
        incident.record.signal.CopyFrom(published)
        self._active = incident
        self._history.append(incident)
        self._write(incident, RAISED)
        self._metrics.emergencies.labels(
            level_name(signal.level),
            AnomalyKind.Name(published.kind)
            if published.kind
            else AnomalyKind.Name(AnomalyKind.ANOMALY_KIND_MANUAL),
        ).inc()
        self._events.publish("emergency", published)
        logger.log(
            _LOG_LEVEL.get(signal.level, logging.CRITICAL),
            "%s emergency raised (generation %d, %s, by %s): %s",
            level_name(signal.level),
            published.generation,
            EmergencyAction.Name(published.action),
            participant_name(published.source) if published.source else published.origin or "?",
            published.reason,
        )
        self._published(incident)
        return incident

    def _escalate(
        self,
        incident: _Incident,
        level: int,
        reason: str,
        missing: tuple[int, ...],
        *,
        signal: EmergencySignal | None = None,
    ) -> None:
        now = self._clock.now_ns()
        published = EmergencySignal()
        published.CopyFrom(incident.signal)
        published.generation = self._next_generation()
        published.level = level  # type: ignore[assignment]
        published.action = (
            signal.action if signal is not None and signal.action else DEFAULT_ACTION[level]
        )
        published.reason = reason
        published.monotonic_time_ms = now // 1_000_000
        if signal is not None:
            published.kind = signal.kind or published.kind
            published.source = signal.source or published.source
            published.origin = signal.origin or published.origin
            published.global_step = signal.global_step or published.global_step
            published.epoch = signal.epoch or published.epoch
            published.incident_id = signal.incident_id or published.incident_id
        incident.signal = published
        incident.raised_ns = now
        incident.acked = {}
        incident.required = self._required(level)
        if level == CRITICAL and incident.critical_since_ns is None:
            incident.critical_since_ns = now
        incident.record.signal.CopyFrom(published)
        incident.record.escalated_to.append(level)  # type: ignore[arg-type]
        incident.record.missing_acks.extend(missing)  # type: ignore[arg-type]
        self._write(incident, ESCALATED)
        self._metrics.escalations.labels(level_name(level)).inc()
        self._events.publish("emergency", published)
        logger.log(
            logging.CRITICAL if level == CRITICAL else logging.ERROR,
            "emergency escalated to %s (generation %d): %s",
            level_name(level),
            published.generation,
            reason,
        )
        self._published(incident)

    def _halt(self, incident: _Incident, reason: str, missing: tuple[int, ...]) -> None:
        now = self._clock.now_ns()
        published = EmergencySignal()
        published.CopyFrom(incident.signal)
        published.generation = self._next_generation()
        published.level = CRITICAL
        published.action = EmergencyAction.EMERGENCY_ACTION_HALT
        published.reason = reason
        published.monotonic_time_ms = now // 1_000_000
        incident.signal = published
        incident.raised_ns = now
        incident.acked = {}
        incident.record.signal.CopyFrom(published)
        incident.record.missing_acks.extend(missing)  # type: ignore[arg-type]
        incident.record.final_state = HALTED
        self._write(incident, HALTED)
        self._metrics.halts.inc()
        self._events.publish("emergency", published)
        logger.critical("HALT (generation %d): %s", published.generation, reason)
        self._self_ack(incident)

    def _published(self, incident: _Incident) -> None:
        self._self_ack(incident)
        self._metrics.emergency_level.set(incident.level)
        if self.on_raise is not None:
            self.on_raise()

    def _self_ack(self, incident: _Incident) -> None:
        self._control.ack(
            SIDECAR, incident.generation, incident.level, frozen=incident.level == CRITICAL
        )
        self._collect(incident)

    def _write(self, incident: _Incident, state: EmergencyState.ValueType) -> None:
        incident.state = state
        s = incident.signal
        self._control.write_emergency(
            ShmEmergency(
                generation=s.generation,
                level=s.level,
                action=s.action,
                kind=s.kind,
                state=state,
                raised_ns=incident.raised_ns,
                global_step=s.global_step,
                source=s.source,
                reason=s.reason,
            )
        )

    def _adopt(self, found: ShmEmergency) -> None:
        signal = EmergencySignal(
            version=SCHEMA_VERSION,
            level=found.level,  # type: ignore[arg-type]
            reason=found.reason,
            run_id=self._run_id,
            generation=found.generation,
            kind=found.kind,  # type: ignore[arg-type]
            action=found.action,  # type: ignore[arg-type]
            global_step=found.global_step,
            source=found.source,  # type: ignore[arg-type]
            origin="control block (adopted after a sidecar restart)",
        )
        self._incidents += 1
        incident = _Incident(
            number=self._incidents,
            signal=signal,
            raised_ns=found.raised_ns,
            required=self._required(found.level),
            record=EmergencyRecord(signal=signal),
            state=found.state,  # type: ignore[arg-type]
            critical_since_ns=found.raised_ns if found.level == CRITICAL else None,
        )
        self._active = incident
        self._history.append(incident)
        self._metrics.emergency_level.set(found.level)
        logger.error(
            "adopted unresolved %s emergency generation %d from the control block: %s",
            level_name(found.level),
            found.generation,
            found.reason,
        )

    # -- polling ------------------------------------------------------------------------------

    def poll(self) -> None:
        """Collects acks and applies budgets, the halt timer, the stall watchdog and the
        rollback deadline; called by the monitor thread."""
        with self._lock:
            now = self._clock.now_ns()
            self._check_deadline(now)
            self._check_stall(now)
            incident = self._active
            if incident is None:
                return
            self._collect(incident)
            if incident.state in (RAISED, ESCALATED):
                missing = tuple(sorted(incident.required - incident.acked.keys()))
                if not missing:
                    self._write(incident, ACKNOWLEDGED)
                    logger.info(
                        "%s emergency generation %d acknowledged by %s",
                        level_name(incident.level),
                        incident.generation,
                        ", ".join(participant_name(p) for p in sorted(incident.acked)),
                    )
                elif now - incident.raised_ns >= budget_ms(self._spec, incident.level) * 1e6:
                    self._missed(incident, missing)
            if (
                incident.state != HALTED
                and incident.critical_since_ns is not None
                and now - incident.critical_since_ns >= self._spec.halt_after_seconds * 1e9
            ):
                self._halt(
                    incident,
                    f"CRITICAL unresolved for {self._spec.halt_after_seconds:g} s",
                    (),
                )

    def _missed(self, incident: _Incident, missing: tuple[int, ...]) -> None:
        names = ", ".join(participant_name(p) for p in missing)
        for participant in missing:
            self._metrics.missing_acks.labels(Participant.Name(participant)).inc()  # type: ignore[arg-type]
        level = incident.level
        why = (
            f"no acknowledgement from {names} within {budget_ms(self._spec, level):g} ms "
            f"at {level_name(level)}"
        )
        if level < CRITICAL:
            self._escalate(incident, level + 1, f"{why}; escalated", missing)
        else:
            self._halt(incident, f"{why}; halting", missing)

    def _collect(self, incident: _Incident) -> None:
        """Records the acks of the current generation written since the last look."""
        found = False
        for participant in sorted(incident.required | {*TRAINER_SIDE, SIDECAR}):
            if participant in incident.acked:
                continue
            line = self._control.participant(participant)
            if line.ack_generation != incident.generation:
                continue
            ack = EmergencyAck(
                version=SCHEMA_VERSION,
                generation=incident.generation,
                participant=participant,  # type: ignore[arg-type]
                level=line.acked_level,  # type: ignore[arg-type]
                latency_ns=max(0, line.acked_ns - incident.raised_ns),
                run_id=self._run_id,
                frozen=line.frozen,
            )
            ack.acked_at.FromNanoseconds(_wall_ns_of(line.acked_ns))
            incident.acked[participant] = ack
            incident.record.acks.append(ack)
            self._metrics.ack_latency.labels(level_name(incident.level)).observe(
                ack.latency_ns / 1e9
            )
            self._events.publish("ack", ack)
            found = True
        if found:
            self._cond.notify_all()

    # -- resolution ---------------------------------------------------------------------------

    def resolve(
        self, generation: int, by: str, reason: str, *, incident_id: str = ""
    ) -> EmergencyResolution:
        """Resolves the active incident if `generation` is its current one.

        Raises `RequestInvalid` (generation 0), `NotFound` (never issued) or
        `PreconditionFailed` (nothing active, or a superseded generation).
        """
        if generation <= 0:
            raise RequestInvalid("generation", "must be > 0")
        with self._lock:
            return self._resolve(generation, by, reason, incident_id)

    def _resolve(
        self, generation: int, by: str, reason: str, incident_id: str
    ) -> EmergencyResolution:
        incident = self._active
        if generation > self._generation:
            raise NotFound(
                "generation", f"{generation} was never issued (latest is {self._generation})"
            )
        if incident is None:
            raise PreconditionFailed("generation", f"{generation}: no emergency is active")
        if generation != incident.generation:
            raise PreconditionFailed(
                "generation",
                f"{generation} is not the active generation {incident.generation} "
                "(the emergency escalated since)",
            )
        resolution = EmergencyResolution(
            version=SCHEMA_VERSION,
            generation=generation,
            resolved_by=by,
            reason=reason,
            run_id=self._run_id,
            incident_id=incident_id or incident.signal.incident_id,
        )
        resolution.resolved_at.GetCurrentTime()
        halted = incident.state == HALTED
        incident.record.resolution.CopyFrom(resolution)
        incident.record.final_state = HALTED if halted else RESOLVED
        published = EmergencySignal()
        published.CopyFrom(incident.signal)
        published.generation = self._next_generation()
        published.action = EmergencyAction.EMERGENCY_ACTION_RESUME
        published.reason = f"resolved by {by}: {reason}"
        incident.signal = published
        incident.raised_ns = self._clock.now_ns()
        self._write(incident, RESOLVED)
        self._active = None
        self._metrics.emergency_level.set(0)
        self._events.publish("resolution", resolution)
        self._control.ack(SIDECAR, published.generation, published.level, frozen=False)
        logger.warning(
            "%s emergency generation %d resolved by %s: %s",
            level_name(incident.level),
            generation,
            by,
            reason,
        )
        return resolution

    # -- stall watchdog and rollback deadline -------------------------------------------------

    def _rollback_in_progress(self, now: int) -> bool:
        try:
            record = self._control.read_rollback()
        except ShmError:
            return False
        if not record.rollback_id or not record.phase:
            return False
        return record.deadline_ns == 0 or now < record.deadline_ns

    def _check_stall(self, now: int) -> None:
        if self._trainer_attached is False:
            return
        line = self._control.participant(TRAINER)
        beat = line.heartbeat_ns
        if beat == 0:
            return
        if self._stall is not None:
            if beat == self._stall.heartbeat_ns:
                return
            incident = self._active
            stall, self._stall = self._stall, None
            if (
                incident is not None
                and incident.number == stall.incident
                and incident.state != HALTED
                and incident.signal.kind == AnomalyKind.ANOMALY_KIND_STALLED_STEP
            ):
                self._resolve(incident.generation, "sidecar", "progress resumed", "")
            return
        age_ns = now - beat
        if age_ns <= self._detection.stall_seconds * 1e9 or self._rollback_in_progress(now):
            return
        signal = EmergencySignal(
            level=CRITICAL,
            kind=AnomalyKind.ANOMALY_KIND_STALLED_STEP,
            source=SIDECAR,
            origin="sidecar",
            reason=(
                f"no trainer heartbeat for {age_ns / 1e9:.1f} s (stall budget "
                f"{self._detection.stall_seconds:g} s) at step {line.heartbeat_step}"
            ),
            global_step=line.heartbeat_step,
            epoch=line.heartbeat_epoch,
        )
        _, _, changed = self._raise(signal)
        owner = self._active.number if changed and self._active is not None else None
        self._stall = _Stall(heartbeat_ns=beat, incident=owner)

    def start_rollback_deadline(self, rollback_id: str) -> int:
        """Arms the full-rollback deadline; returns it (monotonic ns). A second call for
        another rollback replaces the first."""
        with self._lock:
            deadline = self._clock.now_ns() + int(self._rollback.full_deadline_seconds * 1e9)
            self._deadline = _Deadline(rollback_id, deadline)
            return deadline

    def finish_rollback(self, rollback_id: str) -> bool:
        """Clears the deadline of `rollback_id`; False when none was armed for it."""
        with self._lock:
            if self._deadline is None or self._deadline.rollback_id != rollback_id:
                return False
            self._deadline = None
            return True

    def deadline_missed_for(self, rollback_id: str) -> bool:
        """True when full rollback `rollback_id` missed its deadline (its late report is not
        counted a second time)."""
        with self._lock:
            return rollback_id in self._missed_deadlines

    @property
    def rollback_pending(self) -> str | None:
        with self._lock:
            return None if self._deadline is None else self._deadline.rollback_id

    def _check_deadline(self, now: int) -> None:
        deadline = self._deadline
        if deadline is None or now < deadline.deadline_ns:
            return
        self._deadline = None
        self._missed_deadlines.append(deadline.rollback_id)
        self._metrics.rollback_deadline_missed()
        self._raise(
            EmergencySignal(
                level=CRITICAL,
                kind=AnomalyKind.ANOMALY_KIND_ROLLBACK_DEADLINE_MISSED,
                source=SIDECAR,
                origin="sidecar",
                reason=(
                    f"full rollback {deadline.rollback_id} not reported within "
                    f"{self._rollback.full_deadline_seconds:g} s"
                ),
            )
        )


class EmergencyMonitor:
    """The thread that calls `poll` every 1 ms while acks are outstanding, else every 100 ms."""

    def __init__(self, machine: EmergencyMachine, tuning: Tuning) -> None:
        self._machine = machine
        self._active_s = tuning.monitor_active_interval_ms / 1e3
        self._idle_s = tuning.monitor_idle_interval_ms / 1e3
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="emergency-monitor", daemon=True)
        machine.on_raise = self._wake.set

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._machine.poll()
            except Exception:  # boundary: the monitor must outlive any one bad poll
                logger.exception("emergency poll failed")
            interval = self._active_s if self._machine.awaiting_acks else self._idle_s
            self._wake.wait(interval)
            self._wake.clear()
