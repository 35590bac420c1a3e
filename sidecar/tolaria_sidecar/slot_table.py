"""The table of the run's slot segments: which slots exist, what each header shows committed,
and the control block's state line of each (verified, rejected, pinned, durable).

Shared by every slot job (`allocation` fills it, `verification`, `persistence` and
`loading` read it and mark state lines) and read through `slots.SlotManager` by the
servicers and the status. Reading is all it does to a slot: it never writes slot bytes or a
header (the trainer does, and `loading` for a checkpoint), never touches disk, and holds
its lock only while the set of slots is read or changed, never while a slot is hashed.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from google.protobuf.message import DecodeError

from leyline import SnapshotManifest
from leyline.shm import ControlBlock, Slot, SlotHeader, TornHeader, slot_name
from leyline.v1.resilience_pb2 import SlotCondition
from leyline.v1.sidecar_pb2 import SlotInfo
from tolaria_sidecar.errors import PreconditionFailed, RequestInvalid
from tolaria_sidecar.metrics import SidecarMetrics
from tolaria_sidecar.values import SlotEntry

logger = logging.getLogger(__name__)


def read_header(slot: Slot) -> SlotHeader | None:
    """The slot's header, or None while the trainer is writing it (as good as empty)."""
    try:
        return slot.header()
    except TornHeader:
        return None


class SlotTable:
    """The run's slots by index, with their control-block state; thread-safe."""

    def __init__(
        self,
        *,
        instance_id: str,
        control: ControlBlock,
        directory: Path,
        metrics: SidecarMetrics,
    ) -> None:
        self.control = control
        self._instance = instance_id
        self._directory = directory
        self._metrics = metrics
        self.lock = threading.RLock()
        """Held while the set of slots is read or changed (re-entrant: a job holding it may
        read the table)."""
        self._slots: dict[int, Slot] = {}
        self._retired: list[Slot] = []
        self.loaded_generation = 0
        """The newest generation the sidecar published itself (a checkpoint load); the
        trainer's next commits must number above it."""

    # -- the set of slots ---------------------------------------------------------------------

    @property
    def count(self) -> int:
        with self.lock:
            return len(self._slots)

    def path(self, index: int) -> Path:
        """Where slot `index` of this instance lives (named by instance id, R13.1)."""
        return self._directory / slot_name(self._instance, index)

    def get(self, index: int) -> Slot | None:
        with self.lock:
            return self._slots.get(index)

    def slots(self) -> dict[int, Slot]:
        """A copy of the slots by index."""
        with self.lock:
            return dict(self._slots)

    def put(self, index: int, slot: Slot) -> None:
        with self.lock:
            self._slots[index] = slot

    def retire(self, index: int) -> None:
        """Drops slot `index` from the table but keeps it mapped until `close`: a running
        persist or verification may still read it."""
        with self.lock:
            self._retired.append(self._slots.pop(index))

    def slot(self, index: int, field: str = "slot") -> Slot:
        """Slot `index`; `PreconditionFailed` before Attach, `RequestInvalid` naming `field`
        when out of range."""
        with self.lock:
            if not self._slots:
                raise PreconditionFailed(field, "no slots exist yet: Attach first")
            slot = self._slots.get(index)
            if slot is None:
                raise RequestInvalid(field, f"must be 0..{len(self._slots) - 1}, got {index}")
            return slot

    def clear_state(self, index: int) -> None:
        """Forgets every state line of slot `index` (it is being recreated or refilled)."""
        if index < self.control.slot_count:
            self.control.set_verified(index, 0)
            self.control.set_rejected(index, 0)
            self.control.set_pinned(index, 0)
            self.control.set_durable(index, 0)

    def close(self, *, unlink: bool) -> None:
        """Unmaps every slot; `unlink` also removes the segments (local mode cleanup)."""
        with self.lock:
            for slot in [*self._slots.values(), *self._retired]:
                slot.close()
                if unlink:
                    slot.seg.unlink()
            self._slots.clear()
            self._retired.clear()

    # -- what the slots hold ------------------------------------------------------------------

    def describe(self, slot: Slot) -> SlotInfo:
        header = read_header(slot)
        info = SlotInfo(
            index=slot.index,
            shm_name=slot.seg.path.name,
            capacity_bytes=slot.capacity,
            condition=SlotCondition.SLOT_CONDITION_EMPTY,
        )
        if header is None or not header.visible:
            return info
        state = self.control.slot_state(slot.index)
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
        with self.lock:
            slots = [self._slots[i] for i in sorted(self._slots)]
        return [self.describe(s) for s in slots]

    def entries(self) -> list[SlotEntry]:
        """Committed slots, newest generation first (the LRU order), read from the headers."""
        with self.lock:
            slots = list(self._slots.values())
        entries = []
        for slot in slots:
            header = read_header(slot)
            if header is None or not header.visible:
                continue
            state = self.control.slot_state(slot.index)
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
        header = read_header(self.slot(index))
        return header.generation if header is not None and header.visible else 0

    def unverified(self) -> list[tuple[int, int]]:
        """Committed (index, generation) pairs neither verified nor rejected yet."""
        return [(e.index, e.generation) for e in self.entries() if not (e.verified or e.rejected)]

    def newest_persistable(self) -> SlotEntry | None:
        """The newest committed slot that is not rejected (for `RequestCheckpoint`)."""
        return next((e for e in self.entries() if not e.rejected), None)

    def resume_slot(self, layout_fingerprint: str) -> SlotInfo | None:
        """The newest committed, non-rejected slot whose manifest has `layout_fingerprint`
        (crash resume: a restarted trainer restores from shared memory, not disk)."""
        slots = self.slots()
        for entry in self.entries():
            if entry.rejected:
                continue
            slot = slots[entry.index]
            header = read_header(slot)
            if header is None or header.generation != entry.generation:
                continue
            try:
                manifest = SnapshotManifest.FromString(slot.manifest_bytes(header))
            except (TornHeader, DecodeError) as err:
                logger.warning("slot %d skipped for resume: %s", entry.index, err)
                continue
            if manifest.layout_fingerprint == layout_fingerprint:
                return self.describe(slot)
        return None

    def newest_generation(self) -> int:
        """The highest generation any slot's header or state line has seen (0: none), so a
        generation the sidecar publishes is above every one the trainer or a mark used."""
        with self.lock:
            headers = [read_header(s) for s in self._slots.values()]
            states = [self.control.slot_state(i) for i in self._slots]
            return max(
                [
                    *(h.generation if h is not None else 0 for h in headers),
                    *(
                        max(s.verified_generation, s.rejected_generation, s.durable_generation)
                        for s in states
                    ),
                ],
                default=0,
            )

    def refresh_gauges(self) -> None:
        """Sets the slots-by-condition gauge from the table (rare events only)."""
        counts: dict[int, int] = {}
        for info in self.infos():
            counts[info.condition] = counts.get(info.condition, 0) + 1
        self._metrics.set_slots(counts)
