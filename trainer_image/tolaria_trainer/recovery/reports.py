"""One builder for every rollback's report, whichever tier ran it (R6, R8.2).

`RollbackRecorder.begin` opens a Leyline `RollbackReport` (and marks the rollback in the
control block and the health inputs, so the sidecar's deadline watch and the UNHEALTHY state
see it); `finish` closes it with the outcome, appends it to the run history, tells the sidecar
and emits the event. Both tiers and crash resume go through here, so every rollback the run
report lists has the same fields.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from leyline import (
    SCHEMA_VERSION,
    AnomalyKind,
    MessagePriority,
    RollbackOutcome,
    RollbackPhase,
    RollbackReport,
    RollbackTier,
    TelemetryLevel,
)
from leyline.shm import ControlBlock, RollbackRecord, monotonic_ns
from tolaria_trainer.history import RunHistory
from tolaria_trainer.protocols import EventSink
from tolaria_trainer.recovery.link import SidecarLink, SidecarUnavailable

logger = logging.getLogger(__name__)

EVENT_ROLLBACK = "tolaria.rollback"


@dataclass
class OpenRollback:
    """A rollback in progress."""

    report: RollbackReport
    started_ns: int


class RollbackRecorder:
    """See the module docstring."""

    def __init__(
        self,
        *,
        run_id: str,
        link: SidecarLink,
        history: RunHistory,
        events: EventSink,
        set_in_progress: Callable[[bool], None],
    ) -> None:
        self._run_id = run_id
        self._link = link
        self._history = history
        self._events = events
        self._set_in_progress = set_in_progress
        self.control: ControlBlock | None = None
        self._count = 0

    def begin(
        self,
        tier: RollbackTier.ValueType,
        kind: AnomalyKind.ValueType,
        detail: str,
        *,
        from_step: int,
        from_epoch: int,
        budget_ns: int,
    ) -> OpenRollback:
        self._count += 1
        report = RollbackReport(
            version=SCHEMA_VERSION,
            rollback_id=f"{self._run_id}-rb{len(self._history.rollbacks) + 1}",
            tier=tier,
            reason=kind,
            detail=detail,
            from_step=from_step,
            from_epoch=from_epoch,
            budget_ns=budget_ns,
        )
        report.started_at.GetCurrentTime()
        self._set_in_progress(True)
        if self.control is not None:
            now = monotonic_ns()
            self.control.write_rollback(
                RollbackRecord(
                    rollback_id=self._count,
                    tier=tier,
                    phase=RollbackPhase.ROLLBACK_PHASE_PREPARE,
                    started_ns=now,
                    deadline_ns=now + budget_ns,
                    from_step=from_step,
                )
            )
        return OpenRollback(report, time.perf_counter_ns())

    def finish(self, rollback: OpenRollback, *, error: str = "") -> RollbackReport:
        """Closes the rollback: SUCCEEDED without `error`, FAILED with it."""
        report = rollback.report
        report.total_ns = time.perf_counter_ns() - rollback.started_ns
        report.outcome = (
            RollbackOutcome.ROLLBACK_OUTCOME_FAILED
            if error
            else RollbackOutcome.ROLLBACK_OUTCOME_SUCCEEDED
        )
        report.error = error
        if not error and report.total_ns > report.budget_ns:
            self._events.event(
                "tolaria.rollback_over_budget",
                TelemetryLevel.TELEMETRY_LEVEL_WARNING,
                MessagePriority.MESSAGE_PRIORITY_HIGH,
                rollback_id=report.rollback_id,
                total_ms=f"{report.total_ns / 1e6:.1f}",
                budget_ms=f"{report.budget_ns / 1e6:.0f}",
            )
        self._history.rollbacks.append(report)
        self._set_in_progress(False)
        if self.control is not None:
            self.control.write_rollback(RollbackRecord())
        try:
            self._link.report_rollback(report)
        except SidecarUnavailable as err:
            logger.warning("rollback report not delivered: %s", err)
        self._events.event(
            EVENT_ROLLBACK,
            TelemetryLevel.TELEMETRY_LEVEL_ERROR
            if error
            else TelemetryLevel.TELEMETRY_LEVEL_WARNING,
            MessagePriority.MESSAGE_PRIORITY_CRITICAL,
            rollback_id=report.rollback_id,
            tier=RollbackTier.Name(report.tier),
            outcome=RollbackOutcome.Name(report.outcome),
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
        return report
