"""The sidecar's view of its trainer: what the trainer last said (Attach, Heartbeat, Detach),
the full rollback under way, a stop asked of it, and the checkpoint failures and refusals it
should hear about.

Updated by the `Sidecar` on servicer threads and by `ViewedEventLog` on whichever thread
publishes a `checkpoint_failed` event; read into every status answer. The view keeps state
behind its own lock and answers with Leyline messages; it never publishes, logs, or calls
another component, so it is never the one that blocks (the `Sidecar` does the telling).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable

from google.protobuf.message import Message

from leyline import (
    CheckpointFailure,
    CheckpointRejection,
    HealthStatus,
    RollbackRequest,
    RunPhase,
)
from leyline.v1 import sidecar_pb2 as pb
from tolaria_sidecar.events import EventLog
from tolaria_sidecar.protocols import EventKind

FAILURES_KEPT = 100
"""Checkpoint failures (and refusals) shown in the status (the event stream has them all)."""


class TrainerView:
    """What the sidecar knows of its trainer; see the module docstring. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._attached = False
        self._pid = 0
        self._attempt = 0
        self._phase: RunPhase.ValueType = RunPhase.Pending
        self._epoch = 0
        self._global_step = 0
        self._health: HealthStatus.ValueType = HealthStatus.HEALTH_STATUS_UNKNOWN
        self._loss = 0.0
        self._heartbeat_wall_ns = 0
        self._progress_event_ns = 0
        self._active_rollback: RollbackRequest | None = None
        self._stop_reason = ""
        self._failures: deque[CheckpointFailure] = deque(maxlen=FAILURES_KEPT)
        self._rejections: deque[CheckpointRejection] = deque(maxlen=FAILURES_KEPT)

    # -- the trainer's own words --------------------------------------------------------------

    def attach(self, *, pid: int, attempt: int, running: bool) -> None:
        """A trainer is attached: `running` on its Attach, False when a restarted sidecar
        finds one attached already (its phase is not known yet)."""
        with self._lock:
            self._attached = True
            self._pid = pid
            self._attempt = attempt
            if running:
                self._phase = RunPhase.Running

    @property
    def phase(self) -> RunPhase.ValueType:
        """The phase the trainer last reported (RollingBack during a full rollback)."""
        with self._lock:
            return self._phase

    @property
    def pid(self) -> int:
        """The pid of the trainer last attached (0: none yet)."""
        with self._lock:
            return self._pid

    def detach(self, phase: RunPhase.ValueType) -> pb.ProgressEvent:
        """The trainer detached in `phase` (0: unchanged); returns the progress to publish."""
        with self._lock:
            self._attached = False
            if phase:
                self._phase = phase
            return self._progress()

    def beat(
        self, request: pb.HeartbeatRequest, *, now_ns: int, interval_ns: int
    ) -> pb.ProgressEvent | None:
        """Records one heartbeat; returns the progress to publish when the last one published
        is `interval_ns` old (None otherwise), so the event stream is not flooded."""
        with self._lock:
            self._epoch = request.epoch
            self._global_step = request.global_step
            self._phase = request.phase or self._phase
            self._health = request.health or self._health
            self._loss = request.loss
            self._heartbeat_wall_ns = time.time_ns()
            if self._progress_event_ns and now_ns - self._progress_event_ns < interval_ns:
                return None
            self._progress_event_ns = now_ns
            return self._progress()

    def _progress(self) -> pb.ProgressEvent:
        event = pb.ProgressEvent(
            epoch=self._epoch, global_step=self._global_step, health=self._health, phase=self._phase
        )
        if self._heartbeat_wall_ns:
            event.heartbeat.FromNanoseconds(self._heartbeat_wall_ns)
        return event

    # -- what the sidecar adds ----------------------------------------------------------------

    def start_rollback(self, request: RollbackRequest) -> None:
        with self._lock:
            self._active_rollback = request
            self._phase = RunPhase.RollingBack

    def finish_rollback(self, rollback_id: str) -> None:
        """Ends the full rollback `rollback_id` if it is the one under way."""
        with self._lock:
            active = self._active_rollback
            if active is not None and active.rollback_id == rollback_id:
                self._active_rollback = None
                self._phase = RunPhase.Running

    def request_stop(self, reason: str) -> None:
        with self._lock:
            self._stop_reason = reason

    @property
    def stop_reason(self) -> str:
        """Why the trainer is asked to stop; empty while it is not."""
        with self._lock:
            return self._stop_reason

    def add_failures(self, failures: Iterable[CheckpointFailure]) -> None:
        with self._lock:
            self._failures.extend(failures)

    def add_rejections(self, rejections: Iterable[CheckpointRejection]) -> None:
        """Remembers checkpoints a load refused, once each (file and reason)."""
        with self._lock:
            known = {(r.file_name, r.reason) for r in self._rejections}
            for rejection in rejections:
                if (rejection.file_name, rejection.reason) not in known:
                    self._rejections.append(rejection)

    # -- the answer ---------------------------------------------------------------------------

    def fill(self, status: pb.SidecarStatus) -> None:
        """Writes the view's fields into `status` (phase, progress, health, attachment,
        heartbeat, rollback under way, failures and refusals)."""
        with self._lock:
            status.phase = self._phase
            status.epoch = self._epoch
            status.global_step = self._global_step
            status.trainer_attached = self._attached
            status.health = self._health
            status.checkpoint_failures.extend(self._failures)
            status.checkpoint_rejections.extend(self._rejections)
            if self._heartbeat_wall_ns:
                status.last_heartbeat.FromNanoseconds(self._heartbeat_wall_ns)
            if self._active_rollback is not None:
                status.active_rollback.CopyFrom(self._active_rollback)


class ViewedEventLog:
    """The event log, with each `checkpoint_failed` also kept in the view (for the status)."""

    def __init__(self, log: EventLog, view: TrainerView) -> None:
        self._log = log
        self._view = view

    def publish(self, kind: EventKind, message: Message) -> int:
        if kind == "checkpoint_failed" and isinstance(message, CheckpointFailure):
            self._view.add_failures((message,))
        return self._log.publish(kind, message)
