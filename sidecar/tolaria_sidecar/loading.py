"""Loading the newest durable checkpoint this instance may use into a slot, for a full rollback
or a crash resume from disk (R6.3, R13.1).

Called by `slots.SlotManager.load_checkpoint` on a `PrepareFullRollback` or `LoadCheckpoint`
servicer thread while the trainer waits, timed against the full-rollback deadline. The slot
it fills is the oldest unpinned one: the only slot the sidecar ever writes. Only this
instance's checkpoints are loaded implicitly, its lineage's too when the sidecar was asked to
resume, a checkpoint of another layout never; nothing is unpickled, and a checkpoint whose
bytes do not match its manifest is never published.
"""

from __future__ import annotations

import logging

from google.protobuf.message import DecodeError

from leyline import (
    CheckpointRecord,
    CheckpointRejection,
    RollbackPhase,
    RollbackPhaseTiming,
    SnapshotManifest,
)
from leyline.checksum import REGION_ALGORITHM, digest_bytes, digest_int, region_digest
from leyline.shm import SLOT_FLAG_EPOCH_BOUNDARY, SLOT_FLAG_FROM_CHECKPOINT
from tolaria_sidecar.errors import CheckpointLoadFailed, PreconditionFailed
from tolaria_sidecar.protocols import Clock, DurableStore
from tolaria_sidecar.slot_table import SlotTable, read_header
from tolaria_sidecar.values import LoadedCheckpoint

logger = logging.getLogger(__name__)


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


def _timing(
    phase: RollbackPhase.ValueType, start_ns: int, end_ns: int, deadline_ns: int
) -> RollbackPhaseTiming:
    budget = max(0, deadline_ns - start_ns)
    elapsed = end_ns - start_ns
    return RollbackPhaseTiming(
        phase=phase, elapsed_ns=elapsed, budget_ns=budget, within_budget=elapsed <= budget
    )


class CheckpointLoader:
    """Puts checkpoints of `store` into slots of `table`; see the module docstring."""

    def __init__(
        self,
        *,
        table: SlotTable,
        store: DurableStore,
        clock: Clock,
        instance_id: str,
        lineage_id: str = "",
        resume: bool = False,
    ) -> None:
        self._table = table
        self._store = store
        self._clock = clock
        self._instance = instance_id
        self._lineage = lineage_id or instance_id
        self._resume = resume
        self.last_rejections: list[CheckpointRejection] = []
        """Checkpoints the last `load_checkpoint` refused, with why (for the report)."""

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
        table, control = self._table, self._table.control
        with table.lock:
            slots = table.slots()
            if not slots:
                raise PreconditionFailed("slot", "no slots exist yet: Attach first")
            candidates = []
            for slot in slots.values():
                header = read_header(slot)
                generation = header.generation if header is not None and header.visible else 0
                if generation and control.slot_state(slot.index).pinned_generation == generation:
                    continue
                candidates.append((generation, slot.index, slot))
            if not candidates:
                raise CheckpointLoadFailed("every slot is pinned by a checkpoint write")
            slot = min(candidates)[2]
            newest = table.newest_generation()
        slot.invalidate()
        table.clear_state(slot.index)
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
        control.set_verified(slot.index, generation)
        control.set_durable(slot.index, generation)
        table.loaded_generation = max(table.loaded_generation, generation)
        verified = self._clock.now_ns()
        phases.append(_timing(RollbackPhase.ROLLBACK_PHASE_VERIFY, loaded, verified, deadline_ns))
        table.refresh_gauges()
        logger.warning(
            "full rollback: %s (epoch %d, step %d) loaded into slot %d as generation %d in %.0f ms",
            record.file_name,
            record.epoch,
            record.global_step,
            slot.index,
            generation,
            (verified - start) / 1e6,
        )
        return LoadedCheckpoint(table.describe(slot), record, phases, self.last_rejections)
