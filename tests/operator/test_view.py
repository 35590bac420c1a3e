"""The sidecar view: GetStatus and streamed events folded into what the status shows, and a
replayed ring never mistaken for live events (R10.1, R10.3)."""

from __future__ import annotations

from datetime import datetime

import pytest

from leyline import (
    CheckpointRecord,
    EmergencyAck,
    EmergencyResolution,
    EmergencySignal,
    Participant,
    RollbackReport,
    RollbackRequest,
)
from leyline.spec import RollbackSpec
from leyline.v1 import sidecar_pb2 as pb
from tests.operator.builders import at
from tolaria_operator.view import SidecarView

SPEC = RollbackSpec()


def event(seq: int, when: datetime, **payload: object) -> pb.SidecarEvent:
    ev = pb.SidecarEvent(sequence=seq, run_id="r1", **payload)
    ev.at.FromDatetime(when)
    return ev


def started_event(
    rollback_id: str, when: datetime, seq: int = 10, tier: int = 2
) -> pb.SidecarEvent:
    request = RollbackRequest(version=1, rollback_id=rollback_id, tier=tier, reason=4)
    request.requested_at.FromDatetime(when)
    return event(seq, when, rollback_started=pb.RollbackStarted(request=request))


def emergency_event(seq: int, when: datetime, generation: int) -> pb.SidecarEvent:
    signal = EmergencySignal(version=1, level=4, generation=generation, reason="stall", kind=6)
    signal.triggered_at.FromDatetime(when)
    return event(seq, when, emergency=signal)


def status_with(
    *,
    epoch: int = 0,
    step: int = 0,
    checkpoint: str = "",
    degraded: str = "",
    rollback: str = "",
    emergency: int = 0,
) -> pb.SidecarStatus:
    status = pb.SidecarStatus(
        run_id="r1",
        epoch=epoch,
        global_step=step,
        fast_tier_feasible=not degraded,
        degraded_reason=degraded,
    )
    status.last_heartbeat.FromDatetime(at(4))
    status.slots.extend(
        [
            pb.SlotInfo(index=0, generation=7, global_step=700, epoch=3, committed=True),
            pb.SlotInfo(index=1, generation=9, global_step=880, epoch=4, committed=True),
            pb.SlotInfo(index=2, generation=0, committed=False),
        ]
    )
    if checkpoint:
        status.last_checkpoint.CopyFrom(
            CheckpointRecord(checkpoint_id=checkpoint, epoch=3, global_step=600, payload_bytes=1024)
        )
        status.last_checkpoint.committed_at.FromDatetime(at(1))
    if rollback:
        status.active_rollback.CopyFrom(RollbackRequest(rollback_id=rollback, tier=2))
        status.active_rollback.requested_at.FromDatetime(at(2))
    if emergency:
        status.active_emergency.CopyFrom(EmergencySignal(level=4, generation=emergency))
    return status


@pytest.mark.req("R10.1")
def test_get_status_gives_progress_the_newest_snapshot_and_the_last_checkpoint() -> None:
    view = SidecarView(attempt=1)
    view.apply_status(status_with(epoch=4, step=900, checkpoint="ckpt-3"), SPEC, at(5))
    assert view.reachable and view.connected_at == at(5)
    assert view.progress is not None and (view.progress.epoch, view.progress.step) == (4, 900)
    assert view.progress.heartbeat == "2026-11-25T12:00:04.000Z"
    assert view.latest_snapshot is not None and (
        view.latest_snapshot.slot,
        view.latest_snapshot.generation,
    ) == (1, 9)
    assert view.latest_checkpoint is not None and view.latest_checkpoint.id == "ckpt-3"
    assert view.latest_checkpoint.time == "2026-11-25T12:00:01.000Z"
    assert view.degradation == ""


@pytest.mark.req("R10.3")
def test_an_active_full_rollback_at_connect_gets_its_deadline() -> None:
    view = SidecarView(attempt=1)
    view.apply_status(status_with(rollback="rb-9"), SPEC, at(5))
    assert view.rollback is not None
    assert (view.rollback.id, view.rollback.state) == ("rb-9", "InProgress")
    assert view.rollback.deadline == "2026-11-25T12:00:14.000Z"  # requested at 2 s + 12 s


@pytest.mark.req("R10.3")
def test_a_full_rollback_start_is_urgent_and_carries_its_deadline() -> None:
    view = SidecarView(attempt=1)
    change = view.apply_event(started_event("rb-1", at(3)), SPEC, at(3))
    assert change.urgent
    assert view.rollback is not None and view.rollback.deadline == "2026-11-25T12:00:15.000Z"
    assert view.rollback.started_at == "2026-11-25T12:00:03.000Z"


@pytest.mark.req("R10.3")
def test_a_fast_rollback_has_no_deadline_to_enforce() -> None:
    view = SidecarView(attempt=1)
    view.apply_event(started_event("rb-f", at(3), tier=1), SPEC, at(3))
    assert view.rollback is not None and view.rollback.deadline == ""


@pytest.mark.req("R10.3")
def test_a_finished_rollback_keeps_its_start_and_deadline() -> None:
    view = SidecarView(attempt=1)
    view.apply_event(started_event("rb-1", at(3)), SPEC, at(3))
    report = RollbackReport(rollback_id="rb-1", tier=2, outcome=1, total_ns=4_000_000_000)
    report.started_at.FromDatetime(at(3))
    change = view.apply_event(event(11, at(7), rollback_finished=report), SPEC, at(7))
    assert change.urgent and change.finished == report
    assert view.rollback is not None
    assert (view.rollback.state, view.rollback.finished_at) == (
        "Succeeded",
        "2026-11-25T12:00:07.000Z",
    )
    assert view.rollback.deadline == "2026-11-25T12:00:15.000Z"


@pytest.mark.req("R10.3")
def test_a_replayed_old_rollback_is_history_not_a_new_deadline() -> None:
    view = SidecarView(attempt=1)
    view.apply_status(status_with(), SPEC, at(600))  # nothing active at connect
    change = view.apply_event(started_event("rb-old", at(100)), SPEC, at(600))
    assert not change.urgent and view.rollback is None
    active = SidecarView(attempt=1)
    active.apply_status(status_with(rollback="rb-old"), SPEC, at(600))
    active.apply_event(started_event("rb-old", at(100)), SPEC, at(600))
    assert active.rollback is not None and active.rollback.id == "rb-old"


def test_a_repeated_sequence_is_ignored() -> None:
    view = SidecarView(attempt=1)
    first = view.apply_event(started_event("rb-1", at(3), seq=5), SPEC, at(3))
    again = view.apply_event(started_event("rb-2", at(3), seq=5), SPEC, at(3))
    assert (
        first.urgent
        and not again.urgent
        and view.rollback is not None
        and view.rollback.id == "rb-1"
    )
    assert view.last_sequence == 5


@pytest.mark.req("R10.1")
def test_progress_snapshots_and_checkpoints_are_dirty_not_urgent() -> None:
    view = SidecarView(attempt=1)
    progress = pb.ProgressEvent(epoch=2, global_step=40)
    progress.heartbeat.FromDatetime(at(9))
    change = view.apply_event(event(1, at(9), progress=progress), SPEC, at(9))
    assert change.dirty and not change.urgent
    assert view.progress is not None and view.progress.heartbeat == "2026-11-25T12:00:09.000Z"
    slot = pb.SlotInfo(index=3, generation=12, global_step=40, epoch=2, committed=True)
    assert view.apply_event(
        event(2, at(9), snapshot=pb.SnapshotEvent(slot=slot)), SPEC, at(9)
    ).dirty
    assert view.latest_snapshot is not None and view.latest_snapshot.generation == 12
    record = CheckpointRecord(checkpoint_id="c-2", epoch=2, global_step=40, payload_bytes=8)
    assert view.apply_event(event(3, at(9), checkpoint=record), SPEC, at(9)).dirty
    assert view.latest_checkpoint is not None and view.latest_checkpoint.id == "c-2"


@pytest.mark.req("R10.4")
def test_live_emergencies_are_reported_and_replayed_resolved_ones_are_not() -> None:
    view = SidecarView(attempt=1)
    view.apply_status(status_with(), SPEC, at(600))
    assert (
        view.apply_event(emergency_event(1, at(10), generation=1), SPEC, at(600)).emergency is None
    )
    live = view.apply_event(emergency_event(2, at(599), generation=2), SPEC, at(600))
    assert live.emergency is not None and live.urgent
    still = SidecarView(attempt=1)
    still.apply_status(status_with(emergency=3), SPEC, at(600))
    assert (
        still.apply_event(emergency_event(1, at(10), generation=3), SPEC, at(600)).emergency
        is not None
    )


@pytest.mark.req("R10.4")
def test_resolutions_and_trainer_acks_are_passed_on() -> None:
    view = SidecarView(attempt=1)
    view.apply_event(emergency_event(1, at(1), generation=1), SPEC, at(1))
    ack = view.apply_event(
        event(
            2, at(1), ack=EmergencyAck(generation=1, participant=Participant.PARTICIPANT_TRAINER)
        ),
        SPEC,
        at(1),
    )
    assert ack.ack is not None
    other = view.apply_event(
        event(3, at(1), ack=EmergencyAck(generation=1, participant=Participant.PARTICIPANT_TAMIYO)),
        SPEC,
        at(1),
    )
    assert other.ack is None
    resolved = view.apply_event(
        event(4, at(2), resolution=EmergencyResolution(generation=1)), SPEC, at(2)
    )
    assert resolved.resolution is not None and view.active_emergency is None


def test_a_new_attempt_starts_a_fresh_view() -> None:
    view = SidecarView(attempt=1)
    view.apply_status(status_with(checkpoint="c"), SPEC, at(5))
    view.apply_event(started_event("rb-1", at(3), seq=9), SPEC, at(5))
    view.reset(2)
    assert (view.attempt, view.last_sequence, view.rollback, view.reachable) == (2, 0, None, False)
    assert view.finished_rollbacks == set()


@pytest.mark.req("R10.1")
def test_an_unreachable_or_degraded_sidecar_says_why() -> None:
    view = SidecarView(attempt=1)
    view.mark_unreachable("connection refused")
    assert view.degradation == "SidecarUnreachable: connection refused"
    view.apply_status(status_with(degraded="copy bandwidth 0.4 GB/s"), SPEC, at(1))
    assert view.degradation == "FastTierInfeasible: copy bandwidth 0.4 GB/s"
