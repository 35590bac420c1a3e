"""The emergency state machine (R7): levels, acks, escalation, halt, resolution, watchdogs.

Time moves only when a test advances the injected clock; acks and heartbeats are written
into the real control block as the trainer's watcher would.
"""

from __future__ import annotations

import os

import pytest

from leyline import (
    AnomalyKind,
    EmergencyAction,
    EmergencyLevel,
    EmergencySignal,
    EmergencyState,
    Participant,
    RollbackPhase,
    RollbackTier,
)
from leyline.shm import ControlBlock, RollbackRecord
from tests.fakes import FakeClock
from tests.sidecar.doubles import IN_PROCESS, RecordedEvents
from tolaria_sidecar.config import SidecarConfig, Tuning
from tolaria_sidecar.emergency import EmergencyMachine
from tolaria_sidecar.errors import NotFound, PreconditionFailed, RequestInvalid
from tolaria_sidecar.metrics import SidecarMetrics

L = EmergencyLevel
MINOR = L.EMERGENCY_LEVEL_MINOR
MAJOR = L.EMERGENCY_LEVEL_MAJOR
SEVERE = L.EMERGENCY_LEVEL_SEVERE
CRITICAL = L.EMERGENCY_LEVEL_CRITICAL
S = EmergencyState
TRAINER = Participant.PARTICIPANT_TRAINER
KASMINA = Participant.PARTICIPANT_KASMINA
TAMIYO = Participant.PARTICIPANT_TAMIYO
SIDECAR = Participant.PARTICIPANT_SIDECAR


def signal(
    level: int, kind: int = AnomalyKind.ANOMALY_KIND_MANUAL, **fields: object
) -> EmergencySignal:
    return EmergencySignal(level=level, kind=kind, reason="test", **fields)  # type: ignore[arg-type]


def ack(control: ControlBlock, participant: int, *, frozen: bool = False) -> None:
    record = control.read_emergency()
    control.ack(participant, record.generation, record.level, frozen=frozen)


def attach(control: ControlBlock, machine: EmergencyMachine, *, attempt: int = 1) -> None:
    for p in IN_PROCESS:
        control.register(p, os.getpid(), attempt)
    machine.attach_trainer(attempt)


def sample(metrics: SidecarMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.mark.req("R7.1")
def test_a_raise_publishes_generation_level_action_and_state_in_the_control_block(
    machine: EmergencyMachine, control: ControlBlock
) -> None:
    generation, level = machine.raise_signal(signal(SEVERE, global_step=42))
    record = control.read_emergency()
    assert (generation, level) == (1, SEVERE)
    assert record.generation == control.emergency_generation() == 1
    assert record.level == SEVERE
    assert record.action == EmergencyAction.EMERGENCY_ACTION_FAST_ROLLBACK
    assert record.state == S.EMERGENCY_STATE_RAISED
    assert record.global_step == 42
    assert record.reason == "test"


@pytest.mark.req("R7.1")
@pytest.mark.parametrize(
    ("level", "action"),
    [
        (MINOR, EmergencyAction.EMERGENCY_ACTION_LOG),
        (MAJOR, EmergencyAction.EMERGENCY_ACTION_FULL_ROLLBACK),
        (SEVERE, EmergencyAction.EMERGENCY_ACTION_FAST_ROLLBACK),
        (CRITICAL, EmergencyAction.EMERGENCY_ACTION_FREEZE),
    ],
)
def test_each_level_has_its_default_action(
    machine: EmergencyMachine, control: ControlBlock, level: int, action: int
) -> None:
    machine.raise_signal(signal(level))
    assert control.read_emergency().action == action


@pytest.mark.req("R7.1")
def test_a_signal_may_name_its_own_action(machine: EmergencyMachine, control: ControlBlock) -> None:
    machine.raise_signal(signal(MAJOR, action=EmergencyAction.EMERGENCY_ACTION_LOG))
    assert control.read_emergency().action == EmergencyAction.EMERGENCY_ACTION_LOG


@pytest.mark.req("R7.1")
def test_levels_only_go_up_while_unresolved(machine: EmergencyMachine) -> None:
    first = machine.raise_signal(signal(SEVERE))
    assert machine.raise_signal(signal(MINOR)) == first
    assert machine.raise_signal(signal(SEVERE)) == first
    generation, level = machine.raise_signal(signal(CRITICAL))
    assert (generation, level) == (first[0] + 1, CRITICAL)
    [record] = machine.history()
    assert list(record.escalated_to) == [CRITICAL]
    assert record.signal.generation == generation


@pytest.mark.req("R7.1")
def test_an_out_of_range_level_is_refused(machine: EmergencyMachine) -> None:
    with pytest.raises(RequestInvalid, match="level"):
        machine.raise_signal(signal(7))


@pytest.mark.req("R7.3")
def test_the_trainers_ack_in_time_acknowledges_without_escalation(
    machine: EmergencyMachine, control: ControlBlock, clock: FakeClock, recorded: RecordedEvents
) -> None:
    machine.raise_signal(signal(MINOR))
    clock.advance_ms(4000)
    ack(control, TRAINER)
    machine.poll()
    clock.advance_ms(10_000)
    machine.poll()
    assert control.read_emergency().state == S.EMERGENCY_STATE_ACKNOWLEDGED
    assert control.read_emergency().level == MINOR
    acks = recorded.of("ack")
    assert {a.participant for a in acks} == {TRAINER, SIDECAR}


@pytest.mark.req("R7.3")
@pytest.mark.parametrize(
    ("level", "budget_ms", "next_level"),
    [(MINOR, 5000, MAJOR), (MAJOR, 2000, SEVERE), (SEVERE, 500, CRITICAL)],
)
def test_a_missing_ack_escalates_one_level_when_the_levels_budget_passes(
    machine: EmergencyMachine,
    control: ControlBlock,
    clock: FakeClock,
    metrics: SidecarMetrics,
    level: int,
    budget_ms: float,
    next_level: int,
) -> None:
    generation, _ = machine.raise_signal(signal(level))
    clock.advance_ms(budget_ms - 1)
    machine.poll()
    assert control.read_emergency().generation == generation
    clock.advance_ms(1)
    machine.poll()
    record = control.read_emergency()
    assert record.generation == generation + 1
    assert record.level == next_level
    assert record.state == S.EMERGENCY_STATE_ESCALATED
    assert "TRAINER" in record.reason
    [history] = machine.history()
    assert list(history.missing_acks) == [TRAINER]
    assert list(history.escalated_to) == [next_level]
    escalated_name = EmergencyLevel.Name(next_level)  # type: ignore[arg-type]
    assert sample(metrics, "tolaria_sidecar_emergency_escalations_total", level=escalated_name) == 1


@pytest.mark.req("R7.3")
def test_critical_needs_every_attached_participant(
    machine: EmergencyMachine, control: ControlBlock, clock: FakeClock
) -> None:
    attach(control, machine)
    machine.raise_signal(signal(CRITICAL))
    ack(control, TRAINER, frozen=True)
    ack(control, KASMINA, frozen=True)
    machine.poll()
    assert control.read_emergency().state == S.EMERGENCY_STATE_RAISED
    ack(control, TAMIYO, frozen=True)
    clock.advance_ms(50)
    machine.poll()
    assert control.read_emergency().state == S.EMERGENCY_STATE_ACKNOWLEDGED
    [record] = machine.history()
    assert {a.participant for a in record.acks} == {TRAINER, KASMINA, TAMIYO, SIDECAR}
    assert all(a.frozen for a in record.acks)


@pytest.mark.req("R7.3")
def test_lines_of_an_earlier_trainer_attempt_are_not_required(
    machine: EmergencyMachine, control: ControlBlock
) -> None:
    control.register(TAMIYO, os.getpid(), 0)  # left by attempt 0, which crashed
    control.register(TRAINER, os.getpid(), 1)
    machine.attach_trainer(1)
    machine.raise_signal(signal(CRITICAL))
    ack(control, TRAINER, frozen=True)
    machine.poll()
    assert control.read_emergency().state == S.EMERGENCY_STATE_ACKNOWLEDGED


@pytest.mark.req("R7.4")
def test_critical_with_missing_acks_halts_when_its_budget_passes(
    machine: EmergencyMachine, control: ControlBlock, clock: FakeClock, metrics: SidecarMetrics
) -> None:
    attach(control, machine)
    generation, _ = machine.raise_signal(signal(CRITICAL))
    ack(control, TRAINER, frozen=True)
    clock.advance_ms(100)
    machine.poll()
    record = control.read_emergency()
    assert record.generation == generation + 1
    assert record.action == EmergencyAction.EMERGENCY_ACTION_HALT
    assert record.state == S.EMERGENCY_STATE_HALTED
    [history] = machine.history()
    assert set(history.missing_acks) == {KASMINA, TAMIYO}
    assert history.final_state == S.EMERGENCY_STATE_HALTED
    assert sample(metrics, "tolaria_sidecar_emergency_halts_total") == 1


@pytest.mark.req("R7.4")
def test_an_acknowledged_critical_halts_after_halt_after_seconds_unresolved(
    machine: EmergencyMachine, control: ControlBlock, clock: FakeClock, config: SidecarConfig
) -> None:
    attach(control, machine)
    machine.raise_signal(signal(CRITICAL))
    for p in IN_PROCESS:
        ack(control, p, frozen=True)
    machine.poll()
    assert control.read_emergency().state == S.EMERGENCY_STATE_ACKNOWLEDGED
    clock.advance_s(config.emergency.halt_after_seconds - 0.001)
    machine.poll()
    assert control.read_emergency().state == S.EMERGENCY_STATE_ACKNOWLEDGED
    clock.advance_ms(1)
    machine.poll()
    record = control.read_emergency()
    assert (record.state, record.action) == (
        S.EMERGENCY_STATE_HALTED,
        EmergencyAction.EMERGENCY_ACTION_HALT,
    )
    assert "unresolved" in record.reason


@pytest.mark.req("R7.1")
def test_resolution_is_explicit_and_publishes_resume_under_a_new_generation(
    machine: EmergencyMachine, control: ControlBlock, recorded: RecordedEvents
) -> None:
    generation, _ = machine.raise_signal(signal(SEVERE))
    resolution = machine.resolve(generation, "operator", "fixed")
    record = control.read_emergency()
    assert record.generation == generation + 1
    assert record.state == S.EMERGENCY_STATE_RESOLVED
    assert record.action == EmergencyAction.EMERGENCY_ACTION_RESUME
    assert machine.active() is None
    assert resolution.generation == generation
    assert recorded.of("resolution") == [resolution]
    [history] = machine.history()
    assert history.final_state == S.EMERGENCY_STATE_RESOLVED
    assert history.resolution.resolved_by == "operator"


@pytest.mark.req("R7.1")
def test_only_the_active_generation_can_be_resolved(machine: EmergencyMachine) -> None:
    generation, _ = machine.raise_signal(signal(SEVERE))
    machine.raise_signal(signal(CRITICAL))
    with pytest.raises(PreconditionFailed, match="generation"):
        machine.resolve(generation, "operator", "late")
    with pytest.raises(NotFound, match="never issued"):
        machine.resolve(generation + 10, "operator", "typo")
    assert machine.active() is not None


@pytest.mark.req("R7.1")
def test_resolving_with_nothing_active_is_refused(machine: EmergencyMachine) -> None:
    generation, _ = machine.raise_signal(signal(MINOR))
    machine.resolve(generation, "trainer", "done")
    with pytest.raises(PreconditionFailed, match="no emergency is active"):
        machine.resolve(generation, "trainer", "again")


@pytest.mark.req("R7.1")
def test_a_new_raise_after_resolution_opens_a_new_incident(machine: EmergencyMachine) -> None:
    generation, _ = machine.raise_signal(signal(SEVERE))
    machine.resolve(generation, "trainer", "rolled back")
    again, level = machine.raise_signal(signal(MINOR))
    assert (again, level) == (generation + 2, MINOR)
    assert len(machine.history()) == 2


@pytest.mark.req("R7.2")
def test_a_stalled_trainer_heartbeat_raises_critical_stalled_step(
    machine: EmergencyMachine, control: ControlBlock, clock: FakeClock, config: SidecarConfig
) -> None:
    attach(control, machine)
    control.heartbeat(TRAINER, step=7, epoch=2)
    clock.advance_s(config.detection.stall_seconds - 1)
    machine.poll()
    assert machine.active() is None
    clock.advance_s(2)
    machine.poll()
    active = machine.active()
    assert active is not None
    assert active.level == CRITICAL
    assert active.kind == AnomalyKind.ANOMALY_KIND_STALLED_STEP
    assert active.global_step == 7
    assert "no trainer heartbeat" in active.reason


@pytest.mark.req("R7.2")
def test_the_stall_resolves_itself_when_the_heartbeat_moves_again(
    machine: EmergencyMachine, control: ControlBlock, clock: FakeClock, config: SidecarConfig
) -> None:
    attach(control, machine)
    control.heartbeat(TRAINER, step=7, epoch=2)
    clock.advance_s(config.detection.stall_seconds + 1)
    machine.poll()
    for p in IN_PROCESS:
        ack(control, p, frozen=True)
    machine.poll()
    control.heartbeat(TRAINER, step=8, epoch=2)
    machine.poll()
    assert machine.active() is None
    assert control.read_emergency().state == S.EMERGENCY_STATE_RESOLVED
    [record] = machine.history()
    assert record.resolution.reason == "progress resumed"


@pytest.mark.req("R7.2")
def test_no_stall_is_raised_before_the_first_heartbeat(
    machine: EmergencyMachine, clock: FakeClock, config: SidecarConfig, control: ControlBlock
) -> None:
    attach(control, machine)
    clock.advance_s(config.detection.stall_seconds * 10)
    machine.poll()
    assert machine.active() is None


@pytest.mark.req("R7.2")
def test_no_stall_is_raised_while_a_rollback_is_in_progress(
    machine: EmergencyMachine, control: ControlBlock, clock: FakeClock, config: SidecarConfig
) -> None:
    attach(control, machine)
    control.heartbeat(TRAINER, step=7, epoch=2)
    control.write_rollback(
        RollbackRecord(
            rollback_id=1,
            tier=RollbackTier.ROLLBACK_TIER_FULL,
            phase=RollbackPhase.ROLLBACK_PHASE_LOAD,
            started_ns=clock.now_ns(),
            deadline_ns=clock.now_ns() + int(config.detection.stall_seconds * 3e9),
        )
    )
    clock.advance_s(config.detection.stall_seconds * 2)
    machine.poll()
    assert machine.active() is None


@pytest.mark.req("R6.5")
def test_a_full_rollback_not_reported_by_its_deadline_raises_critical(
    machine: EmergencyMachine, clock: FakeClock, config: SidecarConfig, metrics: SidecarMetrics
) -> None:
    machine.start_rollback_deadline("rb-1")
    clock.advance_s(config.rollback.full_deadline_seconds - 0.001)
    machine.poll()
    assert machine.active() is None
    clock.advance_ms(1)
    machine.poll()
    active = machine.active()
    assert active is not None
    assert (active.level, active.kind) == (
        CRITICAL,
        AnomalyKind.ANOMALY_KIND_ROLLBACK_DEADLINE_MISSED,
    )
    assert "rb-1" in active.reason
    assert sample(metrics, "tolaria_sidecar_full_rollback_deadline_misses_total") == 1


@pytest.mark.req("R6.5")
def test_a_full_rollback_reported_in_time_clears_its_deadline(
    machine: EmergencyMachine, clock: FakeClock, config: SidecarConfig
) -> None:
    machine.start_rollback_deadline("rb-1")
    assert machine.finish_rollback("rb-1")
    clock.advance_s(config.rollback.full_deadline_seconds * 2)
    machine.poll()
    assert machine.active() is None
    assert not machine.finish_rollback("rb-1")


@pytest.mark.req("R7.3")
def test_every_transition_is_an_event_in_order(
    machine: EmergencyMachine, control: ControlBlock, clock: FakeClock, recorded: RecordedEvents
) -> None:
    generation, _ = machine.raise_signal(signal(MINOR))
    clock.advance_ms(5000)
    machine.poll()  # escalates to MAJOR
    ack(control, TRAINER)
    machine.poll()
    machine.resolve(generation + 1, "trainer", "done")
    assert recorded.kinds() == ["emergency", "ack", "emergency", "ack", "ack", "resolution"]
    assert [e.level for e in recorded.of("emergency")] == [MINOR, MAJOR]


@pytest.mark.req("R7.3")
def test_ack_latency_is_measured_from_publish_to_the_participants_ack(
    machine: EmergencyMachine, control: ControlBlock, metrics: SidecarMetrics
) -> None:
    machine.raise_signal(signal(SEVERE))
    ack(control, TRAINER)
    machine.poll()
    [record] = machine.history()
    trainer_ack = next(a for a in record.acks if a.participant == TRAINER)
    raised_ns = control.read_emergency().raised_ns
    assert 0 <= trainer_ack.latency_ns == control.participant(TRAINER).acked_ns - raised_ns
    severe = EmergencyLevel.Name(SEVERE)
    count = sample(metrics, "tolaria_sidecar_emergency_ack_latency_seconds_count", level=severe)
    assert count == 2  # the trainer's and the sidecar's own


@pytest.mark.req("R7.3")
def test_a_restarted_sidecar_continues_the_generation_and_adopts_the_active_incident(
    machine: EmergencyMachine,
    control: ControlBlock,
    config: SidecarConfig,
    clock: FakeClock,
    metrics: SidecarMetrics,
) -> None:
    generation, _ = machine.raise_signal(signal(SEVERE))
    restarted = EmergencyMachine(
        run_id=config.run_id,
        control=control,
        emergency=config.emergency,
        detection=config.detection,
        rollback=config.rollback,
        tuning=Tuning(),
        clock=clock,
        events=RecordedEvents(),
        metrics=metrics,
    )
    active = restarted.active()
    assert active is not None and active.generation == generation
    resolution = restarted.resolve(generation, "operator", "after restart")
    assert resolution.generation == generation
    assert control.emergency_generation() == generation + 1
