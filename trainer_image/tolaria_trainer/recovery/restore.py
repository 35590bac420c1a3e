"""Restoring the live training state from a shared-memory slot, all or nothing (R6.1, R6.2, R13.2).

Three phases, each timed against its budget:

* PREPARE picks the newest slot that is committed, not rejected by the sidecar, at or below
  the target step and of this run's layout; checks its header and manifest checksums and
  lengths; parses every document and checks every tensor against the live state; then
  proves the slot's bytes intact by hashing the data region (on a few threads). Nothing
  live is touched: a slot that fails here is recorded as rejected, the next older one is
  tried, and the live state stays exactly as it was.
* COMMIT makes the optimizer's state the snapshot's (creating or dropping entries), copies
  every tensor into the live tensors in place, sets the RNGs and loads the documents.
* CONFIRM compares a sample of every restored tensor with the slot and checks that the
  parameters are finite.

From COMMIT's first write until CONFIRM passes, `TrainingState.unverified_reason` is set:
if anything fails in between (a document loader raising, a mismatch in CONFIRM), the live
state holds a mix and nothing may be captured, persisted or trained from it until another
restore succeeds (the recovery planner halts when none can, and the halt persists only a
verified snapshot). Nothing here allocates beyond optimizer state a fresh process does not
have yet, and nothing unpickles.

Used by the fast tier (newest usable slot), crash resume (the same from this instance's own
slots) and the full tier and checkpoint resume (the one slot the sidecar loaded a checkpoint
into). Runs on the training thread after the snapshot writer is fenced.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from leyline import (
    RollbackPhase,
    RollbackPhaseTiming,
    SnapshotManifest,
    SnapshotRejection,
    TensorEntry,
)
from leyline.checksum import REGION_ALGORITHM
from leyline.shm import ControlBlock, ShmError, Slot, SlotHeader
from tolaria_trainer.clock import ms_to_ns
from tolaria_trainer.errors import StateMismatch, TrainerError
from tolaria_trainer.recovery.slotio import (
    Placement,
    as_bytes,
    copy_out,
    hash_region,
    region_tensor,
)
from tolaria_trainer.state import TORCH_DTYPES, TrainingState

logger = logging.getLogger(__name__)

_CONFIRM_BLOCK_BYTES = 4096  # bytes compared per block in CONFIRM (three blocks a tensor)


class SnapshotRejected(TrainerError):
    """This slot cannot be restored (checksum, layout, age); the live state is untouched:
    try the next older one."""


class NothingToRestore(TrainerError):
    """No slot could be restored; the live state is untouched: escalate to the next tier."""

    def __init__(self, message: str, rejected: list[SnapshotRejection]) -> None:
        super().__init__(message)
        self.rejected = rejected


@dataclass
class Restored:
    """The outcome of a restore, for the rollback report."""

    slot: int
    generation: int
    global_step: int
    epoch: int
    batch_index: int
    manifest: SnapshotManifest
    phases: list[RollbackPhaseTiming] = field(default_factory=list)
    rejected: list[SnapshotRejection] = field(default_factory=list)


@dataclass
class _Prepared:
    """A slot that passed PREPARE: verified bytes, parsed documents, checked tensors."""

    slot: Slot
    header: SlotHeader
    manifest: SnapshotManifest
    documents: dict[str, Any]


def timing(
    phase: RollbackPhase.ValueType, elapsed_ns: int, budget_ms: float
) -> RollbackPhaseTiming:
    return RollbackPhaseTiming(
        phase=phase,
        elapsed_ns=elapsed_ns,
        budget_ns=ms_to_ns(budget_ms),
        within_budget=elapsed_ns <= ms_to_ns(budget_ms),
    )


def rejection(slot: Slot, header: SlotHeader, reason: str) -> SnapshotRejection:
    record = SnapshotRejection(
        slot=slot.index, generation=header.generation, reason=reason, global_step=header.global_step
    )
    record.at.GetCurrentTime()
    return record


class Restorer:
    """Copies a verified slot back into the live state; see the module docstring."""

    def __init__(
        self,
        *,
        state: TrainingState,
        control: ControlBlock,
        keep_live: frozenset[str] = frozenset(),
        threads: int | None = None,
    ) -> None:
        self._state = state
        self._control = control
        self._keep_live = keep_live
        """Documents a rollback must not restore (the run's own record of what happened)."""
        self._threads = threads

    # -- which slots -------------------------------------------------------------------------

    def candidates(
        self, slots: Sequence[Slot], *, max_step: int | None
    ) -> list[tuple[Slot, SlotHeader]]:
        """Committed slots newest generation first, at or below `max_step` when given."""
        found = []
        for slot in slots:
            try:
                header = slot.header()
            except ShmError as err:
                logger.warning("slot %d: %s", slot.index, err)
                continue
            if not header.visible:
                continue
            if max_step is not None and header.global_step > max_step:
                continue
            found.append((slot, header))
        return sorted(found, key=lambda sh: sh[1].generation, reverse=True)

    def newest_step(self, slots: Sequence[Slot], *, max_step: int | None) -> int | None:
        """The step of the newest slot a restore would try first (not yet verified), or None
        when no committed, unrejected slot is at or below `max_step` (the planner's fact)."""
        for slot, header in self.candidates(slots, max_step=max_step):
            if self._control.slot_state(slot.index).rejected_generation != header.generation:
                return header.global_step
        return None

    # -- restore -----------------------------------------------------------------------------

    def restore(
        self,
        slots: Sequence[Slot],
        *,
        max_step: int | None,
        budgets_ms: tuple[float, float, float],
    ) -> Restored:
        """PREPARE, COMMIT, CONFIRM from the newest usable slot; `NothingToRestore` (live state
        untouched) when none verifies. A failure after COMMIT started leaves the state marked
        unverified and tries the next older slot over it."""
        rejected: list[SnapshotRejection] = []
        for slot, header in self.candidates(slots, max_step=max_step):
            try:
                restored = self.restore_slot(slot, header, budgets_ms=budgets_ms)
            except (SnapshotRejected, StateMismatch) as err:
                logger.warning("%s; trying the next older slot", err)
                rejected.append(rejection(slot, header, str(err)))
                continue
            restored.rejected = rejected
            return restored
        raise NothingToRestore(
            f"no committed, valid snapshot at or below step {max_step} ({len(rejected)} rejected)",
            rejected,
        )

    def restore_slot(
        self, slot: Slot, header: SlotHeader, *, budgets_ms: tuple[float, float, float]
    ) -> Restored:
        """Restores one slot. Raises `SnapshotRejected` (live state untouched) or
        `StateMismatch` from COMMIT/CONFIRM (live state marked unverified)."""
        prepare_ms, commit_ms, confirm_ms = budgets_ms
        start = time.perf_counter_ns()
        prepared = self.prepare(slot, header)
        prepared_at = time.perf_counter_ns()
        pairs = self.commit(prepared)
        committed_at = time.perf_counter_ns()
        self.confirm(slot, pairs)
        self._state.unverified_reason = ""
        confirmed_at = time.perf_counter_ns()
        manifest = prepared.manifest
        return Restored(
            slot=slot.index,
            generation=header.generation,
            global_step=manifest.global_step,
            epoch=manifest.epoch,
            batch_index=manifest.batch_index,
            manifest=manifest,
            phases=[
                timing(RollbackPhase.ROLLBACK_PHASE_PREPARE, prepared_at - start, prepare_ms),
                timing(RollbackPhase.ROLLBACK_PHASE_COMMIT, committed_at - prepared_at, commit_ms),
                timing(
                    RollbackPhase.ROLLBACK_PHASE_CONFIRM, confirmed_at - committed_at, confirm_ms
                ),
            ],
        )

    def prepare(self, slot: Slot, header: SlotHeader) -> _Prepared:
        """Every check that needs no live write; raises `SnapshotRejected` with the reason."""
        state = self._control.slot_state(slot.index)
        if state.rejected_generation == header.generation:
            raise SnapshotRejected(
                f"slot {slot.index}: generation {header.generation} rejected by the sidecar"
            )
        try:
            manifest = SnapshotManifest.FromString(slot.manifest_bytes(header))
        except (ShmError, ValueError) as err:
            raise SnapshotRejected(f"slot {slot.index}: manifest unreadable: {err}") from err
        if manifest.generation != header.generation:
            raise SnapshotRejected(
                f"slot {slot.index}: manifest generation {manifest.generation} "
                f"!= header {header.generation}"
            )
        if header.checksum_algorithm != REGION_ALGORITHM:
            raise SnapshotRejected(
                f"slot {slot.index}: checksum algorithm {header.checksum_algorithm} is not "
                f"the chunked xxh3-64 ({REGION_ALGORITHM})"
            )
        fingerprint = self._state.fingerprint()
        if manifest.layout_fingerprint != fingerprint:
            raise SnapshotRejected(
                f"slot {slot.index}: layout {manifest.layout_fingerprint} "
                f"!= this run's {fingerprint}"
            )
        if manifest.data_bytes != header.data_length:
            raise SnapshotRejected(
                f"slot {slot.index}: manifest and header disagree on data length"
            )
        _check_extents(slot, manifest)
        try:
            documents = self._state.parse_documents(manifest.documents)
            self._state.check_targets(manifest.tensors)
        except StateMismatch as err:
            raise SnapshotRejected(f"slot {slot.index}: {err}") from err
        found = hash_region(slot, total_bytes=header.data_length, threads=self._threads)
        if found != header.data_checksum:
            raise SnapshotRejected(
                f"slot {slot.index}: data checksum {found:016x} "
                f"!= header {header.data_checksum:016x}"
            )
        return _Prepared(slot, header, manifest, documents)

    def commit(self, prepared: _Prepared) -> list[tuple[TensorEntry, torch.Tensor]]:
        """Writes the verified slot into the live state; marks it unverified until CONFIRM."""
        slot, header, manifest = prepared.slot, prepared.header, prepared.manifest
        self._state.unverified_reason = (
            f"restore of slot {slot.index} (generation {header.generation}) did not finish"
        )
        pairs = self._state.restore_targets(manifest.tensors)
        placements = [Placement(e.offset, e.nbytes, t) for e, t in pairs]
        copy_out(slot, placements, total_bytes=header.data_length, threads=self._threads)
        self._state.apply_rng(pairs)
        try:
            self._state.load_parsed(prepared.documents, skip=self._keep_live)
        except Exception as err:  # boundary: a component's loader refused its own document
            raise StateMismatch(
                f"slot {slot.index}: a document did not load: {type(err).__name__}: {err}"
            ) from err
        return pairs

    @staticmethod
    def confirm(slot: Slot, pairs: Sequence[tuple[TensorEntry, torch.Tensor]]) -> None:
        """Spot-checks every restored tensor against the slot, and that parameters are finite.

        The region digest already proved the slot's bytes; this catches a copy that put them in
        the wrong place. It compares three contiguous blocks per tensor (start, middle, end) on
        numpy byte views: strided torch samples cost a cache miss each plus ~10 us per torch
        op, which made this phase 8 ms for 50 tensors. Parameters are checked finite on the
        same blocks (a full `isfinite` over 100 MB took 100 ms here); the loss guard catches a
        non-finite value the blocks miss on the first step.
        """
        region = region_tensor(slot)
        data = np.frombuffer(slot.data, dtype=np.uint8)
        for entry, target in pairs:
            name = entry.name
            if name.startswith("rng/") or not target.numel():
                continue
            if target.device.type == "cpu" and target.is_contiguous():
                # numpy on the byte views: microseconds, where each torch op costs ~10 us
                got = as_bytes(target.detach()).numpy()
                want = data[entry.offset : entry.offset + entry.nbytes]
                width = min(entry.nbytes, _CONFIRM_BLOCK_BYTES)
                same = all(
                    np.array_equal(got[first : first + width], want[first : first + width])
                    for first in {0, (entry.nbytes - width) // 2, entry.nbytes - width}
                )
            else:
                src = region[entry.offset : entry.offset + entry.nbytes].view(target.dtype)
                same = torch.equal(target.reshape(-1).cpu(), src.view(-1))
            if not same:
                raise StateMismatch(f"{name}: restored tensor differs from the snapshot")
            if target.is_floating_point() and name.startswith("model/"):
                flat = target.reshape(-1)
                width = min(flat.numel(), _CONFIRM_BLOCK_BYTES // target.element_size())
                for first in {0, (flat.numel() - width) // 2, flat.numel() - width}:
                    if not bool(torch.isfinite(flat[first : first + width]).all()):
                        raise StateMismatch(f"{name}: restored tensor is not finite")


def _check_extents(slot: Slot, manifest: SnapshotManifest) -> None:
    """Every tensor lies inside the data region and matches its declared size."""
    for entry in manifest.tensors:
        if entry.offset + entry.nbytes > manifest.data_bytes:
            raise SnapshotRejected(
                f"slot {slot.index}: {entry.name} ends at {entry.offset + entry.nbytes} "
                f"> data length {manifest.data_bytes}"
            )
        dtype = TORCH_DTYPES.get(entry.dtype)
        if dtype is None or any(dim < 0 for dim in entry.shape):
            raise SnapshotRejected(f"slot {slot.index}: {entry.name}: bad dtype or shape")
        count = 1
        for dim in entry.shape:
            count *= dim
        expected = count * torch.empty((), dtype=dtype).element_size()
        if entry.nbytes != expected:
            raise SnapshotRejected(
                f"slot {slot.index}: {entry.name}: {entry.nbytes} B for shape "
                f"{list(entry.shape)} of {dtype} ({expected} B)"
            )
