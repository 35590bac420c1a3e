"""One run's sidecar process: wiring, background workers, gRPC servers, start and shutdown.

`Sidecar` owns the run's control block (created, or re-attached when valid so its emergency
generation carries on), the slot manager, the durable store, the emergency machine and the
event log, plus three threads: the emergency monitor, the verifier (hashes committed slots)
and the persister (one durable write at a time; a newer request replaces a queued older one).
`serve` starts the `TrainerLink` server on the Unix socket (mode 0600) and, when asked, the
token-authenticated `SidecarControl` server on TCP, and the metrics endpoint; `run` is the
process: READY line, SIGTERM/SIGINT, graceful stop within `Tuning.shutdown_grace_seconds`.

The sidecar never imports torch and never blocks the trainer: the trainer's only waits are
RPCs that return after a header read, and the emergency path is shared memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import grpc
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry

from leyline import (
    CheckpointFailure,
    CheckpointRecord,
    CheckpointRejection,
    EmergencyLevel,
    HealthStatus,
    RollbackReport,
    RollbackRequest,
    RollbackTier,
    RunPhase,
)
from leyline.lifecycle import supervised
from leyline.shm import (
    PARTICIPANT_FLAG_ATTACHED,
    ControlBlock,
    ForeignSegment,
    ShmError,
    control_name,
    remove_instance_segments,
    unlink_own,
)
from leyline.v1 import sidecar_pb2 as pb
from leyline.v1.sidecar_pb2_grpc import (
    add_SidecarControlServicer_to_server,
    add_TrainerLinkServicer_to_server,
)
from tolaria_sidecar.auth import TokenAuth
from tolaria_sidecar.checkpoints import DurableStore
from tolaria_sidecar.config import ControlAddress, SidecarConfig
from tolaria_sidecar.emergency import TRAINER, EmergencyMachine, EmergencyMonitor
from tolaria_sidecar.errors import ConfigInvalid, PersistFailed
from tolaria_sidecar.events import EventLog
from tolaria_sidecar.metrics import SidecarMetrics
from tolaria_sidecar.metrics import serve as serve_metrics
from tolaria_sidecar.orphan import wait_for_trainer
from tolaria_sidecar.protocols import Clock, EventKind, MonotonicClock
from tolaria_sidecar.protocols import DurableStore as StoreProtocol
from tolaria_sidecar.service import SidecarControlService, TrainerLinkService
from tolaria_sidecar.slots import PersistGuard, SlotManager

logger = logging.getLogger(__name__)

RESULTS_KEPT = 64
"""Persist outcomes remembered by generation, for `RequestCheckpoint` waiters."""
FAILURES_KEPT = 100
"""Checkpoint failures shown in the status (the event stream has them all)."""


def open_control_block(config: SidecarConfig) -> ControlBlock:
    """Re-attaches this instance's control block when valid and large enough, else creates it.

    A recreated block gets a new inode (stale mappings stay harmless) and keeps the old
    emergency record when it was readable, so generations keep increasing. A file at the
    control block's name that is not this user's plain 0600 segment is refused
    (`ConfigInvalid`), never mapped or removed (R13.1).
    """
    path = config.shm_dir / control_name(config.instance_id)
    carried = None
    if path.exists() or path.is_symlink():
        try:
            control = ControlBlock.attach(path, instance_id=config.instance_id)
        except ForeignSegment as err:
            raise ConfigInvalid("--instance-id", f"{err}; refusing to use it") from err
        except (ShmError, OSError) as err:
            logger.warning("control block %s unusable (%s); recreating it", path, err)
        else:
            if control.slot_count >= config.snapshots.slots:
                logger.info(
                    "re-attached control block %s (emergency generation %d)",
                    path,
                    control.emergency_generation(),
                )
                return control
            with contextlib.suppress(ShmError):
                carried = control.read_emergency()
            logger.warning(
                "control block %s has %d slot lines, %d needed; recreating it",
                path,
                control.slot_count,
                config.snapshots.slots,
            )
            control.close()
    config.shm_dir.mkdir(parents=True, exist_ok=True)
    try:
        unlink_own(path)
        control = ControlBlock.create(path, config.snapshots.slots, instance_id=config.instance_id)
    except (ForeignSegment, FileExistsError) as err:
        raise ConfigInvalid("--instance-id", f"{path}: {err}; refusing to use it") from err
    except ShmError as err:
        raise ConfigInvalid("shared memory", str(err)) from err
    if carried is not None and carried.generation:
        control.write_emergency(carried)
    return control


class Verifier:
    """Hashes committed slots in the background, in commit order."""

    def __init__(self, slots: SlotManager) -> None:
        self._slots = slots
        self._queue: queue.Queue[tuple[int, int] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="slot-verifier", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, index: int, generation: int) -> None:
        self._queue.put((index, generation))

    def stop(self, timeout_s: float) -> None:
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._slots.verify(*item)
            except Exception:  # boundary: one bad slot must not stop verification
                logger.exception("verification of slot %d generation %d failed", *item)


PersistOutcome = CheckpointRecord | PersistFailed


class Persister:
    """Runs durable writes one at a time; a newer request replaces a queued older one."""

    def __init__(self, slots: SlotManager) -> None:
        self._slots = slots
        self._cond = threading.Condition()
        self._queued: tuple[int, int] | None = None
        self._inflight: tuple[int, int] | None = None
        self._results: dict[int, PersistOutcome] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="persister", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._inflight is not None or self._queued is not None

    def schedule(self, index: int, generation: int) -> tuple[bool, str]:
        """Queues (index, generation); returns (scheduled, why not)."""
        with self._cond:
            if self._stopping:
                return False, "the sidecar is shutting down"
            if self._inflight is not None and self._inflight[1] == generation:
                return True, ""
            if self._queued is not None:
                if self._queued[1] > generation:
                    return False, f"newer generation {self._queued[1]} is already queued"
                if self._queued[1] < generation:
                    logger.info(
                        "persist of generation %d replaced by generation %d",
                        self._queued[1],
                        generation,
                    )
            self._results.pop(generation, None)
            self._queued = (index, generation)
            self._cond.notify_all()
            return True, ""

    def wait(self, generation: int, timeout_s: float) -> PersistOutcome | None:
        """The outcome of `generation`'s write, waiting up to `timeout_s`; None on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while generation not in self._results:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return self._results[generation]

    def stop(self, timeout_s: float) -> bool:
        """Drops what is queued and waits up to `timeout_s` for the write in flight; returns
        False when it is still running (abandoned: the WAL keeps the store consistent)."""
        with self._cond:
            self._stopping = True
            self._queued = None
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._queued is None and not self._stopping:
                    self._cond.wait()
                if self._queued is None:
                    return
                item = self._inflight = self._queued
                self._queued = None
            outcome: PersistOutcome
            try:
                outcome = self._slots.persist(*item)
            except PersistFailed as err:
                outcome = err
            except Exception as err:  # boundary: the persister outlives any one write
                logger.exception("persist of slot %d generation %d crashed", *item)
                outcome = PersistFailed(item[0], item[1], f"{type(err).__name__}: {err}")
            with self._cond:
                self._inflight = None
                self._results[item[1]] = outcome
                while len(self._results) > RESULTS_KEPT:
                    del self._results[next(iter(self._results))]
                self._cond.notify_all()


@dataclass
class TrainerView:
    """What the trainer last told the sidecar (Attach, Heartbeat, Detach)."""

    attached: bool = False
    pid: int = 0
    attempt: int = 0
    phase: RunPhase.ValueType = RunPhase.Pending
    epoch: int = 0
    global_step: int = 0
    health: HealthStatus.ValueType = HealthStatus.HEALTH_STATUS_UNKNOWN
    loss: float = 0.0
    heartbeat_wall_ns: int = 0
    progress_event_ns: int = 0
    active_rollback: RollbackRequest | None = None
    stop_reason: str = ""
    failures: deque[CheckpointFailure] = field(default_factory=lambda: deque(maxlen=FAILURES_KEPT))
    rejections: deque[CheckpointRejection] = field(
        default_factory=lambda: deque(maxlen=FAILURES_KEPT)
    )


class _Events:
    """The event log plus the sidecar's own view of some events (checkpoint failures)."""

    def __init__(self, log: EventLog, view: TrainerView, lock: threading.Lock) -> None:
        self._log = log
        self._view = view
        self._lock = lock

    def publish(self, kind: EventKind, message: Message) -> int:
        if kind == "checkpoint_failed" and isinstance(message, CheckpointFailure):
            with self._lock:
                self._view.failures.append(message)
        return self._log.publish(kind, message)


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
        self._lock = threading.Lock()
        self.view = TrainerView()
        self.events = EventLog(
            config.run_id,
            capacity=config.tuning.event_buffer,
            on_drop=self.metrics.events_dropped.inc,
        )
        sink = _Events(self.events, self.view, self._lock)
        self.control = open_control_block(config)
        self.guard = PersistGuard(config.drills, config.checkpoint_dir)
        self._own_store: DurableStore | None = None
        if store is None:
            try:
                config.checkpoint_dir.mkdir(parents=True, exist_ok=True)
                self._own_store = DurableStore(
                    config.checkpoint_dir,
                    config.checkpoints,
                    run_id=config.run_id,
                    instance_id=config.instance_id,
                    lineage_id=config.lineage_id,
                    faults=self.guard,
                )
            except OSError as err:
                self.control.close()
                raise ConfigInvalid(
                    "--checkpoint-dir", f"cannot open {config.checkpoint_dir}: {err}"
                ) from err
            store = _TimedStore(self._own_store, self.metrics)
            self.view.failures.extend(self._own_store.wal.aborted())  # failures before a restart
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

    def start(self) -> None:
        """Re-attaches slots left by a previous sidecar, then starts the workers."""
        for index, generation in self.slots.restore():
            self.verifier.submit(index, generation)
        line = self.control.participant(TRAINER)
        if line.flags & PARTICIPANT_FLAG_ATTACHED:
            # A trainer was attached before this sidecar (re)started: it is still required
            # for CRITICAL until it detaches, and its heartbeat is watched.
            self.machine.attach_trainer(line.attempt)
            with self._lock:
                self.view.attached = True
                self.view.pid = line.pid
                self.view.attempt = line.attempt
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
        with self._lock:
            self.view.attached = True
            self.view.pid = pid
            self.view.attempt = attempt
            self.view.phase = RunPhase.Running
        logger.info("trainer attached (pid %d, attempt %d)", pid, attempt)

    def trainer_detached(self, phase: RunPhase.ValueType, reason: str) -> None:
        self.machine.detach_trainer()
        self.metrics.trainer_attached.set(0)
        with self._lock:
            self.view.attached = False
            if phase:
                self.view.phase = phase
            progress = self._progress()
        self.events.publish("progress", progress)
        logger.info("trainer detached (%s): %s", RunPhase.Name(phase), reason)

    def heartbeat(self, request: pb.HeartbeatRequest) -> None:
        now = self.clock.now_ns()
        interval_ns = int(self.config.tuning.progress_event_interval_seconds * 1e9)
        with self._lock:
            v = self.view
            v.epoch = request.epoch
            v.global_step = request.global_step
            v.phase = request.phase or v.phase
            v.health = request.health or v.health
            v.loss = request.loss
            v.heartbeat_wall_ns = time.time_ns()
            due = not v.progress_event_ns or now - v.progress_event_ns >= interval_ns
            if due:
                v.progress_event_ns = now
            progress = self._progress()
        if due:
            self.events.publish("progress", progress)

    def _progress(self) -> pb.ProgressEvent:
        v = self.view
        event = pb.ProgressEvent(
            epoch=v.epoch, global_step=v.global_step, health=v.health, phase=v.phase
        )
        if v.heartbeat_wall_ns:
            event.heartbeat.FromNanoseconds(v.heartbeat_wall_ns)
        return event

    def rollback_started(self, request: RollbackRequest) -> None:
        with self._lock:
            self.view.active_rollback = request
            self.view.phase = RunPhase.RollingBack
        self.events.publish("rollback_started", pb.RollbackStarted(request=request))
        logger.warning("full rollback %s started: %s", request.rollback_id, request.detail)

    def rollback_finished(self, report: RollbackReport) -> None:
        pending = self.machine.finish_rollback(report.rollback_id)
        tier = RollbackTier.Name(report.tier)
        self.metrics.rollbacks.labels(tier, _outcome_name(report.outcome)).inc()
        self.metrics.rollback_seconds.labels(tier).observe(report.total_ns / 1e9)
        with self._lock:
            active = self.view.active_rollback
            if active is not None and active.rollback_id == report.rollback_id:
                self.view.active_rollback = None
                self.view.phase = RunPhase.Running
        self.events.publish("rollback_finished", report)
        logger.info(
            "%s rollback %s reported %s%s",
            tier,
            report.rollback_id,
            _outcome_name(report.outcome),
            " (deadline cleared)" if pending else "",
        )

    @property
    def trainer_pid(self) -> int:
        """The pid of the trainer last attached (0: none yet)."""
        with self._lock:
            return self.view.pid

    @property
    def stop_requested(self) -> bool:
        with self._lock:
            return bool(self.view.stop_reason)

    @property
    def stop_reason(self) -> str:
        with self._lock:
            return self.view.stop_reason

    def checkpoint_done(self, stop_after: bool, reason: str) -> None:
        if stop_after:
            with self._lock:
                self.view.stop_reason = f"checkpoint-then-stop: {reason}"
            logger.warning("checkpoint durable; the trainer is asked to stop (%s)", reason)

    def checkpoints_rejected(self, rejections: Sequence[CheckpointRejection]) -> None:
        """Remembers checkpoints a load refused, for the status and the run report."""
        with self._lock:
            known = {(r.file_name, r.reason) for r in self.view.rejections}
            for rejection in rejections:
                if (rejection.file_name, rejection.reason) not in known:
                    self.view.rejections.append(rejection)

    def checkpoint_of(self, generation: int) -> CheckpointRecord | None:
        return next(
            (r for r in self.store.committed() if r.snapshot_generation == generation), None
        )

    def status(self) -> pb.SidecarStatus:
        feasibility = self.slots.feasibility
        with self._lock:
            v = self.view
            status = pb.SidecarStatus(
                run_id=self.config.run_id,
                phase=v.phase,
                epoch=v.epoch,
                global_step=v.global_step,
                trainer_attached=v.attached,
                fast_tier_feasible=bool(feasibility and feasibility.fast_tier_feasible),
                degraded_reason=feasibility.degraded_reason if feasibility else "",
                health=v.health,
                checkpoint_failures=list(v.failures),
                checkpoint_rejections=list(v.rejections),
                instance_id=self.config.instance_id,
                lineage_id=self.config.lineage_id,
            )
            if v.heartbeat_wall_ns:
                status.last_heartbeat.FromNanoseconds(v.heartbeat_wall_ns)
            if v.active_rollback is not None:
                status.active_rollback.CopyFrom(v.active_rollback)
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
        return status


def _outcome_name(outcome: int) -> str:
    from leyline import RollbackOutcome

    return RollbackOutcome.Name(outcome)  # type: ignore[arg-type]


class _TimedStore:
    """The real store, feeding the WAL append time of each commit into the metrics."""

    def __init__(self, store: DurableStore, metrics: SidecarMetrics) -> None:
        self._store = store
        self._metrics = metrics

    def write(
        self,
        *,
        manifest: bytes,
        data: memoryview,
        epoch: int,
        global_step: int,
        snapshot_generation: int,
        manifest_digest: str = "",
    ) -> CheckpointRecord:
        appends = self._store.wal.appends
        try:
            return self._store.write(
                manifest=manifest,
                data=data,
                epoch=epoch,
                global_step=global_step,
                snapshot_generation=snapshot_generation,
                manifest_digest=manifest_digest,
            )
        finally:
            if self._store.wal.appends > appends:
                self._metrics.wal_append_seconds.observe(self._store.wal.last_append_ns / 1e9)

    def latest(self) -> CheckpointRecord | None:
        return self._store.latest()

    def committed(self) -> list[CheckpointRecord]:
        return self._store.committed()

    def load_latest(
        self,
        into: memoryview,
        *,
        accept: Callable[[CheckpointRecord, bytes], str | None] | None = None,
        max_step: int | None = None,
    ) -> tuple[CheckpointRecord, bytes, int]:
        return self._store.load_latest(into, accept=accept, max_step=max_step)

    @property
    def last_rejections(self) -> Sequence[tuple[CheckpointRecord, object]]:
        return self._store.last_rejections


# -- servers ----------------------------------------------------------------------------------


def start_trainer_server(sidecar: Sidecar, socket_path: Path, workers: int) -> grpc.Server:
    """Serves `TrainerLink` on a Unix socket created mode 0600 (a stale socket is replaced)."""
    socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(socket_path.lstat().st_mode):
            raise ConfigInvalid("--socket", f"{socket_path} exists and is not a socket")
        socket_path.unlink()
    server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="trainer-link"))
    add_TrainerLinkServicer_to_server(TrainerLinkService(sidecar), server)
    previous = os.umask(0o177)  # the socket is born 0600: no window where others may connect
    try:
        bound = server.add_insecure_port(f"unix:{socket_path.resolve()}")
    except RuntimeError as err:
        raise ConfigInvalid("--socket", f"cannot listen on {socket_path}: {err}") from err
    finally:
        os.umask(previous)
    if not bound:
        raise ConfigInvalid("--socket", f"cannot listen on {socket_path}")
    server.start()
    os.chmod(socket_path, 0o600)
    return server


def start_control_server(
    sidecar: Sidecar, address: ControlAddress, token: str | None, workers: int
) -> tuple[grpc.Server, int]:
    """Serves `SidecarControl` on TCP behind `TokenAuth`; returns (server, bound port).

    Raises `TokenRequired` without a token: the control server is never unauthenticated.
    """
    auth = TokenAuth(token)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="control"),
        interceptors=[auth],
    )
    add_SidecarControlServicer_to_server(SidecarControlService(sidecar), server)
    try:
        port = server.add_insecure_port(address.target)
    except RuntimeError as err:
        raise ConfigInvalid("--control-address", f"cannot bind {address.target}: {err}") from err
    if not port:
        raise ConfigInvalid("--control-address", f"cannot bind {address.target}")
    server.start()
    return server, port


@dataclass
class Running:
    """A started sidecar and its endpoints."""

    sidecar: Sidecar
    trainer_server: grpc.Server
    control_server: grpc.Server | None
    control_port: int | None
    metrics_server: object | None
    metrics_port: int | None

    def ready_line(self) -> str:
        config = self.sidecar.config
        control = "-"
        if config.control_address is not None and self.control_port is not None:
            control = f"{config.control_address.host}:{self.control_port}"
        metrics = "-" if self.metrics_port is None else str(self.metrics_port)
        return f"READY socket={config.socket_path} control={control} metrics={metrics}"

    def stop(self) -> None:
        """Stops accepting, lets in-flight work finish within the grace period, releases."""
        grace = self.sidecar.config.tuning.shutdown_grace_seconds
        self.sidecar.events.close()  # ends event streams, so the servers drain at once
        stopped = [self.trainer_server.stop(grace)]
        if self.control_server is not None:
            stopped.append(self.control_server.stop(grace))
        self.sidecar.stop(grace_s=grace)
        for done in stopped:
            done.wait(grace)
        shutdown = getattr(self.metrics_server, "shutdown", None)
        if shutdown is not None:
            shutdown()
        config = self.sidecar.config
        self.sidecar.release(unlink=config.cleanup_on_exit)
        with contextlib.suppress(FileNotFoundError):
            config.socket_path.unlink()
        if config.remove_socket_dir:
            try:
                config.socket_path.parent.rmdir()  # only when empty: never anyone else's files
            except FileNotFoundError:
                pass
            except OSError as err:
                logger.warning("socket directory %s left: %s", config.socket_path.parent, err)


def serve(
    config: SidecarConfig,
    *,
    registry: CollectorRegistry | None = None,
    clock: Clock | None = None,
    store: StoreProtocol | None = None,
    copy_bytes_per_second: float | None = None,
) -> Running:
    """Builds and starts everything; the caller stops it with `Running.stop`."""
    if config.control_address is not None:
        TokenAuth(config.token)  # refuse before any segment or socket is touched
    registry = registry or CollectorRegistry()
    sidecar = Sidecar(
        config,
        registry=registry,
        clock=clock,
        store=store,
        copy_bytes_per_second=copy_bytes_per_second,
    )
    trainer_server = control_server = None
    try:
        sidecar.start()
        workers = config.tuning.server_workers
        trainer_server = start_trainer_server(sidecar, config.socket_path, workers)
        control_port = metrics_port = None
        metrics_server = None
        if config.control_address is not None:
            control_server, control_port = start_control_server(
                sidecar, config.control_address, config.token, workers
            )
        if config.metrics_port is not None:
            metrics_server, metrics_port = serve_metrics(
                registry, config.metrics_port, config.metrics_address
            )
    except BaseException:
        for server in (trainer_server, control_server):
            if server is not None:
                server.stop(None)
        sidecar.stop(grace_s=0.0)
        sidecar.release(unlink=config.cleanup_on_exit)
        raise
    return Running(
        sidecar, trainer_server, control_server, control_port, metrics_server, metrics_port
    )


def run(config: SidecarConfig) -> int:
    """The sidecar process: serve, print READY, wait for SIGTERM/SIGINT, stop; exit code."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del frame
        logger.info("signal %d: stopping", signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        running = serve(config)
        print(running.ready_line(), flush=True)  # noqa: T201 - the launcher reads this line
        while not stop.wait(0.5):  # a timed wait: signal handlers run between waits
            pass
        if supervised():  # the trainer may still be stopping and need us (orphan.py)
            wait_for_trainer(
                running.sidecar.trainer_pid, config.tuning.orphaned_trainer_wait_seconds
            )
        running.stop()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    logger.info("sidecar stopped")
    sys.stdout.flush()
    return 0
