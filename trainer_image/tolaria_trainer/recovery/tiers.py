"""The two places a rollback restores from (R6.1, R6.3): shared memory and durable checkpoints.

`FastTier` restores the newest verified snapshot at or before a step from the slots this
trainer has mapped; `FullTier` asks the sidecar to load the newest committed checkpoint at or
before a step into a slot (`PrepareFullRollback`, under the full-rollback deadline, or
`LoadCheckpoint` for a resume) and restores from that slot. Both restore all or nothing
(`restore.Restorer`): a failure leaves the live state as it was, or marked unverified when the
failure came after the first write. Each tier also answers, cheaply, whether it has a target
at all (the planner's facts). Neither decides anything: the planner does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from leyline import (
    SCHEMA_VERSION,
    CheckpointRecord,
    CheckpointRejection,
    Participant,
    RollbackPhaseTiming,
    RollbackRequest,
    RollbackTier,
)
from leyline.shm import ControlBlock, ShmError, Slot
from leyline.spec import TolariaRunSpec
from leyline.v1 import sidecar_pb2 as pb
from tolaria_trainer.errors import StateMismatch, TrainerError
from tolaria_trainer.recovery.link import SidecarLink, SidecarUnavailable
from tolaria_trainer.recovery.restore import (
    NothingToRestore,
    Restored,
    Restorer,
    SnapshotRejected,
)
from tolaria_trainer.recovery.snapshots import SnapshotWriter
from tolaria_trainer.state import TrainingState

logger = logging.getLogger(__name__)

KEEP_LIVE = frozenset({"history", "recovery"})
"""Documents a rollback leaves as they are: a rollback does not undo the record of what
happened, nor the rollback budget spent (R13.3)."""


class TierFailed(TrainerError):
    """A tier could not restore; `rejections` says which sources were refused and why."""

    def __init__(
        self,
        reason: str,
        *,
        phases: Sequence[RollbackPhaseTiming] = (),
        checkpoint_rejections: Sequence[CheckpointRejection] = (),
        slot_rejections: Sequence[object] = (),
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.phases = list(phases)
        self.checkpoint_rejections = list(checkpoint_rejections)
        self.slot_rejections = list(slot_rejections)


@dataclass
class FromCheckpoint:
    """A restore from a durable checkpoint: the restore, and which checkpoint it was."""

    restored: Restored
    checkpoint: CheckpointRecord
    load_phases: list[RollbackPhaseTiming] = field(default_factory=list)
    rejections: list[CheckpointRejection] = field(default_factory=list)


def _budgets(spec: TolariaRunSpec) -> tuple[float, float, float]:
    r = spec.rollback
    return r.prepare_ms, r.commit_ms, r.confirm_ms


class FastTier:
    """Restores from this trainer's mapped shared-memory slots."""

    def __init__(
        self,
        *,
        state: TrainingState,
        control: ControlBlock,
        slots: Sequence[Slot],
        writer: SnapshotWriter,
        spec: TolariaRunSpec,
        keep_live: frozenset[str] = KEEP_LIVE,
    ) -> None:
        self._restorer = Restorer(state=state, control=control, keep_live=keep_live)
        self._resumer = Restorer(state=state, control=control)
        self._slots = list(slots)
        self._writer = writer
        self._spec = spec

    @property
    def enabled(self) -> bool:
        return self._spec.snapshots.enabled

    def target(self, max_step: int) -> int | None:
        """Step of the newest unrejected snapshot at or below `max_step`, or None."""
        if not self.enabled:
            return None
        self._writer.fence()
        return self._restorer.newest_step(self._slots, max_step=max_step)

    def restore(self, max_step: int | None, *, resume: bool = False) -> Restored:
        """Restores the newest slot at or below `max_step` that verifies; raises
        `NothingToRestore` (live state untouched, or unverified when a late step failed).
        A `resume` (a new process) also loads the documents a rollback keeps live."""
        self._writer.fence()
        restorer = self._resumer if resume else self._restorer
        return restorer.restore(self._slots, max_step=max_step, budgets_ms=_budgets(self._spec))


class FullTier:
    """Restores from a durable checkpoint the sidecar loads into a slot."""

    def __init__(
        self,
        *,
        run_id: str,
        link: SidecarLink,
        state: TrainingState,
        control: ControlBlock,
        slots: Sequence[Slot],
        writer: SnapshotWriter,
        spec: TolariaRunSpec,
        keep_live: frozenset[str] = KEEP_LIVE,
    ) -> None:
        self._run_id = run_id
        self._link = link
        self._state = state
        self._restorer = Restorer(state=state, control=control, keep_live=keep_live)
        self._resumer = Restorer(state=state, control=control)
        self._slots = {s.index: s for s in slots}
        self._writer = writer
        self._spec = spec

    def target(self, max_step: int) -> int | None:
        """Step of the newest committed checkpoint at or below `max_step` the sidecar lists,
        or None (none, or the sidecar is unreachable). Not yet verified: a load can still
        refuse it, and the planner then asks again without this tier."""
        try:
            status = self._link.status()
        except SidecarUnavailable:
            return None
        steps = [c.global_step for c in status.checkpoints if c.global_step <= max_step]
        return max(steps) if steps else None

    def rollback(
        self,
        *,
        rollback_id: str,
        kind: int,
        detail: str,
        from_step: int,
        from_epoch: int,
        max_step: int,
    ) -> FromCheckpoint:
        """PrepareFullRollback (the sidecar loads and verifies the checkpoint within the
        deadline it tracks), then restores the slot; raises `TierFailed`."""
        deadline_s = self._spec.rollback.full_deadline_seconds
        request = RollbackRequest(
            version=SCHEMA_VERSION,
            rollback_id=rollback_id,
            tier=RollbackTier.ROLLBACK_TIER_FULL,
            reason=kind,  # type: ignore[arg-type]
            detail=detail,
            from_step=from_step,
            from_epoch=from_epoch,
            max_target_step=max_step,
            deadline_unix_ms=int(time.time() * 1000 + deadline_s * 1000),
            requested_by=Participant.PARTICIPANT_TRAINER,
            run_id=self._run_id,
        )
        request.requested_at.GetCurrentTime()
        self._writer.fence()
        try:
            reply = self._link.prepare_full_rollback(request, deadline_s)
        except SidecarUnavailable as err:
            raise TierFailed(str(err)) from err
        return self._restore_loaded(reply, self._restorer)

    def load_for_resume(self, *, reason: str) -> FromCheckpoint:
        """LoadCheckpoint (no rollback deadline: a crash resume or `--resume`), then restores
        the slot; raises `TierFailed`."""
        request = pb.LoadCheckpointRequest(
            version=SCHEMA_VERSION,
            run_id=self._run_id,
            layout_fingerprint=self._state.fingerprint(),
            reason=reason,
        )
        self._writer.fence()
        try:
            reply = self._link.load_checkpoint(request, self._spec.rollback.full_deadline_seconds)
        except SidecarUnavailable as err:
            raise TierFailed(str(err)) from err
        return self._restore_loaded(reply, self._resumer)

    def _restore_loaded(
        self, reply: pb.PrepareFullRollbackResponse, restorer: Restorer
    ) -> FromCheckpoint:
        rejections = list(reply.rejections)
        if not reply.ready:
            raise TierFailed(
                reply.error or "no checkpoint",
                phases=reply.phases,
                checkpoint_rejections=rejections,
            )
        slot = self._slots.get(reply.slot.index)
        if slot is None:
            raise TierFailed(f"the sidecar loaded slot {reply.slot.index}, which is not mapped")
        try:
            header = slot.header()
            self._writer.adopt(slot.index, header.generation)
            restored = restorer.restore_slot(slot, header, budgets_ms=_budgets(self._spec))
        except (SnapshotRejected, NothingToRestore, StateMismatch, ShmError) as err:
            raise TierFailed(
                f"{reply.checkpoint.file_name}: {err}",
                phases=reply.phases,
                checkpoint_rejections=rejections,
            ) from err
        return FromCheckpoint(restored, reply.checkpoint, list(reply.phases), rejections)
