"""The trainer's recovery plan: snapshots, both rollback tiers, crash resume, emergencies (R6, R7).

`Resilience` is what the loop calls at its few resilience points: `boundary`
before a step (freeze, halt, actions from outside), `fence` before the
optimizer step, `after_step` (heartbeat, snapshot cadence), `epoch_end`
(epoch snapshot, durable checkpoint when due) and `respond` when the detector
reports an anomaly. It decides by level (R7.1, R6.1a):

* SEVERE (loss explosion, non-finite loss or gradient): fast rollback to the
  newest valid snapshot older than the anomaly, skipping the offending window
  of batches by default. A second data-dependent anomaly inside the window, or
  a failed fast rollback, becomes MAJOR; too many rollbacks in one epoch
  becomes CRITICAL.
* MAJOR (accuracy collapse, failed fast tier): full rollback from the last
  durable checkpoint, loaded by the sidecar within its deadline; failure
  becomes CRITICAL.
* CRITICAL: raised through the sidecar, which freezes every participant; the
  run waits frozen until someone resolves it or the sidecar halts it (R7.4).
* MINOR: raised, logged, resolved.

It talks to the sidecar through `SidecarLink` (rare paths only) and to the
shared memory directly. When the sidecar is unreachable the run continues
DEGRADED: the fast tier still works from the slots it has mapped; what needs
the sidecar (full rollback, emergencies broadcast) is reported as unavailable.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum, auto
from pathlib import Path
from typing import Any

from leyline import (
    SCHEMA_VERSION,
    AnomalyKind,
    EmergencyLevel,
    EmergencyRecord,
    EmergencyResolution,
    EmergencySignal,
    EmergencyState,
    HealthStatus,
    MessagePriority,
    Participant,
    ReplayPolicy,
    ResumeRecord,
    RollbackOutcome,
    RollbackPhase,
    RollbackReport,
    RollbackRequest,
    RollbackTier,
    RunPhase,
    SkippedWindow,
    TelemetryLevel,
)
from leyline.shm import ControlBlock, RollbackRecord, ShmError, Slot, monotonic_ns, shm_dir
from leyline.shm import EmergencyRecord as SignalRecord
from leyline.spec import TolariaRunSpec, training_identity
from leyline.v1 import sidecar_pb2 as pb
from tolaria_trainer.clock import ms_to_ns
from tolaria_trainer.detector import Anomaly
from tolaria_trainer.history import RunHistory
from tolaria_trainer.participant import POD_MODE_ENV, EmergencyParticipant
from tolaria_trainer.protocols import EventSink, JsonDict
from tolaria_trainer.restore import NothingToRestore, Restored, Restorer, SnapshotRejected, timing
from tolaria_trainer.sidecar_link import SidecarLink, SidecarUnavailable
from tolaria_trainer.snapshots import CaptureResult, SnapshotWriter
from tolaria_trainer.state import TrainingState

logger = logging.getLogger(__name__)

EVENT_ROLLBACK = "tolaria.rollback"
EVENT_EMERGENCY = "tolaria.emergency"
EVENT_DEGRADED = "tolaria.sidecar_unavailable"
EVENT_HALT = "tolaria.halt"
CLOSE_WAIT_S = 15.0
"""At the end of a run, how long to wait for a restarting sidecar (it restarts in ~1 s)."""


@dataclass
class Position:
    """Where training is: the data position and step counters (R6.2). A snapshot document."""

    epoch: int = 0
    next_batch: int = 0
    global_step: int = 0
    epochs_completed: int = 0

    def state_dict(self) -> JsonDict:
        return {
            "epoch": self.epoch,
            "next_batch": self.next_batch,
            "global_step": self.global_step,
            "epochs_completed": self.epochs_completed,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.next_batch = int(state["next_batch"])
        self.global_step = int(state["global_step"])
        self.epochs_completed = int(state["epochs_completed"])


class Directive(Enum):
    CONTINUE = auto()
    ROLLED_BACK = auto()
    HALT = auto()
    SUSPEND = auto()


@dataclass(frozen=True)
class Response:
    directive: Directive
    reason: str = ""


class Resilience:
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
        events: EventSink,
        attempt: int,
        batches_per_epoch: Callable[[], int],
        write_halt_report: Callable[[str], None],
        set_rollback_in_progress: Callable[[bool], None],
    ) -> None:
        self._run_id = run_id
        self.instance_id = instance_id or ""
        """This run instance (R13.1); adopted from the sidecar when the environment has none."""
        self.lineage_id = ""
        self._spec = spec
        self.link = link
        self._link = link
        self._state = state
        self._position = position
        self._history = history
        self._events = events
        self._attempt = attempt
        self._batches = batches_per_epoch
        self._write_halt_report = write_halt_report
        self._set_rollback = set_rollback_in_progress
        self.control: ControlBlock | None = None
        self.slots: list[Slot] = []
        self.writer: SnapshotWriter | None = None
        self.participant: EmergencyParticipant | None = None
        self.fast_feasible = False
        self.degraded_reason = ""
        self._rollbacks = 0
        self._persist_next = False
        self._persist_after_commit = False
        self.halt_reason = ""
        self.snapshots_committed = 0
        self.commit_failures: list[str] = []

    # -- start-up --------------------------------------------------------------------------
    def attach(self, *, timeout_s: float) -> Restored | None:
        """Attaches to the sidecar's slots; resumes from the newest valid one after a crash."""
        self._link.wait_ready(timeout_s)
        request = pb.AttachRequest(
            version=SCHEMA_VERSION,
            run_id=self._run_id,
            state_bytes=self._state.estimated_bytes(),
            layout_fingerprint=self._state.fingerprint(),
            pid=os.getpid(),
            attempt=self._attempt,
            manifest_bytes=64 * 1024,
            instance_id=self.instance_id,
        )
        reply = self._link.attach(request, timeout_s)
        self.instance_id = reply.instance_id or self.instance_id
        self.lineage_id = reply.lineage_id or self.instance_id
        base = shm_dir()
        self.control = ControlBlock.attach(
            base / reply.control_block_name, instance_id=self.instance_id
        )
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
        self.writer = SnapshotWriter(
            state=self._state,
            slots=self.slots,
            control=self.control,
            spec=self._spec.snapshots,
            commit=self._commit,
            run_id=self._run_id,
            instance_id=self.instance_id,
            lineage_id=self.lineage_id,
            training=training_identity(self._spec.training),
            window=self._spec.budgets.latency_window,
        )
        self.writer.on_result = self.on_capture
        self.participant = EmergencyParticipant(
            self.control,
            attempt=self._attempt,
            on_halt_hung=self._halt_from_watcher,
            request_final_checkpoint=self._final_checkpoint,
        )
        self.participant.start()
        if reply.HasField("resume_slot"):
            return self._resume()
        return None

    def _resume(self) -> Restored | None:
        """Crash resume: the newest valid slot of this run, history included (R6.2)."""
        start = time.perf_counter_ns()
        restorer = Restorer(state=self._state, control=self._require_control())
        try:
            restored = restorer.restore(
                self.slots, before_step=None, budgets_ms=self._fast_budgets()
            )
        except NothingToRestore as err:
            logger.warning("crash resume found no snapshot (%s); starting from the manifest", err)
            self._history.rejections.extend(err.rejected)
            return None
        elapsed_ms = (time.perf_counter_ns() - start) / 1e6
        self._history.rejections.extend(restored.rejected)
        self._history.resumes.append(
            ResumeRecord(
                source=RollbackTier.ROLLBACK_TIER_CRASH_RESUME,
                step=restored.global_step,
                epoch=restored.epoch,
                restore_ms=elapsed_ms,
                attempt=self._attempt,
            )
        )
        logger.warning(
            "attempt %d resumed from slot %d at step %d (epoch %d, batch %d) in %.1f ms",
            self._attempt,
            restored.slot,
            restored.global_step,
            restored.epoch,
            restored.batch_index,
            elapsed_ms,
        )
        self._event(
            "tolaria.resumed",
            TelemetryLevel.TELEMETRY_LEVEL_WARNING,
            MessagePriority.MESSAGE_PRIORITY_HIGH,
            step=str(restored.global_step),
            restore_ms=f"{elapsed_ms:.1f}",
            attempt=str(self._attempt),
        )
        return restored

    # -- the loop's resilience points ----------------------------------------------------
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
            record = p.actions.popleft().record
            return self._external(record)
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

    def epoch_end(self, *, health: HealthStatus.ValueType, loss: float) -> str:
        """Snapshots the state after an epoch's hook (position = start of the next epoch) and
        reports progress; returns the sidecar's stop request (checkpoint-then-stop), if any."""
        if self.writer is None:
            return ""
        persist = self._persist_next
        self._persist_next = False
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
            reply = self._link.heartbeat(request)
        except SidecarUnavailable:
            return ""
        return reply.stop_reason or "stop requested by the sidecar" if reply.stop_requested else ""

    def _commit(self, slot: int, generation: int) -> str:
        """Runs on the snapshot worker: tell the sidecar; persist it when asked."""
        try:
            self._link.commit(slot, generation)
            if self._persist_after_commit:
                self._persist_after_commit = False
                self._link.persist(slot, generation)
        except SidecarUnavailable as err:
            return str(err)
        return ""

    def on_capture(self, result: CaptureResult) -> None:
        """Snapshot outcomes, seen on the training thread at the fence."""
        if result.error:
            self.commit_failures.append(result.error)
        elif result.committed:
            self.snapshots_committed += 1

    # -- anomalies -------------------------------------------------------------------------
    def respond(self, anomaly: Anomaly) -> Response:
        """Acts on an anomaly by level (see the module docstring); never raises."""
        level, kind, detail = anomaly.level, anomaly.kind, anomaly.detail
        if level == EmergencyLevel.EMERGENCY_LEVEL_SEVERE:
            if anomaly.data_dependent and anomaly.global_step <= self._history.window_end_step:
                level, detail = (
                    EmergencyLevel.EMERGENCY_LEVEL_MAJOR,
                    f"second anomaly in the skipped window: {detail}",
                )
            elif (
                self._history.rollbacks_by_epoch.get(anomaly.epoch, 0)
                >= self._spec.rollback.max_per_epoch
            ):
                level, kind = (
                    EmergencyLevel.EMERGENCY_LEVEL_CRITICAL,
                    AnomalyKind.ANOMALY_KIND_ROLLBACK_LOOP,
                )
                limit = self._spec.rollback.max_per_epoch
                detail = f"more than {limit} rollbacks in epoch {anomaly.epoch}: {detail}"
        generation = self._raise(level, kind, detail, anomaly)
        if level == EmergencyLevel.EMERGENCY_LEVEL_MINOR:
            self._resolve(generation, "logged")
            return Response(Directive.CONTINUE)
        if level == EmergencyLevel.EMERGENCY_LEVEL_SEVERE:
            if self._fast_rollback(anomaly, kind, detail):
                self._resolve(generation, "fast rollback succeeded")
                return Response(Directive.ROLLED_BACK)
            level, kind = (
                EmergencyLevel.EMERGENCY_LEVEL_MAJOR,
                AnomalyKind.ANOMALY_KIND_FAST_ROLLBACK_FAILED,
            )
            generation = self._raise(level, kind, f"fast rollback failed: {detail}", anomaly)
        if level == EmergencyLevel.EMERGENCY_LEVEL_MAJOR:
            if self._full_rollback(anomaly, kind, detail):
                self._resolve(generation, "full rollback succeeded")
                return Response(Directive.ROLLED_BACK)
            level = EmergencyLevel.EMERGENCY_LEVEL_CRITICAL
            detail = f"full rollback failed: {detail}"
            generation = self._raise(level, kind, detail, anomaly)
        return self._critical(generation, detail)

    def _critical(self, generation: int, detail: str) -> Response:
        """CRITICAL: freeze until resolved or halted by the sidecar; alone, halt now."""
        if generation == 0 or self.participant is None:
            return self.halt(f"CRITICAL with no sidecar to coordinate: {detail}")
        return Response(Directive.CONTINUE)  # the next boundary waits frozen for the verdict

    def _external(self, record: SignalRecord) -> Response | None:
        """A SEVERE or MAJOR raised outside this trainer (operator, cluster incident)."""
        anomaly = Anomaly(
            EmergencyLevel.ValueType(record.level),
            AnomalyKind.ValueType(record.kind or AnomalyKind.ANOMALY_KIND_CLUSTER_INCIDENT),
            record.reason,
            self._position.global_step + 1,
            self._position.epoch,
            self._position.next_batch,
        )
        if record.level == EmergencyLevel.EMERGENCY_LEVEL_SEVERE and self._fast_rollback(
            anomaly, anomaly.kind, record.reason
        ):
            self._resolve(record.generation, "fast rollback succeeded")
            return Response(Directive.ROLLED_BACK)
        if record.level >= EmergencyLevel.EMERGENCY_LEVEL_MAJOR and self._full_rollback(
            anomaly, anomaly.kind, record.reason
        ):
            self._resolve(record.generation, "full rollback succeeded")
            return Response(Directive.ROLLED_BACK)
        return None

    # -- tiers -----------------------------------------------------------------------------
    def _fast_budgets(self) -> tuple[float, float, float]:
        r = self._spec.rollback
        return r.prepare_ms, r.commit_ms, r.confirm_ms

    def _fast_rollback(self, anomaly: Anomaly, kind: AnomalyKind.ValueType, detail: str) -> bool:
        if self.writer is None or not self._spec.snapshots.enabled:
            return False
        self._rollbacks += 1
        rollback_id = f"{self._run_id}-rb{self._rollbacks}"
        started = time.perf_counter_ns()
        self._mark_rollback(
            rollback_id, RollbackTier.ROLLBACK_TIER_FAST, anomaly, self._spec.rollback.fast_ms / 1e3
        )
        report = RollbackReport(
            version=SCHEMA_VERSION,
            rollback_id=rollback_id,
            tier=RollbackTier.ROLLBACK_TIER_FAST,
            reason=kind,
            detail=detail,
            from_step=anomaly.global_step,
            from_epoch=anomaly.epoch,
            budget_ns=ms_to_ns(self._spec.rollback.fast_ms),
        )
        report.started_at.GetCurrentTime()
        try:
            self.writer.fence()
            restored = Restorer(
                state=self._state, control=self._require_control(), keep_live=frozenset({"history"})
            ).restore(self.slots, before_step=anomaly.global_step, budgets_ms=self._fast_budgets())
        except NothingToRestore as err:
            self._history.rejections.extend(err.rejected)
            report.rejected_slots.extend(r.slot for r in err.rejected)
            return self._finish_rollback(
                report, started, RollbackOutcome.ROLLBACK_OUTCOME_FAILED, str(err)
            )
        except Exception as err:  # boundary: a failed restore escalates, it does not crash the run
            logger.exception("fast rollback failed")
            return self._finish_rollback(
                report,
                started,
                RollbackOutcome.ROLLBACK_OUTCOME_FAILED,
                f"{type(err).__name__}: {err}",
            )
        self._history.rejections.extend(restored.rejected)
        report.rejected_slots.extend(r.slot for r in restored.rejected)
        report.phases.extend(restored.phases)
        self._apply_rollback(report, restored.slot, restored.generation, anomaly)
        return self._finish_rollback(
            report, started, RollbackOutcome.ROLLBACK_OUTCOME_SUCCEEDED, ""
        )

    def _full_rollback(self, anomaly: Anomaly, kind: AnomalyKind.ValueType, detail: str) -> bool:
        if self.writer is None:
            return False
        self._rollbacks += 1
        rollback_id = f"{self._run_id}-rb{self._rollbacks}"
        deadline_s = self._spec.rollback.full_deadline_seconds
        started = time.perf_counter_ns()
        self._mark_rollback(rollback_id, RollbackTier.ROLLBACK_TIER_FULL, anomaly, deadline_s)
        report = RollbackReport(
            version=SCHEMA_VERSION,
            rollback_id=rollback_id,
            tier=RollbackTier.ROLLBACK_TIER_FULL,
            reason=kind,
            detail=detail,
            from_step=anomaly.global_step,
            from_epoch=anomaly.epoch,
            budget_ns=int(deadline_s * 1e9),
        )
        report.started_at.GetCurrentTime()
        request = RollbackRequest(
            version=SCHEMA_VERSION,
            rollback_id=rollback_id,
            tier=RollbackTier.ROLLBACK_TIER_FULL,
            reason=kind,
            detail=detail,
            from_step=anomaly.global_step,
            from_epoch=anomaly.epoch,
            deadline_unix_ms=int(time.time() * 1000 + deadline_s * 1000),
            requested_by=Participant.PARTICIPANT_TRAINER,
            run_id=self._run_id,
        )
        request.requested_at.GetCurrentTime()
        try:
            self.writer.fence()
            reply = self._link.prepare_full_rollback(request, deadline_s)
            if not reply.ready:
                return self._finish_rollback(
                    report,
                    started,
                    RollbackOutcome.ROLLBACK_OUTCOME_FAILED,
                    reply.error or "no checkpoint",
                )
            report.phases.extend(reply.phases)
            report.checkpoint_id = reply.checkpoint.checkpoint_id
            slot = self._slot(reply.slot.index)
            header = slot.header()
            self.writer.adopt(slot.index, header.generation)
            restorer = Restorer(
                state=self._state, control=self._require_control(), keep_live=frozenset({"history"})
            )
            manifest = restorer.prepare(slot, header, self._state.fingerprint())
            t0 = time.perf_counter_ns()
            pairs = restorer.commit(slot, header, manifest)
            t1 = time.perf_counter_ns()
            restorer.confirm(slot, pairs)
            t2 = time.perf_counter_ns()
            r = self._spec.rollback
            report.phases.extend(
                [
                    timing(RollbackPhase.ROLLBACK_PHASE_COMMIT, t1 - t0, r.commit_ms),
                    timing(RollbackPhase.ROLLBACK_PHASE_CONFIRM, t2 - t1, r.confirm_ms),
                ]
            )
        except (SidecarUnavailable, SnapshotRejected, ValueError) as err:
            return self._finish_rollback(
                report, started, RollbackOutcome.ROLLBACK_OUTCOME_FAILED, str(err)
            )
        except Exception as err:  # boundary: escalate, never crash
            logger.exception("full rollback failed")
            return self._finish_rollback(
                report,
                started,
                RollbackOutcome.ROLLBACK_OUTCOME_FAILED,
                f"{type(err).__name__}: {err}",
            )
        self._apply_rollback(report, header.index, header.generation, anomaly)
        return self._finish_rollback(
            report, started, RollbackOutcome.ROLLBACK_OUTCOME_SUCCEEDED, ""
        )

    def _apply_rollback(
        self, report: RollbackReport, slot: int, generation: int, anomaly: Anomaly
    ) -> None:
        """Position bookkeeping after a restore: skip window, counters (R6.1a)."""
        pos = self._position
        report.to_step = pos.global_step
        report.to_epoch = pos.epoch
        report.slot = slot
        report.snapshot_generation = generation
        self._history.rollbacks_by_epoch[anomaly.epoch] = (
            self._history.rollbacks_by_epoch.get(anomaly.epoch, 0) + 1
        )
        if not anomaly.data_dependent:
            return
        self._history.window_end_step = max(self._history.window_end_step, anomaly.global_step)
        policy = self._spec.rollback.replay_policy
        if policy == ReplayPolicy.REPLAY_POLICY_REPLAY:
            return  # the same batches again, in the same order
        last_batch = self._batches() - 1
        for epoch in range(pos.epoch, anomaly.epoch + 1):
            first = pos.next_batch if epoch == pos.epoch else 0
            last = anomaly.batch_index if epoch == anomaly.epoch else last_batch
            if first <= last:
                window = SkippedWindow(
                    epoch=epoch,
                    first_batch=first,
                    last_batch=last,
                    policy=ReplayPolicy.ValueType(policy),
                )
                self._history.skipped.append(window)
                if epoch == anomaly.epoch:
                    report.skipped.CopyFrom(window)

    def _finish_rollback(
        self,
        report: RollbackReport,
        started: int,
        outcome: RollbackOutcome.ValueType,
        error: str,
    ) -> bool:
        report.total_ns = time.perf_counter_ns() - started
        report.outcome = outcome
        report.error = error
        if (
            outcome == RollbackOutcome.ROLLBACK_OUTCOME_SUCCEEDED
            and report.total_ns > report.budget_ns
        ):
            self._event(
                "tolaria.rollback_over_budget",
                TelemetryLevel.TELEMETRY_LEVEL_WARNING,
                MessagePriority.MESSAGE_PRIORITY_HIGH,
                rollback_id=report.rollback_id,
                total_ms=f"{report.total_ns / 1e6:.1f}",
                budget_ms=f"{report.budget_ns / 1e6:.0f}",
            )
        self._history.rollbacks.append(report)
        self._clear_rollback()
        try:
            self._link.report_rollback(report)
        except SidecarUnavailable as err:
            logger.warning("rollback report not delivered: %s", err)
        level = (
            TelemetryLevel.TELEMETRY_LEVEL_WARNING
            if not error
            else TelemetryLevel.TELEMETRY_LEVEL_ERROR
        )
        self._event(
            EVENT_ROLLBACK,
            level,
            MessagePriority.MESSAGE_PRIORITY_CRITICAL,
            rollback_id=report.rollback_id,
            tier=RollbackTier.Name(report.tier),
            outcome=RollbackOutcome.Name(outcome),
            from_step=str(report.from_step),
            to_step=str(report.to_step),
            total_ms=f"{report.total_ns / 1e6:.1f}",
            error=error,
        )
        if error:
            logger.error("rollback %s failed: %s", report.rollback_id, error)
        else:
            logger.warning(
                "rollback %s (%s) from step %d to step %d in %.1f ms",
                report.rollback_id,
                RollbackTier.Name(report.tier),
                report.from_step,
                report.to_step,
                report.total_ns / 1e6,
            )
        return not error

    def _mark_rollback(
        self, rollback_id: str, tier: int, anomaly: Anomaly, budget_s: float
    ) -> None:
        self._set_rollback(True)
        if self.control is None:
            return
        now = monotonic_ns()
        self.control.write_rollback(
            RollbackRecord(
                rollback_id=self._rollbacks,
                tier=tier,
                phase=RollbackPhase.ROLLBACK_PHASE_PREPARE,
                started_ns=now,
                deadline_ns=now + int(budget_s * 1e9),
                from_step=anomaly.global_step,
            )
        )

    def _clear_rollback(self) -> None:
        self._set_rollback(False)
        if self.control is not None:
            self.control.write_rollback(RollbackRecord())

    # -- emergencies -----------------------------------------------------------------------
    def _raise(
        self,
        level: EmergencyLevel.ValueType,
        kind: AnomalyKind.ValueType,
        detail: str,
        anomaly: Anomaly,
    ) -> int:
        signal = EmergencySignal(
            version=SCHEMA_VERSION,
            level=level,
            reason=detail,
            origin="tolaria-trainer",
            monotonic_time_ms=monotonic_ns() // 1_000_000,
            run_id=self._run_id,
            kind=kind,
            global_step=anomaly.global_step,
            epoch=anomaly.epoch,
            source=Participant.PARTICIPANT_TRAINER,
        )
        signal.triggered_at.GetCurrentTime()
        record = EmergencyRecord(signal=signal, final_state=EmergencyState.EMERGENCY_STATE_RAISED)
        self._history.emergencies.append(record)
        priority = MessagePriority.MESSAGE_PRIORITY_CRITICAL
        self._event(
            EVENT_EMERGENCY,
            TelemetryLevel.TELEMETRY_LEVEL_CRITICAL
            if level >= EmergencyLevel.EMERGENCY_LEVEL_SEVERE
            else TelemetryLevel.TELEMETRY_LEVEL_WARNING,
            priority,
            emergency_level=EmergencyLevel.Name(level),
            kind=AnomalyKind.Name(kind),
            detail=detail,
        )
        try:
            reply = self._link.raise_emergency(signal)
        except SidecarUnavailable as err:
            logger.error("emergency %s not broadcast: %s", EmergencyLevel.Name(level), err)
            return 0
        signal.generation = reply.generation
        record.signal.generation = reply.generation
        if self.participant is not None:
            self.participant.own(reply.generation)
            if level == EmergencyLevel.EMERGENCY_LEVEL_CRITICAL:
                self.participant.freeze_now()  # before the watcher sees the broadcast
        return int(reply.generation)

    def _resolve(self, generation: int, reason: str) -> None:
        if generation == 0:
            return
        for record in reversed(self._history.emergencies):
            if record.signal.generation == generation:
                record.final_state = EmergencyState.EMERGENCY_STATE_RESOLVED
                record.resolution.CopyFrom(
                    EmergencyResolution(
                        version=SCHEMA_VERSION,
                        generation=generation,
                        resolved_by="tolaria-trainer",
                        reason=reason,
                        run_id=self._run_id,
                    )
                )
                record.resolution.resolved_at.GetCurrentTime()
                break
        try:
            self._link.resolve_emergency(
                EmergencyResolution(
                    version=SCHEMA_VERSION,
                    generation=generation,
                    resolved_by="tolaria-trainer",
                    reason=reason,
                    run_id=self._run_id,
                )
            )
        except SidecarUnavailable as err:
            logger.warning("resolution of emergency %d not delivered: %s", generation, err)

    # -- halt ------------------------------------------------------------------------------
    def halt(self, reason: str) -> Response:
        """L4 halt on the training thread: last snapshot kept, checkpoint attempted (R7.4)."""
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
        return Response(Directive.HALT, reason)

    def _final_checkpoint(self) -> None:
        """Asks the sidecar to make the newest committed snapshot durable; waits a bounded time."""
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
            if header.visible and (newest is None or header.generation > newest[1]):
                newest = (slot.index, header.generation)
        if newest is None:
            return
        try:
            self._link.persist(*newest)
        except SidecarUnavailable as err:
            logger.error("final checkpoint not requested: %s", err)
            return
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if control.slot_state(newest[0]).durable_generation == newest[1]:
                logger.warning("final checkpoint durable (slot %d, generation %d)", *newest)
                return
            time.sleep(0.05)
        logger.error("final checkpoint not durable within 10 s")

    def _halt_from_watcher(self, record: SignalRecord) -> None:
        self.halt_reason = (
            f"halted by the sidecar while the training thread was unresponsive: {record.reason}"
        )
        self._write_halt_report(self.halt_reason)
        log = os.environ.get(POD_MODE_ENV)
        if log:
            message = {"phase": "Halted", "exitCode": 3, "reason": self.halt_reason[:3000]}
            try:
                Path(log).write_text(json.dumps(message), encoding="utf-8")
            except OSError as err:
                logger.error("cannot write the termination message to %s: %s", log, err)

    # -- helpers ---------------------------------------------------------------------------
    def _require_control(self) -> ControlBlock:
        if self.control is None:
            raise SidecarUnavailable("not attached to the sidecar")
        return self.control

    def _slot(self, index: int) -> Slot:
        for slot in self.slots:
            if slot.index == index:
                return slot
        raise SnapshotRejected(f"sidecar named slot {index}, which this trainer has not mapped")

    def _event(
        self,
        name: str,
        level: TelemetryLevel.ValueType,
        priority: MessagePriority.ValueType,
        **attributes: str,
    ) -> None:
        self._events.event(name, level, priority, **attributes)

    def close(self, *, phase: RunPhase.ValueType, reason: str) -> None:
        self.fence()
        if not self._link.health.reachable:
            try:  # a restarting sidecar: give it a moment to take the detach and the report query
                self._link.wait_ready(CLOSE_WAIT_S)
            except SidecarUnavailable as err:
                logger.warning("sidecar still unavailable at the end of the run: %s", err)
        try:
            self._link.detach(
                pb.DetachRequest(run_id=self._run_id, final_phase=phase, reason=reason)
            )
        except SidecarUnavailable as err:
            logger.warning("detach not delivered: %s", err)
        if self.participant is not None:
            self.participant.stop()


def sidecar_status(link: SidecarLink) -> pb.SidecarStatus | None:
    """The sidecar's view of the run (emergencies with acks, checkpoints) for the report."""
    try:
        return link.status()
    except SidecarUnavailable as err:
        logger.warning("sidecar status unavailable for the report: %s", err)
        return None
