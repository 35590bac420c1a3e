"""`SidecarView`: the operator's in-memory mirror of one run's sidecar, fed by `GetStatus` and
the `StreamEvents` stream, and what each event asks the operator to do (`Change`).

Written only by that run's sidecar follower (`watcher.py`), read by the reconciler when it
computes status. Pure: no I/O, no clock reads (the caller passes `now`).

Replays. A fresh stream starts at sequence 0, so the sidecar replays its ring: old rollbacks
and old emergencies come back. The `GetStatus` taken just before is the truth about what is
active: a replayed `rollback_started` or `emergency` that is not the active one and is older
than the connection (less `replay_allowance_s` for clock skew between nodes) is history, and
is not acted on again. Without this, an operator restart would re-enforce the deadline of a
rollback that finished long ago.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from google.protobuf.timestamp_pb2 import Timestamp

from leyline import (
    AnomalyKind,
    CheckpointRecord,
    EmergencyAck,
    EmergencyResolution,
    EmergencySignal,
    HealthStatus,
    Participant,
    RollbackOutcome,
    RollbackReport,
    RollbackRequest,
    RollbackTier,
)
from leyline.spec import RollbackSpec
from leyline.spec.status import CheckpointStatus, ProgressStatus, RollbackStatus, SnapshotStatus
from leyline.v1.sidecar_pb2 import SidecarEvent, SidecarStatus, SlotInfo
from tolaria_operator.clock import format_time
from tolaria_operator.deadline import IN_PROGRESS, deadline_for
from tolaria_operator.resources import enum_name, spell

RollbackState = Literal["InProgress", "Succeeded", "Failed", "DeadlineMissed"]

REPLAY_ALLOWANCE_S = 30.0
"""Clock skew tolerated between a sidecar's node and the operator when telling a replayed
event from a live one."""


def to_datetime(ts: Timestamp) -> datetime | None:
    """A protobuf Timestamp as an aware datetime; None when unset."""
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return ts.ToDatetime(tzinfo=UTC)


def _tier(value: int) -> int | None:
    return (
        value
        if value
        in (
            RollbackTier.ROLLBACK_TIER_FAST,
            RollbackTier.ROLLBACK_TIER_FULL,
            RollbackTier.ROLLBACK_TIER_CRASH_RESUME,
        )
        else None
    )


def _anomaly(value: int) -> int | None:
    return (
        value
        if value != AnomalyKind.ANOMALY_KIND_UNSPECIFIED
        and value in {int(number) for _, number in AnomalyKind.items()}
        else None
    )


def _spelled(wrapper: Any, value: int | None) -> Any:
    """The name the status model validates (it takes names, as manifests do)."""
    return spell(wrapper, value) if value else None


def rollback_started(request: RollbackRequest, spec: RollbackSpec, at: datetime) -> RollbackStatus:
    """`status.rollback` for a rollback that started at `at`; a full one gets its deadline."""
    started = to_datetime(request.requested_at) or at
    tier = _tier(request.tier)
    return RollbackStatus(
        id=request.rollback_id,
        tier=_spelled(RollbackTier, tier),
        reason=_spelled(AnomalyKind, _anomaly(request.reason)),
        state=IN_PROGRESS,
        started_at=format_time(started),
        deadline=(
            format_time(deadline_for(started, spec))
            if tier == RollbackTier.ROLLBACK_TIER_FULL
            else ""
        ),
    )


_FINAL_STATES: dict[int, RollbackState] = {
    RollbackOutcome.ROLLBACK_OUTCOME_SUCCEEDED: "Succeeded",
    RollbackOutcome.ROLLBACK_OUTCOME_DEADLINE_MISSED: "DeadlineMissed",
}


def rollback_finished(
    report: RollbackReport, previous: RollbackStatus | None, at: datetime
) -> RollbackStatus:
    """`status.rollback` once the trainer reported the rollback: Succeeded, DeadlineMissed or
    Failed (aborted and escalated count as failed)."""
    started = to_datetime(report.started_at)
    same = previous is not None and previous.id == report.rollback_id
    finished = started + timedelta(microseconds=report.total_ns / 1000) if started else at
    return RollbackStatus(
        id=report.rollback_id,
        tier=_spelled(RollbackTier, _tier(report.tier)),
        reason=_spelled(AnomalyKind, _anomaly(report.reason)),
        state=_FINAL_STATES.get(report.outcome, "Failed"),
        started_at=previous.started_at if same and previous else format_time(started or at),
        deadline=previous.deadline if same and previous else "",
        finished_at=format_time(finished),
    )


def _snapshot(slot: SlotInfo) -> SnapshotStatus:
    return SnapshotStatus(
        slot=slot.index, generation=slot.generation, step=slot.global_step, epoch=slot.epoch
    )


def _checkpoint(record: CheckpointRecord) -> CheckpointStatus:
    committed = to_datetime(record.committed_at)
    return CheckpointStatus(
        id=record.checkpoint_id,
        epoch=record.epoch,
        step=record.global_step,
        time=format_time(committed) if committed else "",
        bytes=record.payload_bytes,
    )


@dataclass
class Change:
    """What one event asks of the operator."""

    dirty: bool = False
    """Status fields changed: write them within the rate limit."""
    urgent: bool = False
    """Write now and recompute the phase (rollback, emergency, resolution)."""
    emergency: EmergencySignal | None = None
    """A live emergency the operator may escalate."""
    resolution: EmergencyResolution | None = None
    """The sidecar resolved an emergency."""
    ack: EmergencyAck | None = None
    """A participant acknowledged an emergency."""
    finished: RollbackReport | None = None
    """A rollback ended (for the duration histogram)."""


@dataclass
class SidecarView:
    """What the operator knows of one run's sidecar (attempt `attempt`)."""

    attempt: int = 0
    last_sequence: int = 0
    reachable: bool = False
    unreachable_reason: str = "not connected yet"
    connected_at: datetime | None = None
    progress: ProgressStatus | None = None
    latest_snapshot: SnapshotStatus | None = None
    latest_checkpoint: CheckpointStatus | None = None
    rollback: RollbackStatus | None = None
    health: int = HealthStatus.HEALTH_STATUS_UNKNOWN
    degraded_reason: str = ""
    active_emergency: EmergencySignal | None = None
    active_rollback_id: str = ""
    finished_rollbacks: set[str] = field(default_factory=set)

    def reset(self, attempt: int) -> None:
        """A new attempt means a new sidecar: its sequences and its state start over."""
        fresh = SidecarView(attempt=attempt)
        for name in fresh.__dataclass_fields__:
            setattr(self, name, getattr(fresh, name))

    def mark_unreachable(self, reason: str) -> None:
        self.reachable = False
        self.unreachable_reason = reason

    def apply_status(self, status: SidecarStatus, spec: RollbackSpec, now: datetime) -> None:
        """Take a `GetStatus` answer as the truth at `now` (the moment of connecting)."""
        self.reachable = True
        self.unreachable_reason = ""
        self.connected_at = now
        self.health = status.health
        self.degraded_reason = "" if status.fast_tier_feasible else status.degraded_reason
        heartbeat = to_datetime(status.last_heartbeat)
        self.progress = ProgressStatus(
            epoch=status.epoch,
            step=status.global_step,
            heartbeat=format_time(heartbeat) if heartbeat else "",
            loss=self.progress.loss if self.progress else 0.0,
        )
        committed = [s for s in status.slots if s.committed and s.generation > 0]
        if committed:
            self.latest_snapshot = _snapshot(max(committed, key=lambda s: s.generation))
        if status.last_checkpoint.checkpoint_id:
            self.latest_checkpoint = _checkpoint(status.last_checkpoint)
        active = status.active_rollback
        self.active_rollback_id = active.rollback_id
        if active.rollback_id and (self.rollback is None or self.rollback.id != active.rollback_id):
            self.rollback = rollback_started(active, spec, now)
        self.active_emergency = (
            status.active_emergency if status.active_emergency.generation > 0 else None
        )

    def _is_replay(self, at: datetime | None, now: datetime) -> bool:
        if self.connected_at is None or at is None:
            return False
        return at < self.connected_at - timedelta(seconds=REPLAY_ALLOWANCE_S) and at < now

    def apply_event(self, event: SidecarEvent, spec: RollbackSpec, now: datetime) -> Change:
        """Fold one streamed event into the view; returns what the operator must do."""
        change = Change()
        if event.sequence and event.sequence <= self.last_sequence:
            return change  # already seen (a resumed stream may repeat the boundary)
        self.last_sequence = max(self.last_sequence, event.sequence)
        at = to_datetime(event.at) or now
        kind = event.WhichOneof("event")
        if kind == "progress":
            p = event.progress
            heartbeat = to_datetime(p.heartbeat) or at
            self.progress = ProgressStatus(
                epoch=p.epoch,
                step=p.global_step,
                heartbeat=format_time(heartbeat),
                loss=self.progress.loss if self.progress else 0.0,
            )
            self.health = p.health
            change.dirty = True
        elif kind == "snapshot":
            if event.snapshot.slot.committed and event.snapshot.slot.generation > 0:
                self.latest_snapshot = _snapshot(event.snapshot.slot)
                change.dirty = True
        elif kind == "checkpoint":
            self.latest_checkpoint = _checkpoint(event.checkpoint)
            change.dirty = True
        elif kind == "rollback_started":
            self._started(event.rollback_started.request, spec, at, now, change)
        elif kind == "rollback_finished":
            report = event.rollback_finished
            self.finished_rollbacks.add(report.rollback_id)
            if report.rollback_id == self.active_rollback_id:
                self.active_rollback_id = ""
            self.rollback = rollback_finished(report, self.rollback, at)
            change.finished = report
            change.urgent = change.dirty = True
        elif kind == "emergency":
            signal = event.emergency
            active = self.active_emergency
            still_active = active is not None and signal.generation >= active.generation
            if still_active or not self._is_replay(to_datetime(signal.triggered_at) or at, now):
                self.active_emergency = signal
                change.emergency = signal
                change.urgent = True
        elif kind == "resolution":
            self.active_emergency = None
            change.resolution = event.resolution
            change.urgent = True
        elif kind == "ack" and event.ack.participant == Participant.PARTICIPANT_TRAINER:
            change.ack = event.ack
        return change

    def _started(
        self,
        request: RollbackRequest,
        spec: RollbackSpec,
        at: datetime,
        now: datetime,
        change: Change,
    ) -> None:
        rid = request.rollback_id
        if rid in self.finished_rollbacks:
            return
        started = to_datetime(request.requested_at) or at
        if rid != self.active_rollback_id and self._is_replay(started, now):
            return  # history: the sidecar said at connect that this one is not active
        if self.rollback is not None and self.rollback.id == rid:
            return
        self.rollback = rollback_started(request, spec, at)
        self.active_rollback_id = rid
        change.urgent = change.dirty = True

    @property
    def degradation(self) -> str:
        """Why the run is degraded from the sidecar's side; empty when it is not."""
        if not self.reachable:
            return f"SidecarUnreachable: {self.unreachable_reason}"
        if self.degraded_reason:
            return f"FastTierInfeasible: {self.degraded_reason}"
        if self.health in (
            HealthStatus.HEALTH_STATUS_DEGRADED,
            HealthStatus.HEALTH_STATUS_UNHEALTHY,
        ):
            return f"{enum_name(HealthStatus, self.health)}: reported by the sidecar"
        return ""
