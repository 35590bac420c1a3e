"""The gRPC services over real sockets: `TrainerLink` on a Unix socket, `SidecarControl` on
TCP. Every request field is validated and refusals name the field (ARCHITECTURE rules)."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable

import grpc
import pytest

from leyline import (
    AnomalyKind,
    EmergencyLevel,
    EmergencyResolution,
    EmergencySignal,
    HealthStatus,
    Participant,
    RollbackOutcome,
    RollbackPhase,
    RollbackReport,
    RollbackRequest,
    RollbackTier,
    RunPhase,
)
from leyline.shm import LAYOUT_VERSION, SLOT_FLAG_FROM_CHECKPOINT, control_name
from leyline.v1 import sidecar_pb2 as pb
from leyline.v1.resilience_pb2 import SlotCondition
from tests.fakes import FakeClock
from tests.sidecar.conftest import STATE_BYTES, Served
from tests.sidecar.doubles import INSTANCE_ID, RUN_ID, TrainerDouble, payload, tolaria_run, wait_for

CRITICAL = EmergencyLevel.EMERGENCY_LEVEL_CRITICAL
SEVERE = EmergencyLevel.EMERGENCY_LEVEL_SEVERE
MINOR = EmergencyLevel.EMERGENCY_LEVEL_MINOR
TRAINER = Participant.PARTICIPANT_TRAINER
Start = Callable[..., Served]


def refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def committed(
    served: Served, generation: int = 1, index: int = 0, **write: object
) -> TrainerDouble:
    """Attach, write slot `index`, commit it; returns the fake trainer."""
    trainer = served.trainer(served.attach())
    trainer.write(index, generation, payload(STATE_BYTES, generation), **write)  # type: ignore[arg-type]
    reply = served.link.CommitSnapshot(pb.CommitSnapshotRequest(slot=index, generation=generation))
    assert reply.accepted, reply.error
    return trainer


def condition(served: Served, index: int) -> int:
    return served.link.GetStatus(pb.GetStatusRequest()).slots[index].condition


# -- Attach ---------------------------------------------------------------------------------


@pytest.mark.req("R6.1")
def test_attach_returns_the_slots_the_control_block_and_the_feasibility(
    serve_sidecar: Start,
) -> None:
    served = serve_sidecar()
    reply = served.attach()
    assert reply.layout_version == LAYOUT_VERSION
    assert reply.control_block_name == control_name(INSTANCE_ID)
    assert [s.index for s in reply.slots] == list(range(5))
    assert all(s.capacity_bytes >= STATE_BYTES for s in reply.slots)
    assert reply.fast_tier_feasible and reply.degraded_reason == ""
    assert reply.measured_copy_gbps == pytest.approx(10.0)
    assert not reply.HasField("resume_slot")
    assert not reply.HasField("active_emergency")
    assert not reply.HasField("last_checkpoint")


@pytest.mark.req("R10.5")
@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("run_id", "", grpc.StatusCode.INVALID_ARGUMENT),
        ("run_id", "another-run", grpc.StatusCode.INVALID_ARGUMENT),
        ("state_bytes", 0, grpc.StatusCode.INVALID_ARGUMENT),
        ("layout_fingerprint", "", grpc.StatusCode.INVALID_ARGUMENT),
        ("pid", 0, grpc.StatusCode.INVALID_ARGUMENT),
        ("version", 9, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_attach_refuses_a_bad_field_naming_it(
    serve_sidecar: Start, field: str, value: object, code: grpc.StatusCode
) -> None:
    served = serve_sidecar()
    request = pb.AttachRequest(
        version=1,
        run_id=RUN_ID,
        state_bytes=STATE_BYTES,
        layout_fingerprint="layout-a",
        pid=os.getpid(),
    )
    setattr(request, field, value)
    err = refused(lambda: served.link.Attach(request, timeout=30))
    assert err.code() == code
    assert field in (err.details() or "")


@pytest.mark.req("R6.2")
def test_a_reattaching_trainer_is_offered_its_newest_committed_slot(serve_sidecar: Start) -> None:
    served = serve_sidecar()
    committed(served, generation=1, index=0)
    trainer = served.trainer(served.attach())
    trainer.write(1, 2, payload(STATE_BYTES, 2), step=77)
    served.link.CommitSnapshot(pb.CommitSnapshotRequest(slot=1, generation=2))
    again = served.attach(attempt=2)
    assert (again.resume_slot.index, again.resume_slot.generation) == (1, 2)
    assert again.resume_slot.global_step == 77


# -- snapshots ------------------------------------------------------------------------------


@pytest.mark.req("R6.2")
def test_a_commit_is_accepted_and_then_verified_in_the_background(serve_sidecar: Start) -> None:
    served = serve_sidecar()
    committed(served)
    wait_for(lambda: condition(served, 0) == SlotCondition.SLOT_CONDITION_VERIFIED)


@pytest.mark.req("R6.2")
def test_a_commit_the_header_does_not_show_is_not_accepted(serve_sidecar: Start) -> None:
    served = serve_sidecar()
    trainer = served.trainer(served.attach())
    trainer.write(0, 3, payload(STATE_BYTES))
    reply = served.link.CommitSnapshot(pb.CommitSnapshotRequest(slot=0, generation=4))
    assert not reply.accepted
    assert "generation 3" in reply.error
    assert len(reply.slots) == 5


@pytest.mark.req("R6.2")
@pytest.mark.parametrize(("slot", "generation", "field"), [(17, 1, "slot"), (0, 0, "generation")])
def test_a_commit_with_a_bad_field_is_invalid(
    serve_sidecar: Start, slot: int, generation: int, field: str
) -> None:
    served = serve_sidecar()
    served.attach()
    err = refused(
        lambda: served.link.CommitSnapshot(
            pb.CommitSnapshotRequest(slot=slot, generation=generation)
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (err.details() or "")


@pytest.mark.req("R6.3")
def test_persist_snapshot_schedules_a_durable_checkpoint(serve_sidecar: Start) -> None:
    served = serve_sidecar()
    committed(served, generation=1, epoch=3)
    reply = served.link.PersistSnapshot(pb.PersistRequest(slot=0, generation=1))
    assert reply.scheduled, reply.error
    status = wait_for(
        lambda: (s := served.link.GetStatus(pb.GetStatusRequest())).slots[0].durable and s
    )
    assert status.last_checkpoint.epoch == 3
    assert served.attach(attempt=2).last_checkpoint.snapshot_generation == 1


@pytest.mark.req("R6.3")
def test_persisting_a_generation_the_slot_does_not_hold_is_not_scheduled(
    serve_sidecar: Start,
) -> None:
    served = serve_sidecar()
    committed(served, generation=2)
    reply = served.link.PersistSnapshot(pb.PersistRequest(slot=0, generation=1))
    assert not reply.scheduled
    assert "holds generation 2" in reply.error


# -- rollbacks ------------------------------------------------------------------------------


def full(rollback_id: str = "rb-1") -> RollbackRequest:
    return RollbackRequest(
        version=1,
        rollback_id=rollback_id,
        tier=RollbackTier.ROLLBACK_TIER_FULL,
        reason=AnomalyKind.ANOMALY_KIND_ACCURACY_COLLAPSE,
        requested_by=TRAINER,
    )


@pytest.mark.req("R6.5")
def test_a_full_rollback_without_a_checkpoint_is_not_ready_and_says_why(
    serve_sidecar: Start,
) -> None:
    served = serve_sidecar()
    served.attach()
    reply = served.link.PrepareFullRollback(full(), timeout=30)
    assert not reply.ready
    assert "no restorable checkpoint" in reply.error
    assert reply.deadline_unix_ms > 0
    assert served.sidecar.machine.rollback_pending == "rb-1"


@pytest.mark.req("R6.3")
def test_a_full_rollback_loads_the_checkpoint_and_its_report_clears_the_deadline(
    serve_sidecar: Start,
) -> None:
    served = serve_sidecar()
    trainer = committed(served, generation=1, epoch=4)
    served.link.PersistSnapshot(pb.PersistRequest(slot=0, generation=1))
    wait_for(lambda: served.link.GetStatus(pb.GetStatusRequest()).HasField("last_checkpoint"))
    reply = served.link.PrepareFullRollback(full(), timeout=30)
    assert reply.ready, reply.error
    assert reply.checkpoint.epoch == 4
    assert trainer.slots[reply.slot.index].header().flags & SLOT_FLAG_FROM_CHECKPOINT
    assert [p.phase for p in reply.phases] == [
        RollbackPhase.ROLLBACK_PHASE_LOAD,
        RollbackPhase.ROLLBACK_PHASE_VERIFY,
    ]
    assert served.link.GetStatus(pb.GetStatusRequest()).active_rollback.rollback_id == "rb-1"
    report = RollbackReport(
        version=1,
        rollback_id="rb-1",
        tier=RollbackTier.ROLLBACK_TIER_FULL,
        outcome=RollbackOutcome.ROLLBACK_OUTCOME_SUCCEEDED,
        total_ns=2_000_000_000,
    )
    assert served.link.ReportRollback(report).ok
    assert served.sidecar.machine.rollback_pending is None
    assert not served.link.GetStatus(pb.GetStatusRequest()).HasField("active_rollback")
    labels = {
        "tier": RollbackTier.Name(RollbackTier.ROLLBACK_TIER_FULL),
        "outcome": RollbackOutcome.Name(RollbackOutcome.ROLLBACK_OUTCOME_SUCCEEDED),
    }
    registry = served.sidecar.metrics.registry
    assert registry.get_sample_value("tolaria_sidecar_rollbacks_total", labels) == 1


@pytest.mark.req("R6.1")
@pytest.mark.parametrize(
    ("field", "value"),
    [("rollback_id", ""), ("tier", RollbackTier.ROLLBACK_TIER_UNSPECIFIED), ("outcome", 0)],
)
def test_a_rollback_report_with_a_bad_field_is_invalid(
    serve_sidecar: Start, field: str, value: object
) -> None:
    served = serve_sidecar()
    report = RollbackReport(
        version=1,
        rollback_id="rb-1",
        tier=RollbackTier.ROLLBACK_TIER_FAST,
        outcome=RollbackOutcome.ROLLBACK_OUTCOME_SUCCEEDED,
    )
    setattr(report, field, value)
    err = refused(lambda: served.link.ReportRollback(report))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (err.details() or "")


# -- emergencies ----------------------------------------------------------------------------


@pytest.mark.req("R7.1")
def test_raise_emergency_answers_the_generation_and_effective_level(serve_sidecar: Start) -> None:
    served = serve_sidecar()
    first = served.link.RaiseEmergency(EmergencySignal(level=SEVERE, reason="loss spike"))
    lower = served.link.RaiseEmergency(EmergencySignal(level=MINOR, reason="slow hook"))
    assert (lower.generation, lower.effective_level) == (first.generation, SEVERE)


@pytest.mark.req("R7.1")
@pytest.mark.parametrize(("field", "value"), [("level", 0), ("level", 9), ("kind", 999)])
def test_raise_emergency_refuses_an_out_of_range_field(
    serve_sidecar: Start, field: str, value: int
) -> None:
    served = serve_sidecar()
    signal = EmergencySignal(level=SEVERE)
    setattr(signal, field, value)
    err = refused(lambda: served.link.RaiseEmergency(signal))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (err.details() or "")


@pytest.mark.req("R7.1")
def test_resolving_an_unknown_or_stale_generation_is_refused(serve_sidecar: Start) -> None:
    served = serve_sidecar()
    first = served.link.RaiseEmergency(EmergencySignal(level=SEVERE)).generation
    served.link.RaiseEmergency(EmergencySignal(level=CRITICAL))
    stale = refused(lambda: served.link.ResolveEmergency(EmergencyResolution(generation=first)))
    assert stale.code() == grpc.StatusCode.FAILED_PRECONDITION
    unknown = refused(lambda: served.link.ResolveEmergency(EmergencyResolution(generation=999)))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    zero = refused(lambda: served.link.ResolveEmergency(EmergencyResolution(generation=0)))
    assert zero.code() == grpc.StatusCode.INVALID_ARGUMENT
    for err in (stale, unknown, zero):
        assert "generation" in (err.details() or "")


@pytest.mark.req("R10.4")
def test_signal_emergency_without_a_trainer_ack_exceeds_its_deadline(serve_sidecar: Start) -> None:
    served = serve_sidecar(manifest=tolaria_run())  # the default 100 ms CRITICAL budget
    err = refused(
        lambda: served.control.SignalEmergency(
            EmergencySignal(level=CRITICAL, reason="cluster incident", incident_id="inc-1"),
            metadata=served.auth,
            timeout=30,
        )
    )
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no acknowledgement from TRAINER within 100 ms" in (err.details() or "")


@pytest.mark.req("R10.4")
def test_signal_emergency_returns_the_trainers_ack(serve_sidecar: Start) -> None:
    served = serve_sidecar()
    trainer = served.trainer(served.attach())
    stop = threading.Event()

    def watcher() -> None:  # the trainer's 1 ms emergency watcher
        seen = trainer.control.emergency_generation()
        while not stop.wait(0.001):
            if trainer.control.emergency_generation() != seen:
                seen = trainer.ack_all(frozen=True)

    thread = threading.Thread(target=watcher, daemon=True)
    thread.start()
    try:
        ack = served.control.SignalEmergency(
            EmergencySignal(level=CRITICAL, reason="cluster incident", incident_id="inc-1"),
            metadata=served.auth,
            timeout=30,
        )
    finally:
        stop.set()
        thread.join(5)
    assert ack.participant == TRAINER
    assert ack.frozen
    active = served.sidecar.machine.active()
    assert active is not None
    assert ack.generation == active.generation
    assert active.source == Participant.PARTICIPANT_OPERATOR
    assert active.incident_id == "inc-1"
    trainer.close()


@pytest.mark.req("R7.4")
def test_status_carries_the_emergency_history(serve_sidecar: Start) -> None:
    served = serve_sidecar()
    generation = served.link.RaiseEmergency(EmergencySignal(level=SEVERE, reason="x")).generation
    served.link.ResolveEmergency(EmergencyResolution(generation=generation, reason="fixed"))
    [record] = served.link.GetStatus(pb.GetStatusRequest()).emergencies
    assert record.signal.level == SEVERE
    assert record.resolution.reason == "fixed"


# -- checkpoints on request, heartbeats, detach ---------------------------------------------


@pytest.mark.req("R10.1")
def test_request_checkpoint_without_any_snapshot_is_a_failed_precondition(
    serve_sidecar: Start,
) -> None:
    served = serve_sidecar()
    served.attach()
    err = refused(
        lambda: served.control.RequestCheckpoint(
            pb.CheckpointRequest(reason="suspend"), metadata=served.auth, timeout=30
        )
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "slot" in (err.details() or "")


@pytest.mark.req("R10.1")
def test_request_checkpoint_persists_the_newest_slot_and_can_ask_the_trainer_to_stop(
    serve_sidecar: Start,
) -> None:
    served = serve_sidecar()
    trainer = committed(served, generation=1, index=0, epoch=1)
    trainer.write(1, 2, payload(STATE_BYTES, 2), epoch=2)
    served.link.CommitSnapshot(pb.CommitSnapshotRequest(slot=1, generation=2))
    reply = served.control.RequestCheckpoint(
        pb.CheckpointRequest(reason="suspend", stop_after=True), metadata=served.auth, timeout=30
    )
    assert reply.scheduled and not reply.error
    assert (reply.checkpoint.snapshot_generation, reply.checkpoint.epoch) == (2, 2)
    beat = served.link.Heartbeat(pb.HeartbeatRequest(run_id=RUN_ID, epoch=2, global_step=5))
    assert beat.stop_requested
    assert "suspend" in beat.stop_reason
    persist = served.link.PersistSnapshot(pb.PersistRequest(slot=1, generation=2))
    assert not persist.scheduled


@pytest.mark.req("R10.1")
def test_heartbeats_update_the_status_and_emit_progress_at_most_once_per_second(
    serve_sidecar: Start,
) -> None:
    clock = FakeClock()
    served = serve_sidecar(clock=clock)
    served.attach()

    def beat(step: int) -> None:
        served.link.Heartbeat(
            pb.HeartbeatRequest(
                run_id=RUN_ID,
                epoch=1,
                global_step=step,
                phase=RunPhase.Running,
                health=HealthStatus.HEALTH_STATUS_HEALTHY,
                loss=0.5,
            )
        )

    for step in range(1, 6):
        beat(step)
        clock.advance_ms(100)
    clock.advance_ms(600)
    beat(6)
    progress = [
        e.progress.global_step
        for e in served.sidecar.events.subscribe(0).next_batch(0.0)
        if e.WhichOneof("event") == "progress"
    ]
    assert progress == [1, 6]
    status = served.link.GetStatus(pb.GetStatusRequest())
    assert (status.epoch, status.global_step, status.health) == (
        1,
        6,
        HealthStatus.HEALTH_STATUS_HEALTHY,
    )
    assert status.trainer_attached


@pytest.mark.req("R10.1")
def test_detach_marks_the_trainer_gone_with_its_final_phase(serve_sidecar: Start) -> None:
    served = serve_sidecar()
    served.attach()
    served.link.Detach(
        pb.DetachRequest(run_id=RUN_ID, final_phase=RunPhase.Succeeded, reason="done")
    )
    status = served.link.GetStatus(pb.GetStatusRequest())
    assert not status.trainer_attached
    assert status.phase == RunPhase.Succeeded


@pytest.mark.req("R10.5")
def test_the_unix_socket_is_private_to_its_owner(serve_sidecar: Start) -> None:
    served = serve_sidecar()
    assert stat.S_IMODE(served.socket_path.stat().st_mode) == 0o600


@pytest.mark.req("R6.1")
def test_the_slot_count_follows_the_manifest(serve_sidecar: Start) -> None:
    served = serve_sidecar(manifest=tolaria_run(snapshots={"slots": 3}))
    assert len(served.attach().slots) == 3


# -- metrics fed by the services ------------------------------------------------------------


def metric(served: Served, name: str, **labels: str) -> float | None:
    return served.sidecar.metrics.registry.get_sample_value(name, labels)


@pytest.mark.req("R6.5")
def test_a_full_rollback_reported_after_its_deadline_counts_once_as_deadline_missed(
    serve_sidecar: Start,
) -> None:
    clock = FakeClock()
    served = serve_sidecar(clock=clock)
    served.attach()
    served.link.PrepareFullRollback(full(), timeout=30)
    clock.advance_s(served.sidecar.config.rollback.full_deadline_seconds + 1)
    tier = RollbackTier.Name(RollbackTier.ROLLBACK_TIER_FULL)
    missed = RollbackOutcome.Name(RollbackOutcome.ROLLBACK_OUTCOME_DEADLINE_MISSED)
    wait_for(lambda: metric(served, "tolaria_sidecar_rollbacks_total", tier=tier, outcome=missed))
    late = RollbackReport(
        version=1,
        rollback_id="rb-1",
        tier=RollbackTier.ROLLBACK_TIER_FULL,
        outcome=RollbackOutcome.ROLLBACK_OUTCOME_FAILED,
        total_ns=30_000_000_000,
    )
    assert served.link.ReportRollback(late).ok
    failed = RollbackOutcome.Name(RollbackOutcome.ROLLBACK_OUTCOME_FAILED)
    assert metric(served, "tolaria_sidecar_rollbacks_total", tier=tier, outcome=missed) == 1
    assert metric(served, "tolaria_sidecar_rollbacks_total", tier=tier, outcome=failed) == 0
    assert metric(served, "tolaria_sidecar_rollback_duration_seconds_count", tier=tier) == 1


@pytest.mark.req("R8.3")
def test_the_checkpoint_age_counts_from_the_commit_time_of_the_newest_checkpoint(
    serve_sidecar: Start,
) -> None:
    served = serve_sidecar()
    committed(served, generation=1, epoch=2)
    served.link.PersistSnapshot(pb.PersistRequest(slot=0, generation=1))
    status = wait_for(
        lambda: (
            (s := served.link.GetStatus(pb.GetStatusRequest())).HasField("last_checkpoint") and s
        )
    )
    since_commit = time.time() - status.last_checkpoint.committed_at.ToNanoseconds() / 1e9
    age = metric(served, "tolaria_sidecar_checkpoint_age_seconds")
    assert age is not None and abs(age - since_commit) < 5


@pytest.mark.req("R8.3")
def test_the_phase_series_follow_the_trainer_from_attach_to_its_final_phase(
    serve_sidecar: Start,
) -> None:
    served = serve_sidecar()
    served.attach()
    assert metric(served, "tolaria_sidecar_run_phase", phase="Running") == 1
    served.link.Detach(pb.DetachRequest(run_id=RUN_ID, final_phase=RunPhase.Halted, reason="x"))
    assert metric(served, "tolaria_sidecar_run_phase", phase="Running") == 0
    assert metric(served, "tolaria_sidecar_run_phase", phase="Halted") == 1


@pytest.mark.req("R8.3")
def test_the_stall_threshold_is_the_runs_detection_budget(serve_sidecar: Start) -> None:
    served = serve_sidecar()
    expected = served.sidecar.config.detection.stall_seconds
    assert metric(served, "tolaria_sidecar_stall_threshold_seconds") == expected
    assert metric(served, "tolaria_sidecar_fast_tier_enabled") == 1
