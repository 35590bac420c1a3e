"""Whether a slot may ever be restored: the trainer's commit is accepted from one header read,
then the slot is hashed in the background and marked verified or rejected (R6.2).

`SlotChecker.commit` is called on the `CommitSnapshot` servicer thread (the trainer waits for
it: one header read, nothing more); `verify` on the sidecar's verifier thread; `check` and
`reject` also by `persistence` for a generation the verifier has not reached yet. A rejected
generation is marked in the control block and never restored. The checker only reads slots
(xxh3 with the GIL released) and writes their state lines; it never writes slot bytes and
never touches disk.
"""

from __future__ import annotations

import logging

from google.protobuf.message import DecodeError

from leyline import Participant, SnapshotManifest, SnapshotRejection
from leyline.checksum import REGION_ALGORITHM, region_digest
from leyline.shm import Slot, SlotHeader, TornHeader
from leyline.v1.sidecar_pb2 import SlotInfo, SnapshotEvent
from tolaria_sidecar.errors import PreconditionFailed, RequestInvalid
from tolaria_sidecar.metrics import SidecarMetrics
from tolaria_sidecar.protocols import EventSink
from tolaria_sidecar.slot_table import SlotTable, read_header

logger = logging.getLogger(__name__)


def check(slot: Slot, header: SlotHeader) -> str | None:
    """Why the slot must not be restored, or None when its manifest parses and its data
    matches the header's checksum."""
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


class SlotChecker:
    """Accepts commits and verifies committed slots of `table`; see the module docstring."""

    def __init__(self, *, table: SlotTable, events: EventSink, metrics: SidecarMetrics) -> None:
        self._table = table
        self._events = events
        self._metrics = metrics

    def commit(self, index: int, generation: int) -> SlotInfo:
        """Accepts the trainer's commit when slot `index`'s header shows `generation`
        committed; raises `PreconditionFailed` naming `generation` otherwise. One header read."""
        if generation <= 0:
            raise RequestInvalid("generation", "must be > 0")
        slot = self._table.slot(index)
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
        loaded = self._table.loaded_generation
        if generation <= loaded:
            # Reusing a number the sidecar gave a loaded checkpoint would make this slot
            # look verified and durable from that checkpoint's state lines.
            raise PreconditionFailed(
                "generation",
                f"{generation} must be > {loaded}, the generation of the "
                "checkpoint loaded for the full rollback: number snapshots above it",
            )
        self._metrics.snapshot_committed()
        self._table.refresh_gauges()
        return self._table.describe(slot)

    def verify(self, index: int, generation: int) -> bool | None:
        """Checks a committed slot's manifest and data checksum (background thread).

        Returns True (verified: marked in the control block, `snapshot` event), False
        (rejected: marked, `snapshot_rejected` event) or None when the slot no longer holds
        `generation` (the trainer moved on; nothing is marked). The header is read again
        after hashing and the result discarded if it changed, because the trainer writes
        slots while the sidecar reads them.
        """
        slot = self._table.get(index)
        if slot is None:
            return None
        before = read_header(slot)
        if before is None or not before.visible or before.generation != generation:
            return None
        reason = check(slot, before)
        after = read_header(slot)
        if after != before:
            logger.debug("slot %d changed during verification; result discarded", index)
            return None
        if reason is None:
            self._table.control.set_verified(index, generation)
            self._metrics.snapshot_verified.inc()
            self._events.publish("snapshot", SnapshotEvent(slot=self._table.describe(slot)))
            self._table.refresh_gauges()
            return True
        self.reject(slot, before, reason)
        return False

    def reject(self, slot: Slot, header: SlotHeader, reason: str) -> None:
        """Marks `header`'s generation rejected (never restored) and reports why."""
        self._table.control.set_rejected(slot.index, header.generation)
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
        self._table.refresh_gauges()
        logger.error(
            "slot %d generation %d rejected: %s; it will never be restored",
            slot.index,
            header.generation,
            reason,
        )
