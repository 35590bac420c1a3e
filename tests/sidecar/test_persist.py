"""Durable persistence of slots and full-rollback loads (R6.3): pin, discard, drills, load."""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from leyline import CheckpointRecord, RollbackPhase, SnapshotManifest
from leyline.checksum import (
    DATA_ALGORITHM,
    REGION_ALGORITHM,
    digest_bytes,
    digest_int,
    region_digest,
    xxh3,
)
from leyline.shm import SLOT_FLAG_FROM_CHECKPOINT, ControlBlock
from leyline.v1.resilience_pb2 import CheckpointOutcome
from tests.fakes import FakeClock
from tests.sidecar.conftest import STATE_BYTES, make_slot_manager
from tests.sidecar.doubles import RUN_ID, RecordedEvents, TrainerDouble, payload
from tolaria_sidecar.checkpoints import DurableStore
from tolaria_sidecar.config import CheckpointDrill, SidecarConfig
from tolaria_sidecar.errors import (
    CheckpointLoadFailed,
    NoCheckpoint,
    PersistFailed,
    PreconditionFailed,
)
from tolaria_sidecar.metrics import SidecarMetrics
from tolaria_sidecar.persist_guard import AFTER_COPY_POINT, PersistGuard
from tolaria_sidecar.slots import SlotManager
from tolaria_sidecar.workers import Persister


def outcomes(metrics: SidecarMetrics, outcome: int) -> float | None:
    name = CheckpointOutcome.Name(outcome)  # type: ignore[arg-type]
    return metrics.registry.get_sample_value(
        "tolaria_sidecar_checkpoint_writes_total", {"outcome": name}
    )


@dataclass
class WatchingStore:
    """The real store, with a hook that runs when `write` is called (before the copy)."""

    inner: DurableStore
    on_write: list[object] = field(default_factory=list)
    hook: object = None

    def write(self, **kwargs: object) -> CheckpointRecord:
        if callable(self.hook):
            self.on_write.append(self.hook())
        return self.inner.write(**kwargs)  # type: ignore[arg-type]

    def latest(self) -> CheckpointRecord | None:
        return self.inner.latest()

    def committed(self) -> list[CheckpointRecord]:
        return self.inner.committed()

    def load_latest(self, into: memoryview) -> tuple[CheckpointRecord, bytes, int]:
        return self.inner.load_latest(into)


@pytest.fixture
def watched(
    config: SidecarConfig,
    control: ControlBlock,
    store: DurableStore,
    guard: PersistGuard,
    clock: FakeClock,
    recorded: RecordedEvents,
    metrics: SidecarMetrics,
) -> Iterator[tuple[SlotManager, WatchingStore, TrainerDouble]]:
    watching = WatchingStore(store)
    manager = make_slot_manager(
        config, control, watching, guard, clock, events=recorded, metrics=metrics
    )
    manager.attach(state_bytes=STATE_BYTES, manifest_bytes=1024)
    double = TrainerDouble.mapping(
        config.shm_dir, control.seg.path.name, [i.shm_name for i in manager.infos()]
    )
    yield manager, watching, double
    double.close()
    manager.close(unlink=False)


@pytest.mark.req("R6.3")
def test_a_committed_slot_becomes_a_durable_checkpoint(
    slots: SlotManager,
    trainer: TrainerDouble,
    store: DurableStore,
    control: ControlBlock,
    recorded: RecordedEvents,
    metrics: SidecarMetrics,
) -> None:
    manifest = trainer.write(2, 5, payload(STATE_BYTES), step=20, epoch=2)
    record = slots.persist(2, 5)
    assert (record.epoch, record.global_step, record.snapshot_generation) == (2, 20, 5)
    assert store.latest() == record
    state = control.slot_state(2)
    assert (state.durable_generation, state.pinned_generation) == (5, 0)
    assert slots.infos()[2].durable
    assert recorded.of("checkpoint") == [record]
    assert outcomes(metrics, CheckpointOutcome.CHECKPOINT_OUTCOME_COMMITTED) == 1
    into = bytearray(STATE_BYTES)
    loaded_manifest, length = store.load(record, memoryview(into))
    assert bytes(into[:length]) == payload(STATE_BYTES)
    assert SnapshotManifest.FromString(loaded_manifest) == manifest


@pytest.mark.req("R6.3")
def test_the_generation_is_pinned_while_it_is_written_and_unpinned_after(
    watched: tuple[SlotManager, WatchingStore, TrainerDouble], control: ControlBlock
) -> None:
    manager, watching, trainer = watched
    trainer.write(1, 3, payload(STATE_BYTES))
    watching.hook = lambda: control.slot_state(1).pinned_generation
    manager.persist(1, 3)
    assert watching.on_write == [3]
    assert control.slot_state(1).pinned_generation == 0


@pytest.mark.req("R6.3")
def test_a_slot_overwritten_during_persist_is_discarded_and_the_previous_checkpoint_stays(
    watched: tuple[SlotManager, WatchingStore, TrainerDouble],
    store: DurableStore,
    control: ControlBlock,
    recorded: RecordedEvents,
    metrics: SidecarMetrics,
) -> None:
    manager, watching, trainer = watched
    trainer.write(0, 1, payload(STATE_BYTES, 1), epoch=1)
    previous = manager.persist(0, 1)
    trainer.write(1, 2, payload(STATE_BYTES, 2), epoch=2)
    # A trainer breaking the pin contract rewrites the slot while the copy runs.
    watching.hook = lambda: trainer.write(1, 3, payload(STATE_BYTES, 3), epoch=3)
    with pytest.raises(PersistFailed, match="overwritten during persist"):
        manager.persist(1, 2)
    assert store.latest() == previous
    assert [r.snapshot_generation for r in store.committed()] == [1]
    [failure] = recorded.of("checkpoint_failed")
    assert (failure.epoch, failure.snapshot_generation) == (2, 2)
    assert "overwritten during persist" in failure.error
    assert control.slot_state(1).pinned_generation == 0
    assert control.slot_state(1).durable_generation == 0
    assert outcomes(metrics, CheckpointOutcome.CHECKPOINT_OUTCOME_DISCARDED) == 1
    assert not list(store.directory.glob("*.tmp"))


@pytest.mark.req("R6.3")
def test_checkpoint_io_error_drill_fails_that_epoch_and_keeps_the_previous_checkpoint(
    config: SidecarConfig, control: ControlBlock, clock: FakeClock, tmp_path: Path
) -> None:
    guard = PersistGuard([CheckpointDrill.parse("checkpoint-io-error@epoch=3")])
    events = RecordedEvents()
    with DurableStore(tmp_path / "drill", config.checkpoints, run_id=RUN_ID, faults=guard) as store:
        manager = make_slot_manager(config, control, store, guard, clock, events=events)
        manager.attach(state_bytes=STATE_BYTES, manifest_bytes=1024)
        trainer = TrainerDouble.mapping(
            config.shm_dir, control.seg.path.name, [i.shm_name for i in manager.infos()]
        )
        trainer.write(0, 1, payload(STATE_BYTES, 1), epoch=2)
        kept = manager.persist(0, 1)
        trainer.write(1, 2, payload(STATE_BYTES, 2), epoch=3)
        with pytest.raises(PersistFailed) as failed:
            manager.persist(1, 2)
        assert str(errno.ENOSPC) in failed.value.reason
        assert guard.fired == {AFTER_COPY_POINT: 1}
        assert store.latest() == kept
        [failure] = events.of("checkpoint_failed")
        assert failure.epoch == 3
        trainer.write(2, 3, payload(STATE_BYTES, 3), epoch=4)
        assert manager.persist(2, 3).epoch == 4  # the drill fires for its epoch only
        trainer.close()
        manager.close(unlink=False)


@pytest.mark.req("R6.2")
def test_a_corrupt_slot_is_verified_before_persisting_and_never_written(
    slots: SlotManager, trainer: TrainerDouble, store: DurableStore, recorded: RecordedEvents
) -> None:
    trainer.write(0, 1, payload(STATE_BYTES), corrupt=True)
    with pytest.raises(PersistFailed, match="data checksum"):
        slots.persist(0, 1)
    assert store.latest() is None
    assert [k for k in recorded.kinds() if k != "snapshot"] == [
        "snapshot_rejected",
        "checkpoint_failed",
    ]


@pytest.mark.req("R6.2")
def test_a_rejected_slot_is_never_persisted(
    slots: SlotManager, trainer: TrainerDouble, store: DurableStore
) -> None:
    trainer.write(0, 1, payload(STATE_BYTES), corrupt=True)
    assert slots.verify(0, 1) is False
    with pytest.raises(PersistFailed, match="rejected by verification"):
        slots.persist(0, 1)
    assert store.latest() is None


@pytest.mark.req("R6.3")
def test_persisting_a_generation_the_slot_no_longer_holds_fails(
    slots: SlotManager, trainer: TrainerDouble
) -> None:
    trainer.write(0, 2, payload(STATE_BYTES))
    with pytest.raises(PersistFailed, match="generation 2 now"):
        slots.persist(0, 1)


@pytest.mark.req("R6.3")
def test_a_full_rollback_loads_the_latest_checkpoint_into_the_oldest_unpinned_slot(
    slots: SlotManager, trainer: TrainerDouble, control: ControlBlock, clock: FakeClock
) -> None:
    for index in range(5):
        trainer.write(index, index + 1, payload(STATE_BYTES, index + 1), epoch=index)
    record = slots.persist(3, 4)
    control.set_pinned(0, 1)  # the oldest is being persisted: never touched
    loaded = slots.load_checkpoint(deadline_ns=clock.now_ns() + 12 * 10**9)
    assert loaded.record == record
    assert (loaded.slot.index, loaded.slot.generation) == (1, 6)
    header = trainer.slots[1].header()
    assert header.flags & SLOT_FLAG_FROM_CHECKPOINT
    assert (header.epoch, header.data_length) == (3, STATE_BYTES)
    assert header.data_checksum == region_digest(memoryview(payload(STATE_BYTES, 4)))
    assert bytes(trainer.slots[1].data[:STATE_BYTES]) == payload(STATE_BYTES, 4)
    manifest = SnapshotManifest.FromString(trainer.slots[1].manifest_bytes(header))
    assert manifest.generation == 6
    state = control.slot_state(1)
    assert (state.verified_generation, state.durable_generation) == (6, 6)
    assert [p.phase for p in loaded.phases] == [
        RollbackPhase.ROLLBACK_PHASE_LOAD,
        RollbackPhase.ROLLBACK_PHASE_VERIFY,
    ]
    assert all(p.within_budget and p.budget_ns > 0 for p in loaded.phases)


@pytest.mark.req("R6.3")
def test_a_full_rollback_prefers_an_empty_slot(
    slots: SlotManager, trainer: TrainerDouble, clock: FakeClock
) -> None:
    trainer.write(0, 1, payload(STATE_BYTES, 1))
    trainer.write(1, 2, payload(STATE_BYTES, 2))
    slots.persist(1, 2)
    loaded = slots.load_checkpoint(deadline_ns=clock.now_ns() + 10**9)
    assert (loaded.slot.index, loaded.slot.generation) == (2, 3)


@pytest.mark.req("R6.5")
def test_a_full_rollback_without_any_checkpoint_fails_and_touches_no_slot(
    slots: SlotManager, trainer: TrainerDouble, clock: FakeClock
) -> None:
    trainer.write(0, 1, payload(STATE_BYTES))
    with pytest.raises(CheckpointLoadFailed, match="no restorable checkpoint"):
        slots.load_checkpoint(deadline_ns=clock.now_ns() + 10**9)
    assert slots.committed_generation(0) == 1


@pytest.mark.req("R6.5")
def test_a_full_rollback_whose_checkpoint_files_are_gone_raises_no_checkpoint(
    slots: SlotManager, trainer: TrainerDouble, store: DurableStore, clock: FakeClock
) -> None:
    trainer.write(0, 1, payload(STATE_BYTES))
    record = slots.persist(0, 1)
    (store.directory / record.file_name).write_bytes(b"damaged")
    with pytest.raises(NoCheckpoint):
        slots.load_checkpoint(deadline_ns=clock.now_ns() + 10**9)


@pytest.mark.req("R6.3")
def test_commits_must_number_above_a_loaded_checkpoint(
    slots: SlotManager, trainer: TrainerDouble, clock: FakeClock
) -> None:
    trainer.write(0, 1, payload(STATE_BYTES, 1))
    slots.persist(0, 1)
    loaded = slots.load_checkpoint(deadline_ns=clock.now_ns() + 10**9)
    assert loaded.slot.generation == 2
    trainer.write(2, 2, payload(STATE_BYTES, 2))  # a writer that did not bump its counter
    with pytest.raises(PreconditionFailed, match="must be > 2"):
        slots.commit(2, 2)
    trainer.write(2, 3, payload(STATE_BYTES, 3))
    assert slots.commit(2, 3).generation == 3


class BlockingSlots:
    """Stands in for the slot manager: each persist waits until the test releases it."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.persisted: list[int] = []

    def persist(self, index: int, generation: int) -> CheckpointRecord:
        self.started.set()
        self.release.wait(30)
        self.persisted.append(generation)
        return CheckpointRecord(snapshot_generation=generation)


@pytest.mark.req("R6.3")
def test_persists_run_one_at_a_time_and_a_newer_request_replaces_a_queued_one() -> None:
    slots = BlockingSlots()
    persister = Persister(slots)  # type: ignore[arg-type]
    persister.start()
    assert persister.schedule(0, 1) == (True, "")
    assert slots.started.wait(30)
    assert persister.schedule(1, 2) == (True, "")
    assert persister.schedule(2, 3) == (True, "")  # replaces generation 2 in the queue
    scheduled, why = persister.schedule(1, 2)
    assert not scheduled and "newer generation 3" in why
    slots.release.set()
    outcome = persister.wait(3, 30)
    assert isinstance(outcome, CheckpointRecord) and outcome.snapshot_generation == 3
    assert slots.persisted == [1, 3]
    assert persister.stop(30)


@pytest.mark.req("R6.3")
def test_a_checkpoint_with_a_plain_xxh3_manifest_loads_into_a_slot_with_the_chunked_digest(
    slots: SlotManager,
    trainer: TrainerDouble,
    store: DurableStore,
    clock: FakeClock,
) -> None:
    """Files written before the chunked region digest stay loadable: the manifest names its
    algorithm, the load verifies with it and the slot gets the digest restores check."""
    data = payload(STATE_BYTES, 9)
    legacy = SnapshotManifest(
        run_id=RUN_ID,
        generation=3,
        global_step=30,
        epoch=2,
        data_bytes=len(data),
        checksum_algorithm=DATA_ALGORITHM,
        checksum=digest_bytes(xxh3(data)),
    )
    store.write(
        manifest=legacy.SerializeToString(),
        data=memoryview(data),
        epoch=2,
        global_step=30,
        snapshot_generation=3,
    )
    loaded = slots.load_checkpoint(deadline_ns=clock.now_ns() + 12 * 10**9)
    header = trainer.slots[loaded.slot.index].header()
    assert header.checksum_algorithm == REGION_ALGORITHM
    assert header.data_checksum == region_digest(memoryview(data))
    manifest = SnapshotManifest.FromString(trainer.slots[loaded.slot.index].manifest_bytes(header))
    assert manifest.checksum_algorithm == REGION_ALGORITHM
    assert digest_int(manifest.checksum) == header.data_checksum


@pytest.mark.req("R6.3")
def test_a_checkpoint_whose_data_does_not_match_its_legacy_manifest_is_refused(
    slots: SlotManager, trainer: TrainerDouble, store: DurableStore, clock: FakeClock
) -> None:
    del trainer  # attached: the slots exist
    data = payload(STATE_BYTES, 9)
    legacy = SnapshotManifest(
        run_id=RUN_ID,
        generation=3,
        data_bytes=len(data),
        checksum_algorithm=DATA_ALGORITHM,
        checksum=digest_bytes(xxh3(data) ^ 1),
    )
    store.write(
        manifest=legacy.SerializeToString(),
        data=memoryview(data),
        epoch=2,
        global_step=30,
        snapshot_generation=3,
    )
    with pytest.raises(CheckpointLoadFailed, match="data checksum"):
        slots.load_checkpoint(deadline_ns=clock.now_ns() + 12 * 10**9)


def _manifest(instance: str, lineage: str, fingerprint: str = "layout-a") -> bytes:
    return SnapshotManifest(
        instance_id=instance, lineage_id=lineage, layout_fingerprint=fingerprint
    ).SerializeToString()


@pytest.mark.req("R13.1")
def test_the_durable_tier_loads_only_this_instances_checkpoints_unless_asked_to_resume(
    config: SidecarConfig,
    control: ControlBlock,
    store: DurableStore,
    guard: PersistGuard,
    clock: FakeClock,
) -> None:
    mine = make_slot_manager(config, control, store, guard, clock)
    record = CheckpointRecord(instance_id="someone-else-01", lineage_id="their-lineage-01")
    refused = mine.accepts(record, _manifest("someone-else-01", "their-lineage-01"), "")
    assert refused is not None and "someone-else-01" in refused and "resume" in refused
    assert mine.accepts(record, _manifest(config.instance_id, config.lineage_id), "") is None
    resuming = replace(config, lineage_id="their-lineage-01", resume=True)
    theirs = make_slot_manager(resuming, control, store, guard, clock)
    assert theirs.accepts(record, _manifest("someone-else-01", "their-lineage-01"), "") is None
    other = _manifest("someone-else-01", "a-third-lineage")
    assert theirs.accepts(record, other, "") is not None, "only the lineage it resumes"
    layout = mine.accepts(record, _manifest(config.instance_id, "x", "layout-b"), "layout-a")
    assert layout is not None and "layout" in layout


@pytest.mark.req("R13.1")
def test_a_checkpoint_of_another_instance_is_refused_at_load_and_named_in_the_rejections(
    config: SidecarConfig,
    control: ControlBlock,
    guard: PersistGuard,
    clock: FakeClock,
) -> None:
    config.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    with DurableStore(
        config.checkpoint_dir,
        config.checkpoints,
        run_id=RUN_ID,
        instance_id="earlier-run-0001",
        faults=guard,
    ) as earlier:
        earlier.write(
            manifest=_manifest("earlier-run-0001", "earlier-run-0001"),
            data=memoryview(payload(STATE_BYTES, 7)),
            epoch=3,
            global_step=30,
            snapshot_generation=4,
        )
    with DurableStore(
        config.checkpoint_dir,
        config.checkpoints,
        run_id=RUN_ID,
        instance_id=config.instance_id,
        faults=guard,
    ) as store:
        slots = make_slot_manager(config, control, store, guard, clock)
        slots.attach(state_bytes=STATE_BYTES, manifest_bytes=1024)
        with pytest.raises(NoCheckpoint):
            slots.load_checkpoint(deadline_ns=clock.now_ns() + 12 * 10**9)
        (rejection,) = slots.last_rejections
        assert rejection.instance_id == "earlier-run-0001" and rejection.global_step == 30
        assert "earlier-run-0001" in rejection.reason
        slots.close(unlink=True)
