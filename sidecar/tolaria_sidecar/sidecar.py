"""One run's sidecar, wired: the object the servicers call (`protocols.ServicedSidecar`),
holding the run's components and their threads.

`Sidecar` owns the run's control block (`control_block.open_control_block`), the durable store
(`store.open_store`), the slot manager, the emergency machine, the event log and the view of
the trainer, plus three threads: the emergency monitor, the verifier and the persister
(`workers`). `serving.serve` builds it, starts it, and stops and releases it; the servicers
reach it only through `ServicedSidecar`. Its methods update the view and tell the event log,
the metrics and the emergency machine; they never block the trainer: the trainer's only waits
are RPCs that return after a header read, and the emergency path is shared memory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from leyline import (
    CheckpointRecord,
    CheckpointRejection,
    EmergencyLevel,
    HealthStatus,
    RollbackOutcome,
    RollbackReport,
    RollbackRequest,
    RollbackTier,
    RunPhase,
    WalRecovery,
)
from leyline.shm import PARTICIPANT_FLAG_ATTACHED, remove_instance_segments
from leyline.v1 import sidecar_pb2 as pb
from tolaria_sidecar.checkpoints import DurableStore
from tolaria_sidecar.config import SidecarConfig
from tolaria_sidecar.control_block import open_control_block
from tolaria_sidecar.emergency import TRAINER, EmergencyMachine, EmergencyMonitor
from tolaria_sidecar.errors import ConfigInvalid
from tolaria_sidecar.events import EventLog
from tolaria_sidecar.metrics import SidecarMetrics
from tolaria_sidecar.persist_guard import PersistGuard
from tolaria_sidecar.protocols import Clock, MonotonicClock
from tolaria_sidecar.protocols import DurableStore as StoreProtocol
from tolaria_sidecar.slots import SlotManager
from tolaria_sidecar.store import TimedStore, open_store
from tolaria_sidecar.view import TrainerView, ViewedEventLog
from tolaria_sidecar.workers import Persister, Verifier

logger = logging.getLogger(__name__)


class Sidecar:
    """One run's sidecar state and workers; see the module docstring."""

    def __init__(
        self,
        config: SidecarConfig,
        *,
        registry: CollectorRegistry,
        clock: Clock | None = None,
        store: StoreProtocol | None = None,
        copy_bytes_per_second: float | None = None,
    ) -> None:
        """Opens the control block, the store and the slots; starts nothing (see `start`).

        `store` and `copy_bytes_per_second` replace the real store and the bandwidth
        measurement in tests.
        """
        self.config = config
        self.clock: Clock = clock or MonotonicClock()
        self.metrics = SidecarMetrics(registry)
        self.view = TrainerView()
        self.events = EventLog(
            config.run_id,
            capacity=config.tuning.event_buffer,
            on_drop=self.metrics.events_dropped.inc,
        )
        sink = ViewedEventLog(self.events, self.view)
        self.control = open_control_block(config)
        self.guard = PersistGuard(config.drills, config.checkpoint_dir)
        self._own_store: DurableStore | None = None
        self.wal_recovery: WalRecovery | None = None
        """What opening the checkpoint directory found (R13.5), when it found anything; every
        Attach and status answer carries it for the life of this sidecar."""
        if store is None:
            try:
                self._own_store = open_store(config, self.guard)
            except ConfigInvalid:
                self.control.close()
                raise
            store = TimedStore(self._own_store, self.metrics)
            self.view.add_failures(self._own_store.wal.aborted())  # failures before a restart
            if self._own_store.recovery_found:
                self.wal_recovery = self._own_store.recovery
        self.store: StoreProtocol = store
        self.slots = SlotManager(
            run_id=config.run_id,
            instance_id=config.instance_id,
            lineage_id=config.lineage_id,
            resume=config.resume,
            control=self.control,
            directory=config.shm_dir,
            snapshots=config.snapshots,
            rollback=config.rollback,
            tuning=config.tuning,
            store=store,
            guard=self.guard,
            events=sink,
            metrics=self.metrics,
            clock=self.clock,
            copy_bytes_per_second=copy_bytes_per_second,
        )
        self.machine = EmergencyMachine(
            run_id=config.run_id,
            control=self.control,
            emergency=config.emergency,
            detection=config.detection,
            rollback=config.rollback,
            tuning=config.tuning,
            clock=self.clock,
            events=sink,
            metrics=self.metrics,
        )
        self.monitor = EmergencyMonitor(self.machine, config.tuning)
        self.verifier = Verifier(self.slots)
        self.persister = Persister(self.slots)
        self._started_ns = self.clock.now_ns()
        self.metrics.track_heartbeat_age(self._heartbeat_age)
        self.metrics.stall_threshold.set(config.detection.stall_seconds)
        self.metrics.fast_tier_enabled.set(1 if config.snapshots.enabled else 0)
        newest = store.committed()
        if newest:  # checkpoints of an earlier sidecar (a restart, a resumed run) count
            self.metrics.checkpoint_committed(newest[0].committed_at.ToNanoseconds() / 1e9)

    def start(self) -> None:
        """Re-attaches slots left by a previous sidecar, then starts the workers."""
        for index, generation in self.slots.restore():
            self.verifier.submit(index, generation)
        line = self.control.participant(TRAINER)
        if line.flags & PARTICIPANT_FLAG_ATTACHED:
            # A trainer was attached before this sidecar (re)started: it is still required
            # for CRITICAL until it detaches, and its heartbeat is watched.
            self.machine.attach_trainer(line.attempt)
            self.view.attach(pid=line.pid, attempt=line.attempt, running=False)
            self.metrics.trainer_attached.set(1)
        self.verifier.start()
        self.persister.start()
        self.monitor.start()

    def stop(self, *, grace_s: float) -> None:
        """Stops the workers; a checkpoint still being written after `grace_s` is abandoned."""
        self.events.close()
        if not self.persister.stop(grace_s):
            logger.warning("checkpoint write still running after %.1f s; abandoned", grace_s)
        else:
            self.close_store()
        self.monitor.stop(grace_s)
        self.verifier.stop(grace_s)

    def close_store(self) -> None:
        if self._own_store is not None:
            self._own_store.close()
            self._own_store = None

    def release(self, *, unlink: bool) -> None:
        """Unmaps the segments; `unlink` removes this instance's segments (local mode), by
        exact name: another run's segments are never touched."""
        self.slots.close(unlink=unlink)
        self.control.close()
        if unlink:
            remove_instance_segments(self.config.instance_id, self.config.shm_dir)

    # -- what the servicers report ------------------------------------------------------------

    def _heartbeat_age(self) -> float:
        beat = self.control.participant(TRAINER).heartbeat_ns
        return (self.clock.now_ns() - (beat or self._started_ns)) / 1e9

    def trainer_attached(self, *, pid: int, attempt: int) -> None:
        self.machine.attach_trainer(attempt)
        self.metrics.trainer_attached.set(1)
        for index, generation in self.slots.unverified():
            self.verifier.submit(index, generation)
        self.view.attach(pid=pid, attempt=attempt, running=True)
        self._show_phase()
        logger.info("trainer attached (pid %d, attempt %d)", pid, attempt)

    def _show_phase(self) -> None:
        self.metrics.set_phase(RunPhase.Name(self.view.phase))

    def trainer_detached(self, phase: RunPhase.ValueType, reason: str) -> None:
        self.machine.detach_trainer()
        self.metrics.trainer_attached.set(0)
        progress = self.view.detach(phase)
        self._show_phase()
        self.events.publish("progress", progress)
        logger.info("trainer detached (%s): %s", RunPhase.Name(phase), reason)

    def heartbeat(self, request: pb.HeartbeatRequest) -> None:
        interval_ns = int(self.config.tuning.progress_event_interval_seconds * 1e9)
        progress = self.view.beat(request, now_ns=self.clock.now_ns(), interval_ns=interval_ns)
        self._show_phase()
        if progress is not None:
            self.events.publish("progress", progress)

    def rollback_started(self, request: RollbackRequest) -> None:
        self.view.start_rollback(request)
        self._show_phase()
        self.events.publish("rollback_started", pb.RollbackStarted(request=request))
        logger.warning("full rollback %s started: %s", request.rollback_id, request.detail)

    def rollback_finished(self, report: RollbackReport) -> None:
        pending = self.machine.finish_rollback(report.rollback_id)
        tier = RollbackTier.Name(report.tier)
        outcome = RollbackOutcome.Name(report.outcome)
        self.metrics.rollback_reported(
            tier,
            outcome,
            report.total_ns / 1e9,
            deadline_missed=self.machine.deadline_missed_for(report.rollback_id),
        )
        self.view.finish_rollback(report.rollback_id)
        self._show_phase()
        self.events.publish("rollback_finished", report)
        logger.info(
            "%s rollback %s reported %s%s",
            tier,
            report.rollback_id,
            outcome,
            " (deadline cleared)" if pending else "",
        )

    @property
    def trainer_pid(self) -> int:
        """The pid of the trainer last attached (0: none yet)."""
        return self.view.pid

    @property
    def stop_requested(self) -> bool:
        return bool(self.view.stop_reason)

    @property
    def stop_reason(self) -> str:
        return self.view.stop_reason

    def checkpoint_done(self, stop_after: bool, reason: str) -> None:
        if stop_after:
            self.view.request_stop(f"checkpoint-then-stop: {reason}")
            logger.warning("checkpoint durable; the trainer is asked to stop (%s)", reason)

    def checkpoints_rejected(self, rejections: Sequence[CheckpointRejection]) -> None:
        """Remembers checkpoints a load refused, for the status and the run report."""
        self.view.add_rejections(rejections)

    def checkpoint_of(self, generation: int) -> CheckpointRecord | None:
        return next(
            (r for r in self.store.committed() if r.snapshot_generation == generation), None
        )

    def status(self) -> pb.SidecarStatus:
        feasibility = self.slots.feasibility
        status = pb.SidecarStatus(
            run_id=self.config.run_id,
            fast_tier_feasible=bool(feasibility and feasibility.fast_tier_feasible),
            degraded_reason=feasibility.degraded_reason if feasibility else "",
            instance_id=self.config.instance_id,
            lineage_id=self.config.lineage_id,
        )
        self.view.fill(status)
        status.slots.extend(self.slots.infos())
        committed = self.store.committed()
        if committed:
            status.last_checkpoint.CopyFrom(committed[0])
        status.checkpoints.extend(reversed(committed))
        active = self.machine.active()
        if active is not None:
            status.active_emergency.CopyFrom(active)
            if active.level == EmergencyLevel.EMERGENCY_LEVEL_CRITICAL:
                status.health = HealthStatus.HEALTH_STATUS_CRITICAL
        status.emergencies.extend(self.machine.history())
        if self.wal_recovery is not None:
            status.wal_recovery.CopyFrom(self.wal_recovery)
        return status
