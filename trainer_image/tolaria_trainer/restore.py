"""Restoring the live training state from a shared-memory slot (R6.1, R6.2, R6.3).

Three phases, each timed against its budget. PREPARE picks the newest slot
that is committed, not rejected, older than the anomaly and of this run's
layout, and checks its header and manifest checksums and lengths. COMMIT
copies every tensor back into the live tensors in place, hashing the slot's
bytes as it goes (the data checksum costs little more than the copy because
each chunk is hashed from cache; a mismatch rejects the slot and the next older
one is restored over the now-garbled live state), then loads every document.
CONFIRM compares a sample of every restored tensor with the slot and checks
the parameters are finite. A slot that fails is recorded as rejected
and the next older one is tried. Nothing here allocates beyond optimizer state
a fresh process does not have yet, and nothing unpickles.

Used by the fast rollback (PREPARE/COMMIT/CONFIRM), crash resume (the same
from the sidecar's resume slot) and the full rollback (COMMIT/CONFIRM from the
slot the sidecar loaded a checkpoint into). Runs on the training thread after
the snapshot writer is fenced.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

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
from tolaria_trainer.slotio import Placement, as_bytes, region_tensor, restore_verifying
from tolaria_trainer.state import TrainingState

logger = logging.getLogger(__name__)

_CONFIRM_BLOCK_BYTES = 4096  # bytes compared per block in CONFIRM (three blocks a tensor)


class SnapshotRejected(TrainerError):
    """This slot cannot be restored (checksum, layout, age): try the next older one."""


class NothingToRestore(TrainerError):
    """No slot could be restored: escalate to the full tier."""

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


def timing(
    phase: RollbackPhase.ValueType, elapsed_ns: int, budget_ms: float
) -> RollbackPhaseTiming:
    return RollbackPhaseTiming(
        phase=phase,
        elapsed_ns=elapsed_ns,
        budget_ns=ms_to_ns(budget_ms),
        within_budget=elapsed_ns <= ms_to_ns(budget_ms),
    )


class Restorer:
    """Copies a verified slot back into the live state; see the module docstring."""

    def __init__(
        self,
        *,
        state: TrainingState,
        control: ControlBlock,
        keep_live: frozenset[str] = frozenset(),
    ) -> None:
        self._state = state
        self._control = control
        self._keep_live = keep_live
        """Documents a rollback must not restore (the run's own history of what happened)."""

    def candidates(
        self, slots: Sequence[Slot], *, before_step: int | None
    ) -> list[tuple[Slot, SlotHeader]]:
        """Committed slots newest first, older than `before_step` when given."""
        found = []
        for slot in slots:
            try:
                header = slot.header()
            except ShmError as err:
                logger.warning("slot %d: %s", slot.index, err)
                continue
            if not header.visible:
                continue
            if before_step is not None and header.global_step >= before_step:
                continue
            found.append((slot, header))
        return sorted(found, key=lambda sh: sh[1].generation, reverse=True)

    def prepare(self, slot: Slot, header: SlotHeader, fingerprint: str) -> SnapshotManifest:
        """Verifies one slot; raises `SnapshotRejected` with the reason."""
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
        if manifest.layout_fingerprint != fingerprint:
            raise SnapshotRejected(
                f"slot {slot.index}: layout {manifest.layout_fingerprint} "
                f"!= this run's {fingerprint}"
            )
        if manifest.data_bytes != header.data_length:
            raise SnapshotRejected(
                f"slot {slot.index}: manifest and header disagree on data length"
            )
        return manifest

    def restore(
        self,
        slots: Sequence[Slot],
        *,
        before_step: int | None,
        budgets_ms: tuple[float, float, float],
    ) -> Restored:
        """PREPARE, COMMIT, CONFIRM from the newest usable slot; raises `NothingToRestore`."""
        prepare_ms, commit_ms, confirm_ms = budgets_ms
        fingerprint = self._state.fingerprint()
        rejected: list[SnapshotRejection] = []
        prepare_ns = commit_ns = 0
        for slot, header in self.candidates(slots, before_step=before_step):
            phase_start = time.perf_counter_ns()
            try:
                manifest = self.prepare(slot, header, fingerprint)
                prepared = time.perf_counter_ns()
                prepare_ns += prepared - phase_start
                pairs = self.commit(slot, header, manifest)
                committed = time.perf_counter_ns()
                commit_ns += committed - prepared
                break
            except SnapshotRejected as err:
                logger.warning("%s; trying the next older slot", err)
                rejection = SnapshotRejection(
                    slot=slot.index,
                    generation=header.generation,
                    reason=str(err),
                    global_step=header.global_step,
                )
                rejection.at.GetCurrentTime()
                rejected.append(rejection)
        else:
            raise NothingToRestore(
                f"no committed, valid snapshot older than step {before_step}"
                f" ({len(rejected)} rejected)",
                rejected,
            )
        self.confirm(slot, pairs)
        confirmed = time.perf_counter_ns()
        return Restored(
            slot=slot.index,
            generation=header.generation,
            global_step=manifest.global_step,
            epoch=manifest.epoch,
            batch_index=manifest.batch_index,
            manifest=manifest,
            phases=[
                timing(RollbackPhase.ROLLBACK_PHASE_PREPARE, prepare_ns, prepare_ms),
                timing(RollbackPhase.ROLLBACK_PHASE_COMMIT, commit_ns, commit_ms),
                timing(RollbackPhase.ROLLBACK_PHASE_CONFIRM, confirmed - committed, confirm_ms),
            ],
            rejected=rejected,
        )

    def commit(
        self, slot: Slot, header: SlotHeader, manifest: SnapshotManifest
    ) -> list[tuple[TensorEntry, torch.Tensor]]:
        """Copies every tensor in place, verifying the slot's bytes, then loads the documents.

        Raises `SnapshotRejected` on a checksum mismatch; the live tensors are
        then partly overwritten and the caller restores an older slot over them.
        """
        pairs = self._state.restore_targets(manifest.tensors)
        placements = [Placement(e.offset, e.nbytes, t) for e, t in pairs]
        found = restore_verifying(slot, placements, total_bytes=header.data_length)
        if found != header.data_checksum:
            raise SnapshotRejected(
                f"slot {slot.index}: data checksum {found:016x} "
                f"!= header {header.data_checksum:016x}"
            )
        self._state.apply_rng(pairs)
        self._state.load_documents(manifest.documents, skip=self._keep_live)
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
