"""Snapshot slots owned by the sidecar (R6.1, R6.2): allocation, feasibility, re-attach,
background verification and crash resume, on real shared-memory segments."""

from __future__ import annotations

from pathlib import Path

import pytest

from leyline import Participant
from leyline.checksum import REGION_ALGORITHM
from leyline.shm import PAGE, ControlBlock, EmergencyRecord, Slot, control_name, slot_name
from leyline.spec import RollbackSpec, SnapshotSpec, TolariaRun
from leyline.v1.resilience_pb2 import SlotCondition
from tests.fakes import FakeClock
from tests.sidecar.conftest import COPY_BYTES_PER_SECOND, STATE_BYTES, make_slot_manager
from tests.sidecar.doubles import RecordedEvents, TrainerDouble, payload, tolaria_run
from tolaria_sidecar import verification
from tolaria_sidecar.allocation import round_pages
from tolaria_sidecar.bandwidth import assess, measure_copy_bandwidth
from tolaria_sidecar.checkpoints import DurableStore
from tolaria_sidecar.config import SidecarConfig
from tolaria_sidecar.control_block import open_control_block
from tolaria_sidecar.errors import (
    ConfigInvalid,
    PreconditionFailed,
    RequestInvalid,
    SlotBudgetTooSmall,
)
from tolaria_sidecar.metrics import SidecarMetrics
from tolaria_sidecar.persist_guard import PersistGuard
from tolaria_sidecar.slots import SlotManager

MIB = 1 << 20


def manager(
    config: SidecarConfig,
    control: ControlBlock,
    store: DurableStore,
    guard: PersistGuard,
    clock: FakeClock,
    bandwidth: float | None = COPY_BYTES_PER_SECOND,
) -> SlotManager:
    return make_slot_manager(config, control, store, guard, clock, bandwidth=bandwidth)


def configured(run: TolariaRun, shm_dir: Path, tmp_path: Path) -> SidecarConfig:
    return SidecarConfig.from_run(
        run, socket_path=tmp_path / "s.sock", checkpoint_dir=tmp_path / "checkpoints"
    )


@pytest.mark.req("R6.1")
def test_attach_creates_n_prefaulted_slots_of_state_plus_headroom(
    slots: SlotManager, config: SidecarConfig
) -> None:
    state = 1_000_000
    slots.attach(state_bytes=state, manifest_bytes=400_000)
    infos = slots.infos()
    capacity = round_pages(int(state * (1 + config.snapshots.headroom_ratio)))
    manifest_capacity = round_pages(4 * 400_000)
    assert len(infos) == config.snapshots.slots
    for index, info in enumerate(infos):
        path = config.shm_dir / slot_name(config.instance_id, index)
        assert info.shm_name == path.name
        assert info.capacity_bytes == capacity
        assert info.condition == SlotCondition.SLOT_CONDITION_EMPTY
        slot = Slot.attach(path, instance_id=config.instance_id)
        assert slot.manifest_capacity == manifest_capacity
        size = Slot.size_for(capacity, manifest_capacity)
        assert path.stat().st_size == size
        assert path.stat().st_blocks * 512 >= size, "pages must be allocated at creation"
        slot.close()


@pytest.mark.req("R6.1")
def test_the_manifest_region_is_at_least_one_mebibyte(
    slots: SlotManager, config: SidecarConfig
) -> None:
    slots.attach(state_bytes=PAGE, manifest_bytes=10)
    slot = Slot.attach(
        config.shm_dir / slot_name(config.instance_id, 0), instance_id=config.instance_id
    )
    assert slot.manifest_capacity == MIB
    slot.close()


@pytest.mark.req("R6.1")
def test_the_byte_budget_lowers_the_slot_count(
    shm_dir: Path, tmp_path: Path, store: DurableStore, guard: PersistGuard, clock: FakeClock
) -> None:
    size = Slot.size_for(round_pages(int(STATE_BYTES * 1.25)), MIB)
    run = tolaria_run(snapshots={"slots": 5, "maxBytes": 3 * size + 1})
    config = configured(run, shm_dir, tmp_path)
    control = ControlBlock.create(
        shm_dir / control_name(config.instance_id), 5, instance_id=config.instance_id
    )
    slots = manager(config, control, store, guard, clock)
    slots.attach(state_bytes=STATE_BYTES, manifest_bytes=0)
    assert len(slots.infos()) == 3
    assert sorted(p.name for p in shm_dir.iterdir() if "slot" in p.name) == [
        slot_name(config.instance_id, i) for i in range(3)
    ]
    slots.close(unlink=True)
    control.close()


@pytest.mark.req("R6.1")
def test_a_budget_too_small_for_one_slot_is_refused_naming_the_field(
    shm_dir: Path, tmp_path: Path, store: DurableStore, guard: PersistGuard, clock: FakeClock
) -> None:
    run = tolaria_run(snapshots={"maxBytes": 4096})
    config = configured(run, shm_dir, tmp_path)
    control = ControlBlock.create(
        shm_dir / control_name(config.instance_id), 5, instance_id=config.instance_id
    )
    slots = manager(config, control, store, guard, clock)
    with pytest.raises(SlotBudgetTooSmall, match=r"spec\.snapshots\.maxBytes"):
        slots.attach(state_bytes=STATE_BYTES, manifest_bytes=0)
    control.close()


@pytest.mark.req("R6.1")
def test_feasibility_compares_the_copy_time_with_the_commit_budget() -> None:
    rollback = RollbackSpec(commit_ms=100.0)
    snapshots = SnapshotSpec()
    slow = assess(1_200_000_000, 11.3e9, rollback, snapshots)
    assert not slow.fast_tier_feasible
    assert slow.degraded_reason == "1.20 GB at 11.3 GB/s needs 106 ms > 100 ms commit budget"
    fast = assess(500_000_000, 11.3e9, rollback, snapshots)
    assert fast.fast_tier_feasible and fast.degraded_reason == ""
    assert fast.copy_gbps == pytest.approx(11.3)


@pytest.mark.req("R6.1")
def test_attach_reports_a_degraded_fast_tier_when_the_copy_is_too_slow(
    shm_dir: Path, tmp_path: Path, store: DurableStore, guard: PersistGuard, clock: FakeClock
) -> None:
    run = tolaria_run(rollback={"commitMs": 1.0, "prepareMs": 1.0, "confirmMs": 1.0, "fastMs": 3.0})
    config = configured(run, shm_dir, tmp_path)
    control = ControlBlock.create(
        shm_dir / control_name(config.instance_id), 5, instance_id=config.instance_id
    )
    slots = manager(config, control, store, guard, clock, bandwidth=1e6)
    feasibility = slots.attach(state_bytes=STATE_BYTES, manifest_bytes=0)
    assert not feasibility.fast_tier_feasible
    assert "commit budget" in feasibility.degraded_reason
    slots.close(unlink=True)
    control.close()


@pytest.mark.req("R6.1")
def test_copy_bandwidth_is_measured_between_prefaulted_buffers() -> None:
    assert measure_copy_bandwidth(4 * MIB) > 1e8  # any machine copies faster than 100 MB/s


@pytest.mark.req("R6.2")
def test_a_restarted_sidecar_reattaches_committed_slots_without_truncating_them(
    slots: SlotManager,
    trainer: TrainerDouble,
    config: SidecarConfig,
    control: ControlBlock,
    store: DurableStore,
    guard: PersistGuard,
    clock: FakeClock,
) -> None:
    for index, generation in ((0, 1), (1, 2), (2, 3)):
        trainer.write(index, generation, payload(STATE_BYTES, generation), step=10 * generation)
    inodes = {p.name: p.stat().st_ino for p in config.shm_dir.iterdir()}
    slots.close(unlink=False)  # the sidecar dies; its segments stay in shared memory

    restarted = manager(
        config,
        ControlBlock.attach(control.seg.path, instance_id=config.instance_id),
        store,
        guard,
        clock,
    )
    pending = restarted.restore()
    assert [(e.generation, e.global_step) for e in restarted.table()] == [(3, 30), (2, 20), (1, 10)]
    assert sorted(pending) == [(0, 1), (1, 2), (2, 3)]
    restarted.attach(state_bytes=STATE_BYTES, manifest_bytes=1024)
    assert {p.name: p.stat().st_ino for p in config.shm_dir.iterdir()} == inodes
    assert restarted.verify(2, 3) is True
    assert bytes(trainer.slots[2].data[:STATE_BYTES]) == payload(STATE_BYTES, 3)
    restarted.close(unlink=False)


@pytest.mark.req("R6.2")
def test_a_slot_too_small_for_a_new_state_is_recreated_on_a_new_inode(
    slots: SlotManager, trainer: TrainerDouble, config: SidecarConfig
) -> None:
    path = config.shm_dir / slot_name(config.instance_id, 0)
    before = path.stat().st_ino
    slots.attach(state_bytes=STATE_BYTES * 4, manifest_bytes=1024)
    assert path.stat().st_ino != before
    assert slots.infos()[0].capacity_bytes >= STATE_BYTES * 4


@pytest.mark.req("R6.2")
def test_background_verification_marks_a_good_slot_verified_with_an_event(
    slots: SlotManager, trainer: TrainerDouble, control: ControlBlock, recorded: RecordedEvents
) -> None:
    trainer.write(0, 1, payload(STATE_BYTES))
    assert slots.commit(0, 1).condition == SlotCondition.SLOT_CONDITION_COMMITTED
    assert slots.verify(0, 1) is True
    assert control.slot_state(0).verified_generation == 1
    [event] = recorded.of("snapshot")
    assert (event.slot.index, event.slot.generation) == (0, 1)
    assert event.slot.condition == SlotCondition.SLOT_CONDITION_VERIFIED


@pytest.mark.req("R6.2")
def test_a_corrupted_slot_is_rejected_by_background_verification_with_an_event(
    slots: SlotManager,
    trainer: TrainerDouble,
    control: ControlBlock,
    recorded: RecordedEvents,
    metrics: SidecarMetrics,
) -> None:
    trainer.write(1, 4, payload(STATE_BYTES), step=99, corrupt=True)
    assert slots.verify(1, 4) is False
    assert control.slot_state(1).rejected_generation == 4
    assert control.slot_state(1).verified_generation == 0
    [rejection] = recorded.of("snapshot_rejected")
    assert (rejection.slot, rejection.generation, rejection.global_step) == (1, 4, 99)
    assert rejection.detected_by == Participant.PARTICIPANT_SIDECAR
    assert "data checksum" in rejection.reason
    assert slots.infos()[1].condition == SlotCondition.SLOT_CONDITION_REJECTED
    assert metrics.registry.get_sample_value("tolaria_sidecar_snapshot_rejections_total") == 1


@pytest.mark.req("R6.2")
def test_a_verification_overtaken_by_the_trainer_is_discarded(
    slots: SlotManager,
    trainer: TrainerDouble,
    control: ControlBlock,
    recorded: RecordedEvents,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trainer.write(0, 1, payload(STATE_BYTES))
    real_hash = verification.region_digest

    def trainer_writes_meanwhile(view: memoryview, algorithm: int = REGION_ALGORITHM) -> int:
        trainer.write(0, 2, payload(STATE_BYTES, 2))
        return real_hash(view, algorithm)

    monkeypatch.setattr(verification, "region_digest", trainer_writes_meanwhile)
    assert slots.verify(0, 1) is None
    state = control.slot_state(0)
    assert (state.verified_generation, state.rejected_generation) == (0, 0)
    assert recorded.events == []


@pytest.mark.req("R6.2")
def test_verifying_a_generation_the_slot_no_longer_holds_does_nothing(
    slots: SlotManager, trainer: TrainerDouble, recorded: RecordedEvents
) -> None:
    trainer.write(0, 2, payload(STATE_BYTES))
    assert slots.verify(0, 1) is None
    assert recorded.events == []


@pytest.mark.req("R6.2")
def test_resume_slot_is_the_newest_valid_slot_with_a_matching_layout(
    slots: SlotManager, trainer: TrainerDouble
) -> None:
    trainer.write(0, 1, payload(STATE_BYTES, 1), fingerprint="a")
    trainer.write(1, 2, payload(STATE_BYTES, 2), fingerprint="a")
    trainer.write(2, 3, payload(STATE_BYTES, 3), fingerprint="a", corrupt=True)
    trainer.write(3, 4, payload(STATE_BYTES, 4), fingerprint="b")
    assert slots.verify(2, 3) is False
    resume = slots.resume_slot("a")
    assert resume is not None and (resume.index, resume.generation) == (1, 2)
    b = slots.resume_slot("b")
    assert b is not None and b.generation == 4
    assert slots.resume_slot("c") is None


@pytest.mark.req("R6.2")
def test_the_table_lists_committed_slots_newest_first(
    slots: SlotManager, trainer: TrainerDouble
) -> None:
    trainer.write(2, 5, payload(STATE_BYTES), step=50)
    trainer.write(0, 7, payload(STATE_BYTES), step=70)
    trainer.write(1, 6, payload(STATE_BYTES), step=60)
    assert [(e.index, e.generation) for e in slots.table()] == [(0, 7), (1, 6), (2, 5)]


@pytest.mark.req("R6.2")
def test_a_commit_whose_header_shows_another_generation_is_refused(
    slots: SlotManager, trainer: TrainerDouble
) -> None:
    trainer.write(0, 3, payload(STATE_BYTES))
    with pytest.raises(PreconditionFailed, match="generation 3"):
        slots.commit(0, 4)
    with pytest.raises(RequestInvalid, match="slot"):
        slots.commit(99, 3)


@pytest.mark.req("R6.2")
def test_commits_before_any_attach_are_refused(slots: SlotManager) -> None:
    with pytest.raises(PreconditionFailed, match="Attach first"):
        slots.commit(0, 1)


@pytest.mark.req("R6.1")
def test_slot_gauges_count_slots_by_condition(
    slots: SlotManager, trainer: TrainerDouble, metrics: SidecarMetrics
) -> None:
    trainer.write(0, 1, payload(STATE_BYTES))
    trainer.write(1, 2, payload(STATE_BYTES), corrupt=True)
    slots.verify(0, 1)
    slots.verify(1, 2)

    def gauge(condition: int) -> float | None:
        name = SlotCondition.Name(condition)  # type: ignore[arg-type]
        return metrics.registry.get_sample_value("tolaria_sidecar_slots", {"condition": name})

    assert gauge(SlotCondition.SLOT_CONDITION_VERIFIED) == 1
    assert gauge(SlotCondition.SLOT_CONDITION_REJECTED) == 1
    assert gauge(SlotCondition.SLOT_CONDITION_EMPTY) == 3


@pytest.mark.req("R6.2")
def test_an_unreadable_control_block_is_recreated_and_a_valid_one_reused(
    config: SidecarConfig,
) -> None:
    path = config.shm_dir / control_name(config.instance_id)
    path.write_bytes(b"not a control block" * 300)
    path.chmod(0o600)
    fresh = open_control_block(config)
    assert fresh.emergency_generation() == 0
    fresh.write_emergency(EmergencyRecord(generation=7, level=1, state=1, reason="kept"))
    inode = path.stat().st_ino
    fresh.close()
    reused = open_control_block(config)
    assert path.stat().st_ino == inode
    assert reused.read_emergency().generation == 7
    reused.close()


@pytest.mark.req("R13.1")
@pytest.mark.parametrize("planted", ["world-readable", "symlink", "other-instance"])
def test_a_control_block_that_is_not_this_instances_is_refused_and_left_alone(
    config: SidecarConfig, planted: str, tmp_path: Path
) -> None:
    path = config.shm_dir / control_name(config.instance_id)
    if planted == "world-readable":
        path.write_bytes(b"x" * 4096)
        path.chmod(0o644)
    elif planted == "symlink":
        target = tmp_path / "elsewhere"
        target.write_bytes(b"x" * 4096)
        path.symlink_to(target)
    else:
        ControlBlock.create(path, 5, instance_id="someone-else-1234").close()
    before = path.lstat()
    with pytest.raises(ConfigInvalid, match="--instance-id"):
        open_control_block(config)
    after = path.lstat()
    assert (after.st_ino, after.st_mode, after.st_size) == (
        before.st_ino,
        before.st_mode,
        before.st_size,
    )
