"""The snapshot slots the sidecar owns, behind one entry point: `SlotManager` (R6.1-R6.3).

Called by the `TrainerLink` servicer (attach, commit, resume, full-rollback load), by the
`SidecarControl` servicer (the newest persistable slot), by the sidecar's verifier and
persister threads (`verify`, `persist`) and by the status. It only composes the slot jobs,
each in its own module over one shared `slot_table.SlotTable`:

- `allocation`: segments created, re-used and re-attached (`bandwidth`: fast-tier
  feasibility);
- `verification`: commits accepted, slots hashed and marked verified or rejected;
- `persistence`: a committed slot made durable under a pin (`persist_guard`: the overwrite
  check and the drills);
- `loading`: a checkpoint put into a slot for a full rollback or a resume from disk.

Who writes what. The trainer writes slots: it hides a slot (`Slot.invalidate`), copies, and
publishes the header last. The sidecar only reads them, except for the one slot it fills
from a checkpoint during a full rollback (the oldest unpinned one, while the trainer waits
for `PrepareFullRollback`). The sidecar alone writes the control block's slot-state lines
(verified, rejected, pinned, durable generation).

Never on the trainer's hot path: the trainer only waits for `commit` (one header read).
Hashing (xxh3, GIL released) and disk I/O run on the sidecar's own threads. The facade adds
no logic of its own: every rule lives in the module of its job.
"""

from __future__ import annotations

from pathlib import Path

from leyline import CheckpointRecord, CheckpointRejection
from leyline.shm import ControlBlock
from leyline.spec import RollbackSpec, SnapshotSpec
from leyline.v1.sidecar_pb2 import SlotInfo
from tolaria_sidecar.allocation import SlotAllocator
from tolaria_sidecar.config import Tuning
from tolaria_sidecar.loading import CheckpointLoader
from tolaria_sidecar.metrics import SidecarMetrics
from tolaria_sidecar.persist_guard import PersistGuard
from tolaria_sidecar.persistence import CheckpointWriter
from tolaria_sidecar.protocols import Clock, DurableStore, EventSink
from tolaria_sidecar.slot_table import SlotTable
from tolaria_sidecar.values import Feasibility, LoadedCheckpoint, SlotEntry
from tolaria_sidecar.verification import SlotChecker


class SlotManager:
    """The run's slots; see the module docstring. Thread-safe."""

    def __init__(
        self,
        *,
        run_id: str,
        instance_id: str,
        control: ControlBlock,
        lineage_id: str = "",
        resume: bool = False,
        directory: Path,
        snapshots: SnapshotSpec,
        rollback: RollbackSpec,
        tuning: Tuning,
        store: DurableStore,
        guard: PersistGuard,
        events: EventSink,
        metrics: SidecarMetrics,
        clock: Clock,
        copy_bytes_per_second: float | None = None,
    ) -> None:
        """`copy_bytes_per_second` skips the bandwidth measurement (tests)."""
        self.run_id = run_id
        self._table = SlotTable(
            instance_id=instance_id, control=control, directory=directory, metrics=metrics
        )
        self._allocator = SlotAllocator(
            table=self._table,
            instance_id=instance_id,
            directory=directory,
            snapshots=snapshots,
            rollback=rollback,
            tuning=tuning,
            metrics=metrics,
            copy_bytes_per_second=copy_bytes_per_second,
        )
        self._checker = SlotChecker(table=self._table, events=events, metrics=metrics)
        self._writer = CheckpointWriter(
            table=self._table,
            checker=self._checker,
            store=store,
            guard=guard,
            events=events,
            metrics=metrics,
            clock=clock,
        )
        self._loader = CheckpointLoader(
            table=self._table,
            store=store,
            clock=clock,
            instance_id=instance_id,
            lineage_id=lineage_id,
            resume=resume,
        )

    # -- allocation ---------------------------------------------------------------------------

    @property
    def feasibility(self) -> Feasibility | None:
        """Set by the first `attach`."""
        return self._allocator.feasibility

    @property
    def count(self) -> int:
        return self._table.count

    def restore(self) -> list[tuple[int, int]]:
        """See `SlotAllocator.restore`."""
        return self._allocator.restore()

    def attach(self, *, state_bytes: int, manifest_bytes: int) -> Feasibility:
        """See `SlotAllocator.attach`."""
        return self._allocator.attach(state_bytes=state_bytes, manifest_bytes=manifest_bytes)

    def close(self, *, unlink: bool) -> None:
        """See `SlotTable.close`."""
        self._table.close(unlink=unlink)

    # -- the table ----------------------------------------------------------------------------

    def infos(self) -> list[SlotInfo]:
        """Every slot, by index."""
        return self._table.infos()

    def table(self) -> list[SlotEntry]:
        """Committed slots, newest generation first (the LRU order)."""
        return self._table.entries()

    def committed_generation(self, index: int) -> int:
        """See `SlotTable.committed_generation`."""
        return self._table.committed_generation(index)

    def unverified(self) -> list[tuple[int, int]]:
        """Committed (index, generation) pairs neither verified nor rejected yet."""
        return self._table.unverified()

    def newest_persistable(self) -> SlotEntry | None:
        """The newest committed slot that is not rejected (for `RequestCheckpoint`)."""
        return self._table.newest_persistable()

    def resume_slot(self, layout_fingerprint: str) -> SlotInfo | None:
        """See `SlotTable.resume_slot`."""
        return self._table.resume_slot(layout_fingerprint)

    # -- commit, verification, persistence, loading -------------------------------------------

    def commit(self, index: int, generation: int) -> SlotInfo:
        """See `SlotChecker.commit`."""
        return self._checker.commit(index, generation)

    def verify(self, index: int, generation: int) -> bool | None:
        """See `SlotChecker.verify`."""
        return self._checker.verify(index, generation)

    def persist(self, index: int, generation: int) -> CheckpointRecord:
        """See `CheckpointWriter.persist`."""
        return self._writer.persist(index, generation)

    @property
    def last_rejections(self) -> list[CheckpointRejection]:
        """Checkpoints the last `load_checkpoint` refused, with why (for the report)."""
        return self._loader.last_rejections

    def accepts(
        self, record: CheckpointRecord, manifest_bytes: bytes, fingerprint: str
    ) -> str | None:
        """See `CheckpointLoader.accepts`."""
        return self._loader.accepts(record, manifest_bytes, fingerprint)

    def load_checkpoint(
        self, *, deadline_ns: int, max_step: int | None = None, layout_fingerprint: str = ""
    ) -> LoadedCheckpoint:
        """See `CheckpointLoader.load_checkpoint`."""
        return self._loader.load_checkpoint(
            deadline_ns=deadline_ns, max_step=max_step, layout_fingerprint=layout_fingerprint
        )
