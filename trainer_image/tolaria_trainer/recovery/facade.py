"""The loop's one door into recovery: snapshots, rollbacks, resume, emergencies, halt (R6, R7, R13).

`Recovery` is what the loop calls at its few recovery points: `boundary` before a step
(freeze, halt, requests from outside), `fence` before the optimizer step, `after_step`
(heartbeat, snapshot cadence), `epoch_end` (epoch snapshot, durable checkpoint when due) and
`respond` when the detector reports an anomaly. It decides nothing itself: `respond` turns the
anomaly and the run's record into `planner.Facts`, executes the planner's `Decision` on the
tier it names, and asks again when that tier fails, until a rollback succeeds or the run
halts with the reason.

At attach it restores what a previous attempt of this instance left, in this order (R6.2):
its own shared memory, then the newest valid durable checkpoint it may use (this instance's,
or the lineage's when asked to resume), and only then nothing (freshly built tensors); the
report says which. A run that starts from nothing first takes a baseline snapshot at step 0
and makes it durable, so every anomaly from the first step on has a target (R13.4).

When the sidecar is unreachable the run continues DEGRADED: the fast tier still works from
the slots already mapped; what needs the sidecar (full tier, broadcast) is unavailable.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from leyline import (
    SCHEMA_VERSION,
    AnomalyKind,
    CheckpointRecord,
    CheckpointRejection,
    EmergencyLevel,
    EmergencyState,
    HealthStatus,
    MessagePriority,
    RecoveryAction,
    RecoveryDecision,
    ReplayPolicy,
    ResumeRecord,
    ResumeSource,
    RollbackReport,
    RollbackTier,
    RunPhase,
    SkippedWindow,
    SnapshotRejection,
    TelemetryLevel,
)
from leyline.shm import ControlBlock, EmergencyRecord, ShmError, Slot, shm_dir
from leyline.spec import TolariaRunSpec, training_identity
from leyline.termination import TerminationMessage
from leyline.v1 import sidecar_pb2 as pb
from tolaria_trainer.clock import ms_to_ns
from tolaria_trainer.detector import Anomaly
from tolaria_trainer.errors import StateMismatch, TrainerError
from tolaria_trainer.history import DOCUMENT_BYTES_BOUND, RunHistory
from tolaria_trainer.position import Position
from tolaria_trainer.protocols import Clock, EventSink
from tolaria_trainer.recovery.emergencies import Emergencies
from tolaria_trainer.recovery.ledger import RecoveryLedger, ReplayedWindow
from tolaria_trainer.recovery.link import SidecarLink, SidecarUnavailable
from tolaria_trainer.recovery.participant import POD_MODE_ENV, EmergencyParticipant
from tolaria_trainer.recovery.planner import (
    FAST,
    FULL,
    WHOLE_EPOCH,
    Decision,
    Facts,
    Limits,
    Window,
    plan,
)
from tolaria_trainer.recovery.reports import OpenRollback, RollbackRecorder
from tolaria_trainer.recovery.restore import NothingToRestore, Restored
from tolaria_trainer.recovery.snapshots import CaptureResult, SnapshotWriter
from tolaria_trainer.recovery.tiers import FastTier, FromCheckpoint, FullTier, TierFailed
from tolaria_trainer.state import TrainingState

logger = logging.getLogger(__name__)

EVENT_HALT = "tolaria.halt"
EVENT_DECISION = "tolaria.recovery_decision"
CLOSE_WAIT_S = 15.0
"""At the end of a run, how long to wait for a restarting sidecar (it restarts in ~1 s)."""
FINAL_CHECKPOINT_WAIT_S = 10.0
"""How long a halt waits for its final checkpoint to become durable before exiting anyway."""
SETTLE_WAIT_S = 60.0
"""How long a drill waits for the durable checkpoint in flight before striking anyway."""


class ResumeImpossible(TrainerError):
    """The run had to continue from saved state (`--resume`, or a restore that failed after it
    wrote to the live state) and could not: fail the run, never train from nothing silently."""


@dataclass(frozen=True)
class Response:
    """What the loop does after a recovery point: carry on from the restored position
    (`rolled_back`), or end the run with `phase` (Halted, Suspended) and `reason`."""

    rolled_back: bool = False
    phase: RunPhase.ValueType | None = None
    reason: str = ""


def _window(anomaly: Anomaly) -> Window | None:
    """The data `anomaly` is blamed on (None for a request from outside)."""
    if anomaly.external:
        return None
    if anomaly.epoch_level:
        return Window(anomaly.epoch, WHOLE_EPOCH)
    return Window(anomaly.epoch, anomaly.batch_index, anomaly.samples)


class Recovery:
    """See the module docstring."""

    def __init__(
        self,
        *,
        run_id: str,
        instance_id: str | None,
        spec: TolariaRunSpec,
        link: SidecarLink,
        state: TrainingState,
        position: Position,
        history: RunHistory,
        ledger: RecoveryLedger,
        events: EventSink,
        clock: Clock,
        attempt: int,
        batches_per_epoch: Callable[[], int],
        write_halt_report: Callable[[str], None],
        set_rollback_in_progress: Callable[[bool], None],
        resume_required: bool = False,
    ) -> None:
        self._run_id = run_id
        self.instance_id = instance_id or ""
        """This run instance (R13.1); adopted from the sidecar when the environment has none."""
        self.lineage_id = ""
        self._spec = spec
        self.link = link
        self._state = state
        self._position = position
        self._history = history
        self._ledger = ledger
        self._events = events
        self._clock = clock
        self._attempt = attempt
        self._batches = batches_per_epoch
        self._write_halt_report = write_halt_report
        self._resume_required = resume_required
        self._limits = Limits(
            max_per_epoch=spec.rollback.max_per_epoch,
            max_without_progress=spec.rollback.max_without_progress,
            max_per_run=spec.rollback.max_per_run,
            replay_policy=ReplayPolicy.ValueType(spec.rollback.replay_policy),
        )
        self.emergencies = Emergencies(
            run_id=run_id, link=link, history=history, events=events, clock=clock
        )
        self._recorder = RollbackRecorder(
            run_id=run_id,
            link=link,
            history=history,
            events=events,
            set_in_progress=set_rollback_in_progress,
        )
        self.control: ControlBlock | None = None
        self.slots: list[Slot] = []
        self.writer: SnapshotWriter | None = None
        self.participant: EmergencyParticipant | None = None
        self._fast: FastTier | None = None
        self._full: FullTier | None = None
        self.fast_feasible = False
        self.degraded_reason = ""
        self._persist_next = False
        self._persist_after_commit = False
        self._persist_requested: tuple[int, int] | None = None
        """(slot, generation) of the newest durable checkpoint asked of the sidecar."""
        self._persist_retry = False
        """A checkpoint was due but the sidecar could not take it: the next epoch-end snapshot
        is persisted whatever `everyEpochs` says, so the durable tier catches up."""
        self.halt_reason = ""
        self.snapshots_committed = 0
        self.commit_failures: list[str] = []
        self.attach_reply: pb.AttachResponse | None = None

    # -- start-up ------------------------------------------------------------------------------

    def attach(self, *, timeout_s: float) -> Restored | None:
        """Maps this instance's slots; restores what an earlier attempt left (see the module
        docstring), else takes the step-0 baseline. Returns what was restored, if anything.

        Raises `ResumeImpossible` when the run must not start from nothing.
        """
        self.link.wait_ready(timeout_s)
        request = pb.AttachRequest(
            version=SCHEMA_VERSION,
            run_id=self._run_id,
            state_bytes=self._state.estimated_bytes(),
            layout_fingerprint=self._state.fingerprint(),
            pid=os.getpid(),
            attempt=self._attempt,
            manifest_bytes=self._state.estimated_manifest_bytes(reserve=DOCUMENT_BYTES_BOUND),
            instance_id=self.instance_id,
        )
        reply = self.link.attach(request, timeout_s)
        self.attach_reply = reply
        self.instance_id = reply.instance_id or self.instance_id
        self.lineage_id = reply.lineage_id or self.instance_id
        base = shm_dir()
        control = ControlBlock.attach(base / reply.control_block_name, instance_id=self.instance_id)
        self.control = control
        self.slots = [
            Slot.attach(base / s.shm_name, instance_id=self.instance_id) for s in reply.slots
        ]
        self.fast_feasible = reply.fast_tier_feasible
        self.degraded_reason = reply.degraded_reason
        if not self.fast_feasible:
            self._event(
                "tolaria.fast_tier_degraded",
                TelemetryLevel.TELEMETRY_LEVEL_WARNING,
                MessagePriority.MESSAGE_PRIORITY_HIGH,
                reason=reply.degraded_reason,
            )
        writer = SnapshotWriter(
            state=self._state,
            slots=self.slots,
            control=control,
            spec=self._spec.snapshots,
            commit=self._commit,
            run_id=self._run_id,
            window=self._spec.budgets.latency_window,
            instance_id=self.instance_id,
            lineage_id=self.lineage_id,
            training=training_identity(self._spec.training),
        )
        writer.on_result = self.on_capture
        self.writer = writer
        self._fast = FastTier(
            state=self._state, control=control, slots=self.slots, writer=writer, spec=self._spec
        )
        self._full = FullTier(
            run_id=self._run_id,
            link=self.link,
            state=self._state,
            control=control,
            slots=self.slots,
            writer=writer,
            spec=self._spec,
        )
        self._recorder.control = control
        self.participant = EmergencyParticipant(
            control,
            attempt=self._attempt,
            on_halt_hung=self._halt_from_watcher,
            request_final_checkpoint=self._final_checkpoint,
        )
        self.emergencies.participant = self.participant
        self.participant.start()
        restored = self._resume(reply)
        if restored is None:
            self._baseline()
        return restored

    def _resume(self, reply: pb.AttachResponse) -> Restored | None:
        """Own shared memory → newest usable durable checkpoint → nothing (R6.2). What was
        refused on the way is recorded after the restore, which replaces the run history with
        the restored one."""
        fast, full = self._require_tiers()
        tried: list[str] = []
        rejections: list[SnapshotRejection] = []
        checkpoint_rejections: list[CheckpointRejection] = []
        start = time.perf_counter_ns()
        restored: Restored | None = None
        origin = ResumeSource.RESUME_SOURCE_FRESH
        checkpoint: CheckpointRecord | None = None
        if reply.HasField("resume_slot"):
            try:
                restored = fast.restore(None, resume=True)
            except NothingToRestore as err:
                rejections.extend(err.rejected)
                tried.append(f"shared memory: {err}")
            else:
                rejections.extend(restored.rejected)
                origin = ResumeSource.RESUME_SOURCE_SHARED_MEMORY
        if restored is None and (
            tried
            or reply.HasField("last_checkpoint")
            or self._resume_required
            or not self._state.verified
        ):
            try:
                loaded = full.load_for_resume(reason="resume")
            except TierFailed as err:
                checkpoint_rejections.extend(err.checkpoint_rejections)
                tried.append(f"durable checkpoints: {err.reason}")
            else:
                checkpoint_rejections.extend(loaded.rejections)
                restored, checkpoint = loaded.restored, loaded.checkpoint
                origin = ResumeSource.RESUME_SOURCE_CHECKPOINT
        self._history.rejections.extend(rejections)
        self._history.checkpoint_rejections.extend(checkpoint_rejections)
        if restored is not None:
            detail = "; ".join(tried) if origin == ResumeSource.RESUME_SOURCE_CHECKPOINT else ""
            self._resumed(restored, origin, start, detail, checkpoint)
            return restored
        if not self._state.verified:
            raise ResumeImpossible(
                f"a restore failed after it wrote to the live state and nothing else could be "
                f"restored ({'; '.join(tried)}); refusing to train from a half-restored state"
            )
        if self._resume_required:
            raise ResumeImpossible(
                f"--resume: nothing of lineage {self.lineage_id!r} could be restored "
                f"({'; '.join(tried) or 'no checkpoint'})"
            )
        if tried:
            self._resumed(None, ResumeSource.RESUME_SOURCE_FRESH, start, "; ".join(tried))
        return None

    def _resumed(
        self,
        restored: Restored | None,
        origin: ResumeSource.ValueType,
        start_ns: int,
        detail: str,
        checkpoint: CheckpointRecord | None = None,
    ) -> None:
        elapsed_ms = (time.perf_counter_ns() - start_ns) / 1e6
        record = ResumeRecord(
            source=RollbackTier.ROLLBACK_TIER_CRASH_RESUME
            if origin == ResumeSource.RESUME_SOURCE_SHARED_MEMORY
            else RollbackTier.ROLLBACK_TIER_FULL,
            step=restored.global_step if restored else 0,
            epoch=restored.epoch if restored else 0,
            restore_ms=elapsed_ms,
            attempt=self._attempt,
            origin=origin,
            checkpoint_id=checkpoint.checkpoint_id if checkpoint else "",
            instance_id=(
                (checkpoint.instance_id if checkpoint else self.instance_id) if restored else ""
            ),
            detail=detail,
        )
        self._history.resumes.append(record)
        where = {
            ResumeSource.RESUME_SOURCE_SHARED_MEMORY: "shared memory",
            ResumeSource.RESUME_SOURCE_CHECKPOINT: f"checkpoint {record.checkpoint_id}",
            ResumeSource.RESUME_SOURCE_FRESH: "nothing (freshly built tensors)",
        }[origin]
        logger.warning(
            "attempt %d resumed from %s at step %d (epoch %d) in %.1f ms%s",
            self._attempt,
            where,
            record.step,
            record.epoch,
            elapsed_ms,
            f"; {detail}" if detail else "",
        )
        self._event(
            "tolaria.resumed",
            TelemetryLevel.TELEMETRY_LEVEL_WARNING,
            MessagePriority.MESSAGE_PRIORITY_HIGH,
            origin=ResumeSource.Name(origin),
            step=str(record.step),
            restore_ms=f"{elapsed_ms:.1f}",
            attempt=str(self._attempt),
            detail=detail,
        )

    def _baseline(self) -> None:
        """The step-0 snapshot, made durable: a target for anomalies in the first steps."""
        writer = self.writer
        if writer is None or not self._spec.snapshots.enabled:
            return
        pos = self._position
        self._persist_after_commit = True
        writer.capture(
            global_step=pos.global_step,
            epoch=pos.epoch,
            batch_index=pos.next_batch,
            epoch_end=False,
        )
        writer.fence()
        self._persist_after_commit = False

    # -- the loop's recovery points ------------------------------------------------------------

    def heartbeat(self) -> None:
        if self.participant is not None:
            self.participant.heartbeat(self._position.global_step, self._position.epoch)

    def boundary(self, stop: threading.Event) -> Response | None:
        """Before each step: wait out a freeze, take a halt, act on requests from outside."""
        p = self.participant
        if p is None:
            return None
        if p.frozen:
            p.wait_while_frozen(stop, self.heartbeat)
        if p.halt is not None:
            return self.halt(f"halted by the sidecar: {p.halt.reason}")
        if p.actions:
            return self._external(p.actions.popleft().record)
        return None

    def fence(self) -> None:
        if self.writer is not None:
            self.writer.fence()

    def after_step(self) -> None:
        self.heartbeat()
        pos = self._position
        if self.writer is not None and self.writer.due(pos.global_step):
            self.writer.capture(
                global_step=pos.global_step,
                epoch=pos.epoch,
                batch_index=pos.next_batch,
                epoch_end=False,
            )

    def schedule_checkpoint(self, epoch: int, global_step: int) -> None:
        """The hook's slow work (R1.1): when a durable checkpoint is due, mark the epoch-end
        snapshot for persisting; the sidecar writes it in the background, never the hook."""
        del global_step
        every = self._spec.checkpoints.every_epochs
        self._persist_next = every > 0 and (epoch + 1) % every == 0

    def epoch_end(self, *, health: HealthStatus.ValueType, loss: float, trained_steps: int) -> str:
        """After a clean epoch: counts progress for the rollback budget, snapshots the state
        (position = start of the next epoch) and reports progress; returns the sidecar's stop
        request (checkpoint-then-stop), if any."""
        self._ledger.epoch_completed(trained_steps=trained_steps)
        if self.writer is None:
            return ""
        persist = self._persist_next or self._persist_retry
        self._persist_next = self._persist_retry = False
        if self._spec.snapshots.at_epoch_end or persist:
            self.fence()
            self._persist_after_commit = persist  # read by the worker after its commit
            self.writer.capture(
                global_step=self._position.global_step,
                epoch=self._position.epoch,
                batch_index=0,
                epoch_end=True,
            )
        request = pb.HeartbeatRequest(
            run_id=self._run_id,
            epoch=self._position.epoch,
            global_step=self._position.global_step,
            phase=RunPhase.Running,
            health=health,
            loss=loss if math.isfinite(loss) else 0.0,
        )
        try:
            reply = self.link.heartbeat(request)
        except SidecarUnavailable:
            return ""
        return reply.stop_reason or "stop requested by the sidecar" if reply.stop_requested else ""

    def _commit(self, slot: int, generation: int) -> str:
        """Runs on the snapshot worker: tell the sidecar; persist it when asked (and remember
        a persist the sidecar could not take, see `_persist_retry`)."""
        persist, self._persist_after_commit = self._persist_after_commit, False
        try:
            self.link.commit(slot, generation)
            if persist:
                self.link.persist(slot, generation)
                self._persist_requested = (slot, generation)
        except SidecarUnavailable as err:
            self._persist_retry = self._persist_retry or persist
            return str(err)
        return ""

    def on_capture(self, result: CaptureResult) -> None:
        """Snapshot outcomes, seen on the training thread at the fence."""
        if result.error:
            self.commit_failures.append(result.error)
        elif result.committed:
            self.snapshots_committed += 1

    # -- anomalies -----------------------------------------------------------------------------

    def respond(self, anomaly: Anomaly) -> Response | None:
        """Plans and executes the response to `anomaly`; None: carry on. Never raises."""
        failed: set[RollbackTier.ValueType] = set()
        generation = 0
        raised = EmergencyLevel.EMERGENCY_LEVEL_UNSPECIFIED
        while True:
            facts = self._facts(anomaly, frozenset(failed))
            decision = plan(facts)
            self._record(decision, facts)
            if decision.level > raised:
                previous = generation
                generation = self.emergencies.raise_(
                    decision.level,
                    decision.kind,
                    decision.reason,
                    step=anomaly.global_step,
                    epoch=anomaly.epoch,
                    freeze=decision.action == RecoveryAction.RECOVERY_ACTION_FREEZE,
                )
                self._escalated(previous, decision.level)
                raised = decision.level
            action = decision.action
            if action == RecoveryAction.RECOVERY_ACTION_LOG:
                self.emergencies.resolve(generation, "logged")
                return None
            if action == RecoveryAction.RECOVERY_ACTION_FREEZE:
                if generation == 0:  # the sidecar did not take it: nobody to wait for
                    return self.halt(f"CRITICAL not broadcast: {decision.reason}")
                return None  # the next boundary waits frozen for the verdict (R7.4)
            if action == RecoveryAction.RECOVERY_ACTION_HALT:
                return self.halt(decision.reason)
            if self._roll_back(decision, anomaly):
                self.emergencies.resolve(
                    generation, f"{RollbackTier.Name(decision.tier)} rollback succeeded"
                )
                return Response(rolled_back=True)
            failed.add(decision.tier)

    def _facts(self, anomaly: Anomaly, failed: frozenset[RollbackTier.ValueType]) -> Facts:
        fast, full = self._require_tiers()
        max_step = anomaly.max_target_step
        window = _window(anomaly)
        ledger = self._ledger
        return Facts(
            level=anomaly.level,
            kind=anomaly.kind,
            detail=anomaly.detail,
            step=anomaly.global_step,
            epoch=anomaly.epoch,
            data_dependent=anomaly.data_dependent,
            window=window,
            window_record=ledger.window_record(window),
            inside_replayed_window=ledger.inside_replayed(window),
            can_quarantine=ledger.can_quarantine(window),
            rollbacks_in_epoch=ledger.rollbacks_by_epoch.get(anomaly.epoch, 0),
            rollbacks_without_progress=ledger.rollbacks_without_progress,
            rollbacks_in_run=ledger.rollbacks_in_run,
            fast_target=fast.target(max_step) if FAST not in failed else None,
            full_target=full.target(max_step) if FULL not in failed else None,
            failed_tiers=failed,
            coordinated=self.participant is not None and self.link.health.reachable,
            limits=self._limits,
        )

    def _record(self, decision: Decision, facts: Facts) -> None:
        record = RecoveryDecision(
            sequence=len(self._history.decisions) + 1,
            kind=decision.kind,
            level=decision.level,
            step=facts.step,
            epoch=facts.epoch,
            batch_index=facts.window.batch if facts.window and facts.window.batch >= 0 else 0,
            action=decision.action,
            tier=decision.tier,
            window_policy=decision.window_policy,
            reason=decision.reason,
            rollbacks_in_epoch=facts.rollbacks_in_epoch,
            rollbacks_in_run=facts.rollbacks_in_run,
            rollbacks_without_progress=facts.rollbacks_without_progress,
        )
        record.at.GetCurrentTime()
        self._history.decisions.append(record)
        log = (
            logger.error
            if decision.action == RecoveryAction.RECOVERY_ACTION_HALT
            else logger.warning
        )
        log(
            "recovery decision %d: %s%s: %s",
            record.sequence,
            RecoveryAction.Name(decision.action),
            f" on {RollbackTier.Name(decision.tier)}" if decision.tier else "",
            decision.reason,
        )
        self._event(
            EVENT_DECISION,
            TelemetryLevel.TELEMETRY_LEVEL_CRITICAL
            if decision.action == RecoveryAction.RECOVERY_ACTION_HALT
            else TelemetryLevel.TELEMETRY_LEVEL_WARNING,
            MessagePriority.MESSAGE_PRIORITY_CRITICAL,
            action=RecoveryAction.Name(decision.action),
            tier=RollbackTier.Name(decision.tier),
            reason=decision.reason,
        )

    def _escalated(self, previous: int, level: EmergencyLevel.ValueType) -> None:
        """Marks an emergency this trainer raised before, and escalated since, as such."""
        if previous == 0:
            return
        for record in reversed(self._history.emergencies):
            if record.signal.generation == previous:
                record.final_state = EmergencyState.EMERGENCY_STATE_ESCALATED
                record.escalated_to.append(level)
                return

    def _external(self, record: EmergencyRecord) -> Response | None:
        """A SEVERE or MAJOR raised outside this trainer (operator, cluster incident)."""
        pos = self._position
        anomaly = Anomaly(
            EmergencyLevel.ValueType(record.level),
            AnomalyKind.ValueType(record.kind or AnomalyKind.ANOMALY_KIND_CLUSTER_INCIDENT),
            record.reason,
            pos.global_step + 1,
            pos.epoch,
            pos.next_batch,
            restore_at_or_before=pos.global_step,
            external=True,
        )
        response = self.respond(anomaly)
        if response is not None and response.rolled_back:
            self.emergencies.resolve(record.generation, "rolled back")
        return response

    # -- executing a rollback ----------------------------------------------------------------

    def _roll_back(self, decision: Decision, anomaly: Anomaly) -> bool:
        fast, full = self._require_tiers()
        if decision.tier == FAST:
            opened = self._recorder.begin(
                FAST,
                decision.kind,
                decision.reason,
                from_step=anomaly.global_step,
                from_epoch=anomaly.epoch,
                budget_ns=ms_to_ns(self._spec.rollback.fast_ms),
            )
            try:
                restored = fast.restore(anomaly.max_target_step)
            except NothingToRestore as err:
                self._history.rejections.extend(err.rejected)
                opened.report.rejected_slots.extend(r.slot for r in err.rejected)
                self._recorder.finish(opened, error=str(err))
                return False
            except (StateMismatch, ShmError) as err:
                self._recorder.finish(opened, error=f"{type(err).__name__}: {err}")
                return False
            self._history.rejections.extend(restored.rejected)
            opened.report.rejected_slots.extend(r.slot for r in restored.rejected)
            opened.report.phases.extend(restored.phases)
            self._after_restore(opened, restored, anomaly, decision)
            return True
        opened = self._recorder.begin(
            FULL,
            decision.kind,
            decision.reason,
            from_step=anomaly.global_step,
            from_epoch=anomaly.epoch,
            budget_ns=int(self._spec.rollback.full_deadline_seconds * 1e9),
        )
        try:
            loaded: FromCheckpoint = full.rollback(
                rollback_id=opened.report.rollback_id,
                kind=decision.kind,
                detail=decision.reason,
                from_step=anomaly.global_step,
                from_epoch=anomaly.epoch,
                max_step=anomaly.max_target_step,
            )
        except TierFailed as err:
            self._history.checkpoint_rejections.extend(err.checkpoint_rejections)
            opened.report.phases.extend(err.phases)
            self._recorder.finish(opened, error=err.reason)
            return False
        self._history.checkpoint_rejections.extend(loaded.rejections)
        opened.report.checkpoint_id = loaded.checkpoint.checkpoint_id
        opened.report.phases.extend([*loaded.load_phases, *loaded.restored.phases])
        self._after_restore(opened, loaded.restored, anomaly, decision)
        return True

    def _after_restore(
        self, opened: OpenRollback, restored: Restored, anomaly: Anomaly, decision: Decision
    ) -> None:
        """Bookkeeping after a restore: the window policy, the budget, the report (R6.1a)."""
        pos = self._position
        report: RollbackReport = opened.report
        report.to_step = pos.global_step
        report.to_epoch = pos.epoch
        report.slot = restored.slot
        report.snapshot_generation = restored.generation
        policy = decision.window_policy
        window = _window(anomaly)
        replayed = None
        if policy == ReplayPolicy.REPLAY_POLICY_REPLAY or not (
            anomaly.data_dependent or anomaly.epoch_level
        ):
            first = pos.next_batch if pos.epoch == anomaly.epoch else 0
            last = self._batches() - 1 if anomaly.epoch_level else anomaly.batch_index
            replayed = ReplayedWindow(anomaly.epoch, first, last)
        elif anomaly.epoch_level:
            first = pos.next_batch if pos.epoch == anomaly.epoch else 0
            self._skip(report, anomaly.epoch, first, self._batches() - 1, policy)
        else:
            last_batch = self._batches() - 1
            for epoch in range(pos.epoch, anomaly.epoch + 1):
                first = pos.next_batch if epoch == pos.epoch else 0
                last = anomaly.batch_index if epoch == anomaly.epoch else last_batch
                if first <= last:
                    self._skip(report, epoch, first, last, policy)
            if policy == ReplayPolicy.REPLAY_POLICY_RESHUFFLE:
                first = pos.next_batch if pos.epoch == anomaly.epoch else 0
                replayed = ReplayedWindow(anomaly.epoch, first, anomaly.batch_index)
        self._ledger.rolled_back(
            epoch=anomaly.epoch, window=window, policy=policy, replayed=replayed
        )
        self._recorder.finish(opened)

    def _skip(
        self,
        report: RollbackReport,
        epoch: int,
        first: int,
        last: int,
        policy: ReplayPolicy.ValueType,
    ) -> None:
        window = SkippedWindow(epoch=epoch, first_batch=first, last_batch=last, policy=policy)
        self._history.skipped.append(window)
        report.skipped.CopyFrom(window)

    # -- halt ----------------------------------------------------------------------------------

    def halt(self, reason: str) -> Response:
        """L4 halt on the training thread: the newest verified snapshot is made durable, the
        live state is not (it may be what went wrong) (R7.4, R13.2)."""
        self.halt_reason = reason
        logger.critical("halting: %s", reason)
        self._event(
            EVENT_HALT,
            TelemetryLevel.TELEMETRY_LEVEL_CRITICAL,
            MessagePriority.MESSAGE_PRIORITY_CRITICAL,
            reason=reason,
        )
        self.fence()
        if self.participant is None or self.participant.halt is None:
            self._final_checkpoint()
        if self.participant is not None:
            self.participant.halt_handled.set()
        return Response(phase=RunPhase.Halted, reason=reason)

    def _final_checkpoint(self, *, at_end: bool = False) -> None:
        """Asks the sidecar to make the newest unrejected snapshot durable (the sidecar verifies
        it before writing) and waits a bounded time. Snapshots are only ever taken of verified
        state, so this never persists a half-restored one."""
        control = self.control
        if control is None or not self.slots:
            return
        newest = None
        for slot in self.slots:
            try:
                header = slot.header()
            except ShmError as err:
                logger.warning("slot %d not a final-checkpoint candidate: %s", slot.index, err)
                continue
            state = control.slot_state(slot.index)
            if not header.visible or state.rejected_generation == header.generation:
                continue
            if newest is None or header.generation > newest[1]:
                newest = (slot.index, header.generation)
        if newest is None:
            return
        if control.slot_state(newest[0]).durable_generation == newest[1]:
            return
        try:
            self.link.persist(*newest)
        except SidecarUnavailable as err:
            logger.error("final checkpoint not requested: %s", err)
            return
        deadline = time.monotonic() + FINAL_CHECKPOINT_WAIT_S
        while time.monotonic() < deadline:
            if control.slot_state(newest[0]).durable_generation == newest[1]:
                log = logger.info if at_end else logger.warning
                log("final checkpoint durable (slot %d, generation %d)", *newest)
                return
            time.sleep(0.05)
        logger.error("final checkpoint not durable within %.0f s", FINAL_CHECKPOINT_WAIT_S)

    def settle_durable(self) -> str:
        """Waits (bounded by `SETTLE_WAIT_S`) until the newest durable checkpoint asked of the
        sidecar is on disk or refused; says which. Drills call it so that what they test does
        not depend on how fast the disk is."""
        self.fence()  # the epoch-end capture, its commit and its persist request
        requested, control = self._persist_requested, self.control
        if requested is None or control is None:
            return "no durable checkpoint in flight"
        slot, generation = requested
        deadline = time.monotonic() + SETTLE_WAIT_S
        pinned = False  # the sidecar pins the slot while it writes; unpinned, not durable: failed
        while time.monotonic() < deadline:
            state = control.slot_state(slot)
            if state.durable_generation >= generation:
                return f"durable checkpoint of slot {slot} generation {generation} on disk"
            if state.rejected_generation == generation:
                return f"durable checkpoint of slot {slot} generation {generation} refused"
            if pinned and state.pinned_generation != generation:
                return f"durable checkpoint of slot {slot} generation {generation} failed"
            pinned = state.pinned_generation == generation
            time.sleep(0.02)
        return (
            f"durable checkpoint of slot {slot} generation {generation} "
            f"not on disk within {SETTLE_WAIT_S:.0f} s"
        )

    def _halt_from_watcher(self, record: EmergencyRecord) -> None:
        self.halt_reason = (
            f"halted by the sidecar while the training thread was unresponsive: {record.reason}"
        )
        self._write_halt_report(self.halt_reason)
        log = os.environ.get(POD_MODE_ENV)
        if log:
            message = TerminationMessage(RunPhase.Halted, 3, self.halt_reason)
            try:
                Path(log).write_text(message.encode(), encoding="utf-8")
            except OSError as err:
                logger.error("cannot write the termination message to %s: %s", log, err)

    def quarantined(self, epoch: int) -> frozenset[int]:
        """Samples recovery took out of training from `epoch` on (a poisoned sample)."""
        return self._ledger.quarantined(epoch)

    @property
    def quarantine(self) -> list[int]:
        """Every quarantined sample, for the report."""
        return sorted(self._ledger.quarantine)

    # -- helpers -------------------------------------------------------------------------------

    def _require_tiers(self) -> tuple[FastTier, FullTier]:
        if self._fast is None or self._full is None:
            raise SidecarUnavailable("not attached to the sidecar")
        return self._fast, self._full

    def _event(
        self,
        name: str,
        level: TelemetryLevel.ValueType,
        priority: MessagePriority.ValueType,
        **attributes: str,
    ) -> None:
        self._events.event(name, level, priority, **attributes)

    def status(self) -> pb.SidecarStatus | None:
        """The sidecar's view of the run (emergencies with acks, checkpoints) for the report."""
        try:
            return self.link.status()
        except SidecarUnavailable as err:
            logger.warning("sidecar status unavailable for the report: %s", err)
            return None

    def close(self, *, phase: RunPhase.ValueType, reason: str) -> None:
        """The end of the run: the newest snapshot is made durable if it is not yet (a
        checkpoint the sidecar missed while it was down, the last epoch's still in flight),
        then the trainer detaches with its final phase."""
        self.fence()
        if not self.link.health.reachable:
            try:  # a restarting sidecar: give it a moment to take the detach and the report query
                self.link.wait_ready(CLOSE_WAIT_S)
            except SidecarUnavailable as err:
                logger.warning("sidecar still unavailable at the end of the run: %s", err)
        if phase != RunPhase.Halted and self._spec.checkpoints.every_epochs > 0:
            self._final_checkpoint(at_end=True)
        try:
            self.link.detach(
                pb.DetachRequest(run_id=self._run_id, final_phase=phase, reason=reason)
            )
        except SidecarUnavailable as err:
            logger.warning("detach not delivered: %s", err)
        if self.participant is not None:
            self.participant.stop()
