"""The snapshot slots the sidecar owns: allocation, the committed-slot table, background
verification, durable persistence and checkpoint loads (R6.1, R6.2, R6.3).

Called by the `TrainerLink` servicer (attach, commit, resume, full-rollback load) and by the
sidecar's verifier and persister threads (`verify`, `persist`). The sidecar creates and
pre-faults the segments, so they outlive a trainer crash; it re-attaches them when it
restarts itself and never truncates a valid slot that is big enough.

Who writes what. The trainer writes slots: it hides a slot (`Slot.invalidate`), copies, and
publishes the header last. The sidecar only reads them, except for the one slot it fills
from a checkpoint during a full rollback (the oldest unpinned one, while the trainer waits
for `PrepareFullRollback`). The sidecar alone writes the control block's slot-state lines
(verified, rejected, pinned, durable generation).

Pin contract. While `ControlBlock.slot_state(i).pinned_generation` equals the generation
slot `i` holds, the trainer must not invalidate or overwrite slot `i`; it picks another one.
The sidecar pins a generation for the duration of one durable write and unpins it after. A
trainer that overwrites a pinned slot anyway is caught: the generation is checked again right
after the data is copied to the checkpoint file (`PersistGuard`), and a changed slot makes
the store abandon the write (WAL ABORT), reported as `checkpoint_failed` "overwritten during
persist"; the previous checkpoint stays the latest.

Never on the trainer's hot path: the trainer only waits for `commit` (one header read).
Hashing (xxh3, GIL released) and disk I/O run on the sidecar's own threads.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from google.protobuf.message import DecodeError

from leyline import (
    CheckpointFailure,
    CheckpointRecord,
    CheckpointRejection,
    Participant,
    RollbackPhase,
    RollbackPhaseTiming,
    SnapshotManifest,
    SnapshotRejection,
)
from leyline.checksum import REGION_ALGORITHM, digest_bytes, digest_int, region_digest
from leyline.shm import (
    PAGE,
    SLOT_FLAG_EPOCH_BOUNDARY,
    SLOT_FLAG_FROM_CHECKPOINT,
    ControlBlock,
    ForeignSegment,
    ShmError,
    ShmFull,
    Slot,
    SlotHeader,
    TornHeader,
    available_bytes,
    slot_name,
    unlink_own,
)
from leyline.spec import RollbackSpec, SnapshotSpec
from leyline.v1.resilience_pb2 import CheckpointOutcome, SlotCondition
from leyline.v1.sidecar_pb2 import SlotInfo, SnapshotEvent
from tolaria_sidecar.checkpoints import WRITE_POINTS as CHECKPOINT_WRITE_POINTS
from tolaria_sidecar.config import CORRUPT_CHECKPOINT, SLOW_CHECKPOINT, CheckpointDrill, Tuning
from tolaria_sidecar.errors import (
    CheckpointLoadFailed,
    CheckpointWriteFailed,
    ForeignSegmentFound,
    PersistFailed,
    PreconditionFailed,
    RequestInvalid,
    SharedMemoryFull,
    SlotBudgetTooSmall,
)
from tolaria_sidecar.faults import Faults
from tolaria_sidecar.metrics import SidecarMetrics
from tolaria_sidecar.protocols import Clock, DurableStore, EventSink

logger = logging.getLogger(__name__)

AFTER_COPY_POINT = "checkpoint.after_data_write"
"""The store's write point right after the data is copied into the file: where the slot's
generation is checked again before anything is made durable."""
DAMAGE_POINT = "checkpoint.after_dir_fsync"
"""Where the corrupt-checkpoint drill damages the file: renamed and durable, not yet committed
in the WAL, so no load can see it whole."""
for _point in (AFTER_COPY_POINT, DAMAGE_POINT):
    if _point not in CHECKPOINT_WRITE_POINTS:
        raise ImportError(f"checkpoints.WRITE_POINTS no longer has {_point!r}")


def round_pages(nbytes: int) -> int:
    return -(-nbytes // PAGE) * PAGE


# -- copy bandwidth and feasibility -----------------------------------------------------------


def measure_copy_bandwidth(nbytes: int, repeats: int = 3) -> float:
    """Bytes per second of one memcpy between two pre-faulted anonymous buffers (best of
    `repeats`, so one preempted copy on a busy machine does not condemn the fast tier)."""
    src = mmap.mmap(-1, nbytes)
    dst = mmap.mmap(-1, nbytes)
    try:
        for buf, fill in ((src, 0x5A), (dst, 0)):
            anchor = ctypes.c_char.from_buffer(buf)
            ctypes.memset(ctypes.addressof(anchor), fill, nbytes)  # faults every page in
            del anchor
        best_ns = 0
        with memoryview(src) as s, memoryview(dst) as d:
            for _ in range(repeats):
                start = time.perf_counter_ns()
                d[:] = s
                elapsed = max(1, time.perf_counter_ns() - start)
                best_ns = elapsed if best_ns == 0 else min(best_ns, elapsed)
        return nbytes / (best_ns / 1e9)
    finally:
        src.close()
        dst.close()


@dataclass(frozen=True)
class Feasibility:
    """Whether the fast tier can copy the state within its commit budget (R6.1)."""

    fast_tier_feasible: bool
    degraded_reason: str
    copy_bytes_per_second: float

    @property
    def copy_gbps(self) -> float:
        return self.copy_bytes_per_second / 1e9


def assess(
    state_bytes: int, copy_bytes_per_second: float, rollback: RollbackSpec, snapshots: SnapshotSpec
) -> Feasibility:
    """`state_bytes / bandwidth <= rollback.commit_ms` -> feasible; else the reason, in numbers."""
    if not snapshots.enabled:
        return Feasibility(False, "spec.snapshots.enabled is false", copy_bytes_per_second)
    needs_ms = state_bytes / copy_bytes_per_second * 1e3
    if needs_ms <= rollback.commit_ms:
        return Feasibility(True, "", copy_bytes_per_second)
    reason = (
        f"{state_bytes / 1e9:.2f} GB at {copy_bytes_per_second / 1e9:.1f} GB/s needs "
        f"{needs_ms:.0f} ms > {rollback.commit_ms:g} ms commit budget"
    )
    return Feasibility(False, reason, copy_bytes_per_second)


# -- the store's Faults, with the overwrite check ---------------------------------------------


class _Overwritten(OSError):
    """Raised inside the store's write so that it abandons the checkpoint (WAL ABORT)."""


class PersistGuard(Faults):
    """The `Faults` handed to the `DurableStore`: runs the slot manager's overwrite check at
    `AFTER_COPY_POINT`, arms the `checkpoint-io-error@epoch=N` drills and runs the
    `slow-checkpoint@epoch=N` and `corrupt-checkpoint@epoch=N` ones (on the persister thread,
    never a servicer's)."""

    def __init__(
        self, drills: Sequence[CheckpointDrill] = (), directory: Path | None = None
    ) -> None:
        """`directory`: where the checkpoint files are (for `corrupt-checkpoint`)."""
        super().__init__()
        self._drills = tuple(drills)
        self._directory = directory
        self._check: Callable[[], None] | None = None
        self._damage_epoch: int | None = None
        self.drills_armed: list[CheckpointDrill] = []

    def hit(self, point: str) -> None:
        if point == AFTER_COPY_POINT and self._check is not None:
            self._check()
        if point == DAMAGE_POINT and self._damage_epoch is not None:
            self._damage(self._damage_epoch)
            self._damage_epoch = None
        super().hit(point)

    @contextmanager
    def guarding(self, check: Callable[[], None], *, epoch: int) -> Iterator[None]:
        """Runs `check` after the copy of the write made inside the block; arms the drills
        of `epoch`."""
        for drill in self._drills:
            if drill.epoch == epoch and drill.name == CORRUPT_CHECKPOINT:
                self.drills_armed.append(drill)
                self._damage_epoch = epoch
            elif drill.epoch == epoch and drill.name == SLOW_CHECKPOINT:
                self.drills_armed.append(drill)
                logger.warning("drill %s: checkpoint write waits %.1f s", drill.raw, drill.seconds)
                time.sleep(drill.seconds)
            elif drill.epoch == epoch:
                self.drills_armed.append(drill)
                self.fail_at(
                    AFTER_COPY_POINT,
                    OSError(errno.ENOSPC, f"{drill.raw}: injected {errno.errorcode[errno.ENOSPC]}"),
                )
        self._check = check
        try:
            yield
        finally:
            self._check = None
            self._damage_epoch = None
            self._fail.pop(AFTER_COPY_POINT, None)  # a drill the write never reached

    def _damage(self, epoch: int) -> None:
        """The `corrupt-checkpoint` drill: flips bytes at the end of the file just written for
        `epoch` (its data), after its rename and before its WAL commit, as bit rot would; the
        checkpoint commits, and a load rejects it by its checksum."""
        if self._directory is None:
            return
        written = sorted(self._directory.glob(f"ckpt-*-e{epoch}.bin"))
        if not written:
            return
        path = written[-1]  # the highest sequence: this write's
        with path.open("r+b") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - 64))
            damaged = bytes(b ^ 0xFF for b in f.read(4))
            f.seek(max(0, size - 64))
            f.write(damaged)
        logger.warning("drill corrupt-checkpoint@epoch=%d: damaged %s", epoch, path.name)


# -- the slot table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotEntry:
    """One committed slot as the table shows it (newest generation first)."""

    index: int
    generation: int
    global_step: int
    epoch: int
    flags: int
    committed_ns: int
    verified: bool
    rejected: bool
    durable: bool
    pinned: bool


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint put into a slot for a full rollback."""

    slot: SlotInfo
    record: CheckpointRecord
    phases: list[RollbackPhaseTiming]
    rejections: list[CheckpointRejection]


def rejections_of(store: DurableStore) -> list[CheckpointRejection]:
    """The store's last refusals as Leyline messages, newest checkpoint first."""
    out = []
    for record, why in store.last_rejections:
        rejection = CheckpointRejection(
            file_name=record.file_name,
            global_step=record.global_step,
            epoch=record.epoch,
            reason=why if isinstance(why, str) else str(why),
            instance_id=record.instance_id,
        )
        rejection.at.GetCurrentTime()
        out.append(rejection)
    return out


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
        self._run_id = run_id
        self._instance = instance_id
        self._lineage = lineage_id or instance_id
        self._resume = resume
        self.last_rejections: list[CheckpointRejection] = []
        """Checkpoints the last `load_checkpoint` refused, with why (for the report)."""
        self._control = control
        self._directory = directory
        self._snapshots = snapshots
        self._rollback = rollback
        self._tuning = tuning
        self._store = store
        self._guard = guard
        self._events = events
        self._metrics = metrics
        self._clock = clock
        self._bandwidth = copy_bytes_per_second
        self._lock = threading.RLock()
        self._slots: dict[int, Slot] = {}
        self._retired: list[Slot] = []
        self.feasibility: Feasibility | None = None
        """Set by the first `attach`."""
        self._loaded_generation = 0
        """The newest generation the sidecar published itself (a checkpoint load); the
        trainer's next commits must number above it."""

    # -- allocation ---------------------------------------------------------------------------

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._slots)

    def _path(self, index: int) -> Path:
        return self._directory / slot_name(self._instance, index)

    def restore(self) -> list[tuple[int, int]]:
        """Re-attaches the slots a previous sidecar left (start-up); returns the committed
        (index, generation) pairs that still need verification.

        Only a contiguous run of valid slots from index 0 is kept; an unreadable segment is
        left alone until `attach` recreates it. Pins left by a crashed persist are cleared:
        the sidecar is the only one that pins.
        """
        with self._lock:
            for index in range(self._control.slot_count):
                path = self._path(index)
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
                self._slots[index] = slot
            for index in range(self._control.slot_count):
                if self._control.slot_state(index).pinned_generation:
                    self._control.set_pinned(index, 0)
            for entry in self.table():
                if entry.flags & SLOT_FLAG_FROM_CHECKPOINT:
                    self._loaded_generation = max(self._loaded_generation, entry.generation)
            pending = self.unverified()
            if self._slots:
                logger.info(
                    "re-attached %d slots (%d committed awaiting verification)",
                    len(self._slots),
                    len(pending),
                )
            self._refresh_gauges()
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
        count = min(count, self._control.slot_count)
        missing = sum(
            1
            for index in range(count)
            if (slot := self._slots.get(index)) is None
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
        with self._lock:
            created = 0
            for index in range(count):
                slot = self._slots.get(index)
                if (
                    slot is not None
                    and slot.capacity >= capacity
                    and slot.manifest_capacity >= manifest_capacity
                ):
                    continue
                if slot is not None:
                    self._retire(index)
                path = self._path(index)
                self._clear_state(index)
                self._slots[index] = self._create(path, index, capacity, manifest_capacity)
                created += 1
            for index in sorted(i for i in self._slots if i >= count):
                self._retire(index)
                self._unlink(self._path(index))
                self._clear_state(index)
            if self._bandwidth is None:
                self._bandwidth = measure_copy_bandwidth(self._tuning.bandwidth_probe_bytes)
            self.feasibility = assess(state_bytes, self._bandwidth, self._rollback, self._snapshots)
            self._metrics.fast_tier_feasible.set(1 if self.feasibility.fast_tier_feasible else 0)
            self._metrics.copy_bandwidth.set(self._bandwidth)
            self._refresh_gauges()
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

    def _retire(self, index: int) -> None:
        slot = self._slots.pop(index)
        self._retired.append(slot)

    def _clear_state(self, index: int) -> None:
        if index < self._control.slot_count:
            self._control.set_verified(index, 0)
            self._control.set_rejected(index, 0)
            self._control.set_pinned(index, 0)
            self._control.set_durable(index, 0)

    def close(self, *, unlink: bool) -> None:
        """Unmaps every slot; `unlink` also removes the segments (local mode cleanup)."""
        with self._lock:
            for slot in [*self._slots.values(), *self._retired]:
                slot.close()
                if unlink:
                    slot.seg.unlink()
            self._slots.clear()
            self._retired.clear()

    # -- the table ----------------------------------------------------------------------------

    def _slot(self, index: int, field: str = "slot") -> Slot:
        with self._lock:
            if not self._slots:
                raise PreconditionFailed(field, "no slots exist yet: Attach first")
            slot = self._slots.get(index)
            if slot is None:
                raise RequestInvalid(field, f"must be 0..{len(self._slots) - 1}, got {index}")
            return slot

    @staticmethod
    def _header(slot: Slot) -> SlotHeader | None:
        try:
            return slot.header()
        except TornHeader:
            return None  # being written right now: as good as empty

    def _describe(self, slot: Slot) -> SlotInfo:
        header = self._header(slot)
        info = SlotInfo(
            index=slot.index,
            shm_name=slot.seg.path.name,
            capacity_bytes=slot.capacity,
            condition=SlotCondition.SLOT_CONDITION_EMPTY,
        )
        if header is None or not header.visible:
            return info
        state = self._control.slot_state(slot.index)
        generation = header.generation
        info.generation = generation
        info.global_step = header.global_step
        info.epoch = header.epoch
        info.committed = True
        info.durable = state.durable_generation == generation
        if state.pinned_generation == generation:
            info.condition = SlotCondition.SLOT_CONDITION_PINNED
        elif state.rejected_generation == generation:
            info.condition = SlotCondition.SLOT_CONDITION_REJECTED
        elif state.verified_generation == generation:
            info.condition = SlotCondition.SLOT_CONDITION_VERIFIED
        else:
            info.condition = SlotCondition.SLOT_CONDITION_COMMITTED
        return info

    def infos(self) -> list[SlotInfo]:
        """Every slot, by index."""
        with self._lock:
            slots = [self._slots[i] for i in sorted(self._slots)]
        return [self._describe(s) for s in slots]

    def table(self) -> list[SlotEntry]:
        """Committed slots, newest generation first (the LRU order), read from the headers."""
        with self._lock:
            slots = list(self._slots.values())
        entries = []
        for slot in slots:
            header = self._header(slot)
            if header is None or not header.visible:
                continue
            state = self._control.slot_state(slot.index)
            g = header.generation
            entries.append(
                SlotEntry(
                    index=slot.index,
                    generation=g,
                    global_step=header.global_step,
                    epoch=header.epoch,
                    flags=header.flags,
                    committed_ns=header.committed_ns,
                    verified=state.verified_generation == g,
                    rejected=state.rejected_generation == g,
                    durable=state.durable_generation == g,
                    pinned=state.pinned_generation == g,
                )
            )
        return sorted(entries, key=lambda e: e.generation, reverse=True)

    def committed_generation(self, index: int) -> int:
        """The generation slot `index` holds committed now (0: none); validates `index`."""
        header = self._header(self._slot(index))
        return header.generation if header is not None and header.visible else 0

    def unverified(self) -> list[tuple[int, int]]:
        """Committed (index, generation) pairs neither verified nor rejected yet."""
        return [(e.index, e.generation) for e in self.table() if not (e.verified or e.rejected)]

    def newest_persistable(self) -> SlotEntry | None:
        """The newest committed slot that is not rejected (for `RequestCheckpoint`)."""
        return next((e for e in self.table() if not e.rejected), None)

    def _refresh_gauges(self) -> None:
        counts: dict[int, int] = {}
        for info in self.infos():
            counts[info.condition] = counts.get(info.condition, 0) + 1
        self._metrics.set_slots(counts)

    # -- commit and verification --------------------------------------------------------------

    def commit(self, index: int, generation: int) -> SlotInfo:
        """Accepts the trainer's commit when slot `index`'s header shows `generation`
        committed; raises `PreconditionFailed` naming `generation` otherwise. One header read."""
        if generation <= 0:
            raise RequestInvalid("generation", "must be > 0")
        slot = self._slot(index)
        try:
            header = slot.header()
        except TornHeader as err:
            raise PreconditionFailed(
                "generation", f"slot {index}: header unreadable: {err}"
            ) from err
        if not header.visible or header.generation != generation:
            raise PreconditionFailed(
                "generation",
                f"slot {index} header shows generation {header.generation} "
                f"(committed={header.committed}), not {generation}",
            )
        if generation <= self._loaded_generation:
            # Reusing a number the sidecar gave a loaded checkpoint would make this slot
            # look verified and durable from that checkpoint's state lines.
            raise PreconditionFailed(
                "generation",
                f"{generation} must be > {self._loaded_generation}, the generation of the "
                "checkpoint loaded for the full rollback: number snapshots above it",
            )
        self._metrics.snapshot_commits.inc()
        self._refresh_gauges()
        return self._describe(slot)

    def verify(self, index: int, generation: int) -> bool | None:
        """Checks a committed slot's manifest and data checksum (background thread).

        Returns True (verified: marked in the control block, `snapshot` event), False
        (rejected: marked, `snapshot_rejected` event) or None when the slot no longer holds
        `generation` (the trainer moved on; nothing is marked). The header is read again
        after hashing and the result discarded if it changed, because the trainer writes
        slots while the sidecar reads them.
        """
        with self._lock:
            slot = self._slots.get(index)
        if slot is None:
            return None
        before = self._header(slot)
        if before is None or not before.visible or before.generation != generation:
            return None
        reason = self._check(slot, before)
        after = self._header(slot)
        if after != before:
            logger.debug("slot %d changed during verification; result discarded", index)
            return None
        if reason is None:
            self._control.set_verified(index, generation)
            self._metrics.snapshot_verified.inc()
            self._events.publish("snapshot", SnapshotEvent(slot=self._describe(slot)))
            self._refresh_gauges()
            return True
        self._reject(slot, before, reason)
        return False

    def _check(self, slot: Slot, header: SlotHeader) -> str | None:
        """Why the slot must not be restored, or None when it verifies."""
        if header.checksum_algorithm != REGION_ALGORITHM:
            return (
                f"checksum algorithm {header.checksum_algorithm} is not the chunked xxh3-64 "
                f"({REGION_ALGORITHM})"
            )
        try:
            manifest = SnapshotManifest.FromString(slot.manifest_bytes(header))
        except TornHeader as err:
            return str(err)
        except DecodeError as err:
            return f"manifest does not parse: {err}"
        if manifest.data_bytes and manifest.data_bytes != header.data_length:
            return f"manifest data_bytes {manifest.data_bytes} != header {header.data_length}"
        found = region_digest(slot.data[: header.data_length])
        if found != header.data_checksum:
            return f"data checksum {found:#018x} != header {header.data_checksum:#018x}"
        return None

    def _reject(self, slot: Slot, header: SlotHeader, reason: str) -> None:
        self._control.set_rejected(slot.index, header.generation)
        self._metrics.snapshot_rejections.inc()
        rejection = SnapshotRejection(
            slot=slot.index,
            generation=header.generation,
            reason=reason,
            detected_by=Participant.PARTICIPANT_SIDECAR,
            global_step=header.global_step,
        )
        rejection.at.GetCurrentTime()
        self._events.publish("snapshot_rejected", rejection)
        self._refresh_gauges()
        logger.error(
            "slot %d generation %d rejected: %s; it will never be restored",
            slot.index,
            header.generation,
            reason,
        )

    # -- crash resume -------------------------------------------------------------------------

    def resume_slot(self, layout_fingerprint: str) -> SlotInfo | None:
        """The newest committed, non-rejected slot whose manifest has `layout_fingerprint`."""
        with self._lock:
            slots = dict(self._slots)
        for entry in self.table():
            if entry.rejected:
                continue
            slot = slots[entry.index]
            header = self._header(slot)
            if header is None or header.generation != entry.generation:
                continue
            try:
                manifest = SnapshotManifest.FromString(slot.manifest_bytes(header))
            except (TornHeader, DecodeError) as err:
                logger.warning("slot %d skipped for resume: %s", entry.index, err)
                continue
            if manifest.layout_fingerprint == layout_fingerprint:
                return self._describe(slot)
        return None

    # -- persistence --------------------------------------------------------------------------

    def persist(self, index: int, generation: int) -> CheckpointRecord:
        """Makes slot `index`'s `generation` durable (persister thread; seconds).

        Pins the generation, verifies it if the verifier has not yet, hands header fields,
        manifest and the slot's data view straight to `DurableStore.write`, unpins. Emits
        `checkpoint` or `checkpoint_failed` and raises `PersistFailed` on failure; the
        previous checkpoint then stays the latest.
        """
        start = self._clock.now_ns()
        slot = self._slot(index)
        header = self._header(slot)
        if header is None or not header.visible or header.generation != generation:
            found = "nothing committed" if header is None else f"generation {header.generation}"
            self._persist_failed(
                slot,
                header,
                generation,
                f"slot holds {found} now",
                CheckpointOutcome.CHECKPOINT_OUTCOME_FAILED,
            )
        state = self._control.slot_state(index)
        if state.rejected_generation == generation:
            self._persist_failed(
                slot,
                header,
                generation,
                "rejected by verification",
                CheckpointOutcome.CHECKPOINT_OUTCOME_FAILED,
            )
        self._control.set_pinned(index, generation)
        self._refresh_gauges()
        try:
            if self._header(slot) != header:
                self._persist_failed(
                    slot,
                    header,
                    generation,
                    "overwritten before the pin took hold",
                    CheckpointOutcome.CHECKPOINT_OUTCOME_DISCARDED,
                )
            if state.verified_generation != generation:
                reason = self._check(slot, header)
                if reason is not None:
                    self._reject(slot, header, reason)
                    self._persist_failed(
                        slot,
                        header,
                        generation,
                        reason,
                        CheckpointOutcome.CHECKPOINT_OUTCOME_FAILED,
                    )
                self._control.set_verified(index, generation)
            manifest = slot.manifest_bytes(header)

            def still_there() -> None:
                if self._header(slot) != header:
                    raise _Overwritten(errno.ESTALE, "overwritten during persist")

            try:
                with self._guard.guarding(still_there, epoch=header.epoch):
                    record = self._store.write(
                        manifest=manifest,
                        data=slot.data[: header.data_length],
                        epoch=header.epoch,
                        global_step=header.global_step,
                        snapshot_generation=generation,
                        manifest_digest=_digest_of(manifest),
                    )
            except CheckpointWriteFailed as err:
                overwritten = isinstance(err.__cause__, _Overwritten)
                reason = "overwritten during persist" if overwritten else err.failure.error
                outcome = (
                    CheckpointOutcome.CHECKPOINT_OUTCOME_DISCARDED
                    if overwritten
                    else CheckpointOutcome.CHECKPOINT_OUTCOME_FAILED
                )
                self._persist_failed(slot, header, generation, reason, outcome, cause=err)
            except OSError as err:
                self._persist_failed(
                    slot,
                    header,
                    generation,
                    f"{type(err).__name__}: {err}",
                    CheckpointOutcome.CHECKPOINT_OUTCOME_FAILED,
                    cause=err,
                )
            self._control.set_durable(index, generation)
        finally:
            self._control.set_pinned(index, 0)
            self._refresh_gauges()
        elapsed_s = (self._clock.now_ns() - start) / 1e9
        self._metrics.checkpoint_writes.labels(
            CheckpointOutcome.Name(CheckpointOutcome.CHECKPOINT_OUTCOME_COMMITTED)
        ).inc()
        self._metrics.checkpoint_seconds.observe(elapsed_s)
        self._metrics.checkpoint_bytes.inc(len(manifest) + header.data_length)
        self._events.publish("checkpoint", record)
        logger.info(
            "slot %d generation %d (epoch %d, step %d) durable as %s in %.2f s",
            index,
            generation,
            header.epoch,
            header.global_step,
            record.file_name,
            elapsed_s,
        )
        return record

    def _persist_failed(
        self,
        slot: Slot,
        header: SlotHeader | None,
        generation: int,
        reason: str,
        outcome: CheckpointOutcome.ValueType,
        cause: BaseException | None = None,
    ) -> NoReturn:
        self._metrics.checkpoint_writes.labels(CheckpointOutcome.Name(outcome)).inc()
        failure = CheckpointFailure(
            epoch=header.epoch if header else 0,
            global_step=header.global_step if header else 0,
            error=f"slot {slot.index} generation {generation}: {reason}",
            snapshot_generation=generation,
        )
        failure.at.GetCurrentTime()
        self._events.publish("checkpoint_failed", failure)
        logger.error("checkpoint not written: %s", failure.error)
        raise PersistFailed(slot.index, generation, reason) from cause

    # -- full rollback ------------------------------------------------------------------------

    def accepts(
        self, record: CheckpointRecord, manifest_bytes: bytes, fingerprint: str
    ) -> str | None:
        """Why the durable tier must not load this checkpoint, or None (R13.1).

        Only this instance's checkpoints are loaded implicitly; its lineage's too when the
        sidecar was asked to resume; a checkpoint of another layout never.
        """
        try:
            manifest = SnapshotManifest.FromString(manifest_bytes)
        except DecodeError as err:
            return f"manifest does not parse: {err}"
        instance = manifest.instance_id or record.instance_id
        lineage = manifest.lineage_id or record.lineage_id
        if instance != self._instance and not (self._resume and lineage == self._lineage):
            whose = f"instance {instance!r}" if instance else "an instance without an id"
            allowed = (
                f"this instance {self._instance!r} or lineage {self._lineage!r}"
                if self._resume
                else f"this instance {self._instance!r} (resume to use others)"
            )
            return f"written by {whose} of lineage {lineage!r}; only {allowed} may be loaded"
        if fingerprint and manifest.layout_fingerprint != fingerprint:
            return f"layout {manifest.layout_fingerprint} != this run's {fingerprint}"
        return None

    def load_checkpoint(
        self, *, deadline_ns: int, max_step: int | None = None, layout_fingerprint: str = ""
    ) -> LoadedCheckpoint:
        """Loads the newest valid checkpoint this instance may use (`accepts`), at or below
        `max_step` when given, into the oldest unpinned slot (full rollback, crash resume).

        Phases LOAD (file -> slot, every byte checked by the store) and VERIFY (xxh3 of the
        slot against the manifest), each timed against the time left until `deadline_ns`.
        Publishes the slot with generation max+1 and `SLOT_FLAG_FROM_CHECKPOINT`; the
        manifest's `generation` is rewritten to it (the original is the record's
        `snapshot_generation`). Raises `NoCheckpoint` (from the store), `BufferTooSmall`, or
        `CheckpointLoadFailed` (also when nothing was ever committed; then no slot is touched);
        after a failed load the picked slot is left empty.
        """
        if self._store.latest() is None:  # keep every snapshot when there is nothing to load
            raise CheckpointLoadFailed("no restorable checkpoint: none committed yet")
        with self._lock:
            if not self._slots:
                raise PreconditionFailed("slot", "no slots exist yet: Attach first")
            candidates = []
            for slot in self._slots.values():
                header = self._header(slot)
                generation = header.generation if header is not None and header.visible else 0
                if (
                    generation
                    and self._control.slot_state(slot.index).pinned_generation == generation
                ):
                    continue
                candidates.append((generation, slot.index, slot))
            if not candidates:
                raise CheckpointLoadFailed("every slot is pinned by a checkpoint write")
            slot = min(candidates)[2]
            newest = max(
                [
                    *(self._generation_of(s) for s in self._slots.values()),
                    *(self._max_state_generation(i) for i in self._slots),
                ]
            )
        slot.invalidate()
        self._clear_state(slot.index)
        phases: list[RollbackPhaseTiming] = []
        start = self._clock.now_ns()
        try:
            record, manifest_bytes, length = self._store.load_latest(
                slot.data,
                accept=lambda r, m: self.accepts(r, m, layout_fingerprint),
                max_step=max_step,
            )
        finally:
            self.last_rejections = rejections_of(self._store)
        loaded = self._clock.now_ns()
        phases.append(_timing(RollbackPhase.ROLLBACK_PHASE_LOAD, start, loaded, deadline_ns))
        try:
            manifest = SnapshotManifest.FromString(manifest_bytes)
        except DecodeError as err:
            raise CheckpointLoadFailed(
                f"{record.file_name}: manifest does not parse: {err}"
            ) from err
        # The manifest names the algorithm its checksum was made with (files written before
        # the chunked digest carry plain xxh3-64); the slot header always gets the chunked one.
        algorithm = manifest.checksum_algorithm or REGION_ALGORITHM
        try:
            checked = region_digest(slot.data[:length], algorithm)
        except ValueError as err:
            raise CheckpointLoadFailed(f"{record.file_name}: manifest {err}") from err
        if manifest.checksum and checked != digest_int(manifest.checksum):
            raise CheckpointLoadFailed(
                f"{record.file_name}: data checksum {checked:#018x} != manifest "
                f"{digest_int(manifest.checksum):#018x}"
            )
        found = checked if algorithm == REGION_ALGORITHM else region_digest(slot.data[:length])
        manifest.checksum_algorithm = REGION_ALGORITHM
        manifest.checksum = digest_bytes(found)
        generation = newest + 1
        manifest.generation = generation
        flags = SLOT_FLAG_FROM_CHECKPOINT | (
            SLOT_FLAG_EPOCH_BOUNDARY if manifest.epoch_boundary else 0
        )
        slot.publish(
            generation=generation,
            manifest=manifest.SerializeToString(),
            data_length=length,
            data_checksum=found,
            checksum_algorithm=REGION_ALGORITHM,
            global_step=record.global_step,
            epoch=record.epoch,
            flags=flags,
        )
        self._control.set_verified(slot.index, generation)
        self._control.set_durable(slot.index, generation)
        self._loaded_generation = max(self._loaded_generation, generation)
        verified = self._clock.now_ns()
        phases.append(_timing(RollbackPhase.ROLLBACK_PHASE_VERIFY, loaded, verified, deadline_ns))
        self._refresh_gauges()
        logger.warning(
            "full rollback: %s (epoch %d, step %d) loaded into slot %d as generation %d in %.0f ms",
            record.file_name,
            record.epoch,
            record.global_step,
            slot.index,
            generation,
            (verified - start) / 1e6,
        )
        return LoadedCheckpoint(self._describe(slot), record, phases, self.last_rejections)

    def _generation_of(self, slot: Slot) -> int:
        header = self._header(slot)
        return header.generation if header is not None else 0

    def _max_state_generation(self, index: int) -> int:
        s = self._control.slot_state(index)
        return max(s.verified_generation, s.rejected_generation, s.durable_generation)


def _digest_of(manifest: bytes) -> str:
    """The manifest's training-spec digest, recorded in the checkpoint's WAL record."""
    try:
        return SnapshotManifest.FromString(manifest).manifest_digest
    except DecodeError:
        return ""


def _timing(
    phase: RollbackPhase.ValueType, start_ns: int, end_ns: int, deadline_ns: int
) -> RollbackPhaseTiming:
    budget = max(0, deadline_ns - start_ns)
    elapsed = end_ns - start_ns
    return RollbackPhaseTiming(
        phase=phase, elapsed_ns=elapsed, budget_ns=budget, within_budget=elapsed <= budget
    )
