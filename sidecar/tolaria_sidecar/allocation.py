"""Allocation of the run's slot segments in shared memory: sized from the state the trainer
declares, pre-faulted at creation, re-used when big enough, re-attached after a restart.

Called by `slots.SlotManager` at sidecar start-up (`restore`) and on the trainer's Attach
(`attach`). The sidecar creates the segments, so they outlive a trainer crash, and it never
truncates a valid slot that is big enough. A file at a slot's name that is not this
instance's segment is refused (`ForeignSegmentFound`), never mapped or removed (R13.1).
Never on the trainer's hot path, and never reads or writes slot data.
"""

from __future__ import annotations

import logging
from pathlib import Path

from leyline.shm import (
    PAGE,
    SLOT_FLAG_FROM_CHECKPOINT,
    ForeignSegment,
    ShmError,
    ShmFull,
    Slot,
    available_bytes,
    unlink_own,
)
from leyline.spec import RollbackSpec, SnapshotSpec
from tolaria_sidecar.bandwidth import assess, measure_copy_bandwidth
from tolaria_sidecar.config import Tuning
from tolaria_sidecar.errors import (
    ForeignSegmentFound,
    RequestInvalid,
    SharedMemoryFull,
    SlotBudgetTooSmall,
)
from tolaria_sidecar.metrics import SidecarMetrics
from tolaria_sidecar.slot_table import SlotTable
from tolaria_sidecar.values import Feasibility

logger = logging.getLogger(__name__)


def round_pages(nbytes: int) -> int:
    return -(-nbytes // PAGE) * PAGE


class SlotAllocator:
    """Creates, re-uses and re-attaches the slots of `table`; see the module docstring."""

    def __init__(
        self,
        *,
        table: SlotTable,
        instance_id: str,
        directory: Path,
        snapshots: SnapshotSpec,
        rollback: RollbackSpec,
        tuning: Tuning,
        metrics: SidecarMetrics,
        copy_bytes_per_second: float | None = None,
    ) -> None:
        """`copy_bytes_per_second` skips the bandwidth measurement (tests)."""
        self._table = table
        self._instance = instance_id
        self._directory = directory
        self._snapshots = snapshots
        self._rollback = rollback
        self._tuning = tuning
        self._metrics = metrics
        self._bandwidth = copy_bytes_per_second
        self.feasibility: Feasibility | None = None
        """Set by the first `attach`."""

    def restore(self) -> list[tuple[int, int]]:
        """Re-attaches the slots a previous sidecar left (start-up); returns the committed
        (index, generation) pairs that still need verification.

        Only a contiguous run of valid slots from index 0 is kept; an unreadable segment is
        left alone until `attach` recreates it. Pins left by a crashed persist are cleared:
        the sidecar is the only one that pins.
        """
        table, control = self._table, self._table.control
        with table.lock:
            for index in range(control.slot_count):
                path = table.path(index)
                if not path.exists():
                    break
                try:
                    slot = Slot.attach(path, instance_id=self._instance)
                except (ShmError, OSError) as err:
                    logger.warning("slot %d not re-attached (%s); recreated at attach", index, err)
                    break
                if slot.index != index:
                    logger.warning("%s says index %d; recreated at attach", path, slot.index)
                    slot.close()
                    break
                table.put(index, slot)
            for index in range(control.slot_count):
                if control.slot_state(index).pinned_generation:
                    control.set_pinned(index, 0)
            for entry in table.entries():
                if entry.flags & SLOT_FLAG_FROM_CHECKPOINT:
                    table.loaded_generation = max(table.loaded_generation, entry.generation)
            pending = table.unverified()
            if table.count:
                logger.info(
                    "re-attached %d slots (%d committed awaiting verification)",
                    table.count,
                    len(pending),
                )
            table.refresh_gauges()
            return pending

    def attach(self, *, state_bytes: int, manifest_bytes: int) -> Feasibility:
        """Creates, or re-uses when big enough and valid, the slots for `state_bytes`.

        Capacity = state × (1 + headroom) in pages; manifest region = max(minimum, factor ×
        estimate); N = `snapshots.slots` (1 when the fast tier is off: the full tier still
        needs a slot), lowered so N × slot size ≤ `snapshots.max_bytes` when set. New
        segments are pre-faulted; a re-created one gets a new inode, so stale mappings (the
        trainer's, a running persist's) stay valid. Raises `SlotBudgetTooSmall`.
        """
        if state_bytes <= 0:
            raise RequestInvalid("state_bytes", "must be > 0")
        table = self._table
        capacity = round_pages(int(state_bytes * (1.0 + self._snapshots.headroom_ratio)))
        manifest_capacity = round_pages(
            max(
                self._tuning.manifest_min_bytes,
                self._tuning.manifest_growth_factor * manifest_bytes,
            )
        )
        slot_bytes = Slot.size_for(capacity, manifest_capacity)
        count = self._snapshots.slots if self._snapshots.enabled else 1
        if self._snapshots.max_bytes:
            count = min(count, self._snapshots.max_bytes // slot_bytes)
            if count < 1:
                raise SlotBudgetTooSmall(self._snapshots.max_bytes, slot_bytes)
        count = min(count, table.control.slot_count)
        missing = sum(
            1
            for index in range(count)
            if (slot := table.get(index)) is None
            or slot.capacity < capacity
            or slot.manifest_capacity < manifest_capacity
        )
        free = available_bytes(self._directory)
        if missing and missing * slot_bytes > free:
            raise SharedMemoryFull(
                missing * slot_bytes,
                free,
                f"{self._directory} is too small for the fast tier: {missing} slot(s) of "
                f"{slot_bytes} B need {missing * slot_bytes} B "
                f"({missing * slot_bytes / 2**20:.1f} MiB), {free} B ({free / 2**20:.1f} MiB) "
                "are available; enlarge /dev/shm (docker --shm-size, the pod's shm "
                "sizeLimit) or lower spec.snapshots.slots or spec.snapshots.maxBytes",
            )
        with table.lock:
            created = 0
            for index in range(count):
                slot = table.get(index)
                if (
                    slot is not None
                    and slot.capacity >= capacity
                    and slot.manifest_capacity >= manifest_capacity
                ):
                    continue
                if slot is not None:
                    table.retire(index)
                path = table.path(index)
                table.clear_state(index)
                table.put(index, self._create(path, index, capacity, manifest_capacity))
                created += 1
            for index in sorted(i for i in table.slots() if i >= count):
                table.retire(index)
                self._unlink(table.path(index))
                table.clear_state(index)
            if self._bandwidth is None:
                self._bandwidth = measure_copy_bandwidth(self._tuning.bandwidth_probe_bytes)
            self.feasibility = assess(state_bytes, self._bandwidth, self._rollback, self._snapshots)
            self._metrics.fast_tier_feasible.set(1 if self.feasibility.fast_tier_feasible else 0)
            self._metrics.copy_bandwidth.set(self._bandwidth)
            table.refresh_gauges()
        logger.info(
            "attach: %d slots of %d B (%d created, %d re-used); fast tier %s at %.1f GB/s%s",
            count,
            slot_bytes,
            created,
            count - created,
            "feasible" if self.feasibility.fast_tier_feasible else "DEGRADED",
            self.feasibility.copy_gbps,
            f": {self.feasibility.degraded_reason}" if self.feasibility.degraded_reason else "",
        )
        return self.feasibility

    def _create(self, path: Path, index: int, capacity: int, manifest_capacity: int) -> Slot:
        """A new segment at `path`: our old one is unlinked first (a new inode, so old
        mappings keep the old bytes); anyone else's file there is refused, never removed."""
        self._unlink(path)
        try:
            return Slot.create(
                path, index, capacity, manifest_capacity, prefault=True, instance_id=self._instance
            )
        except ShmFull as err:
            raise SharedMemoryFull(err.needed_bytes, err.available_bytes, str(err)) from err
        except FileExistsError as err:
            raise ForeignSegmentFound(f"{path} appeared while it was being created") from err

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            unlink_own(path)
        except ForeignSegment as err:
            raise ForeignSegmentFound(str(err)) from err
