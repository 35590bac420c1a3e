"""The `TrainerLink` servicer: the trainer's calls over the sidecar's Unix socket (no token:
the socket is born mode 0600).

Served by `serving.start_trainer_server`. Each method checks its request at the edge
(`boundary`), calls the sidecar (`protocols.ServicedSidecar`: slots, emergency machine,
persister) and answers; outcomes the trainer is expected to handle (a commit whose header
moved on, a persist superseded by a newer one, no checkpoint for a full rollback) come back
in the response's own `accepted`/`scheduled`/`ready` + `error` fields, not as an error. It
never touches slot bytes or disk itself, never waits longer than the deadline it was given,
and knows the sidecar only through its Protocol, never the concrete `sidecar.Sidecar`.
"""

from __future__ import annotations

import logging
import time

import grpc

from leyline import (
    SCHEMA_VERSION,
    AnomalyKind,
    EmergencyResolution,
    EmergencySignal,
    HealthStatus,
    RollbackOutcome,
    RollbackReport,
    RollbackRequest,
    RollbackTier,
    RunPhase,
)
from leyline.shm import LAYOUT_VERSION, control_name
from leyline.v1 import sidecar_pb2 as pb
from leyline.v1.sidecar_pb2_grpc import TrainerLinkServicer
from tolaria_sidecar.boundary import check_enum, check_signal, check_version, guarded
from tolaria_sidecar.emergency import TRAINER
from tolaria_sidecar.errors import (
    BufferTooSmall,
    CheckpointCorrupt,
    CheckpointLoadFailed,
    NoCheckpoint,
    PreconditionFailed,
    RequestInvalid,
)
from tolaria_sidecar.protocols import ServicedSidecar
from tolaria_sidecar.values import LoadedCheckpoint

logger = logging.getLogger(__name__)


class TrainerLinkService(TrainerLinkServicer):
    """The trainer's calls, over the Unix socket (no token: the socket is mode 0600)."""

    def __init__(self, sidecar: ServicedSidecar) -> None:
        self._s = sidecar

    def _run(self, run_id: str, *, required: bool) -> None:
        expected = self._s.config.run_id
        if not run_id:
            if required:
                raise RequestInvalid("run_id", "must not be empty")
            return
        if run_id != expected:
            raise RequestInvalid("run_id", f"{run_id!r} is not this sidecar's run {expected!r}")

    @guarded
    def Attach(self, request: pb.AttachRequest, context: grpc.ServicerContext) -> pb.AttachResponse:  # noqa: N802 - gRPC method name
        check_version(request.version)
        self._run(request.run_id, required=True)
        if request.state_bytes == 0:
            raise RequestInvalid("state_bytes", "must be > 0")
        if not request.layout_fingerprint:
            raise RequestInvalid("layout_fingerprint", "must not be empty")
        if request.pid == 0:
            raise RequestInvalid("pid", "must be > 0")
        s = self._s
        if request.instance_id and request.instance_id != s.config.instance_id:
            raise RequestInvalid(
                "instance_id",
                f"{request.instance_id!r} is not this sidecar's instance {s.config.instance_id!r}",
            )
        feasibility = s.slots.attach(
            state_bytes=request.state_bytes, manifest_bytes=request.manifest_bytes
        )
        s.trainer_attached(pid=request.pid, attempt=request.attempt)
        response = pb.AttachResponse(
            version=SCHEMA_VERSION,
            layout_version=LAYOUT_VERSION,
            control_block_name=control_name(s.config.instance_id),
            instance_id=s.config.instance_id,
            lineage_id=s.config.lineage_id,
            slots=s.slots.infos(),
            fast_tier_feasible=feasibility.fast_tier_feasible,
            degraded_reason=feasibility.degraded_reason,
            measured_copy_gbps=feasibility.copy_gbps,
        )
        resume = s.slots.resume_slot(request.layout_fingerprint)
        if resume is not None:
            response.resume_slot.CopyFrom(resume)
        active = s.machine.active()
        if active is not None:
            response.active_emergency.CopyFrom(active)
        latest = s.store.latest()
        if latest is not None:
            response.last_checkpoint.CopyFrom(latest)
        if s.wal_recovery is not None:
            response.wal_recovery.CopyFrom(s.wal_recovery)
        return response

    @guarded
    def CommitSnapshot(  # noqa: N802 - gRPC method name
        self, request: pb.CommitSnapshotRequest, context: grpc.ServicerContext
    ) -> pb.CommitSnapshotResponse:
        if request.generation == 0:
            raise RequestInvalid("generation", "must be > 0")
        s = self._s
        try:
            s.slots.commit(request.slot, request.generation)
        except PreconditionFailed as err:
            if err.field != "generation":
                raise
            return pb.CommitSnapshotResponse(accepted=False, error=str(err), slots=s.slots.infos())
        s.verifier.submit(request.slot, request.generation)
        return pb.CommitSnapshotResponse(accepted=True, slots=s.slots.infos())

    @guarded
    def PersistSnapshot(  # noqa: N802 - gRPC method name
        self, request: pb.PersistRequest, context: grpc.ServicerContext
    ) -> pb.PersistResponse:
        if request.generation == 0:
            raise RequestInvalid("generation", "must be > 0")
        s = self._s
        held = s.slots.committed_generation(request.slot)
        if held != request.generation:
            return pb.PersistResponse(
                scheduled=False,
                error=f"slot {request.slot} holds generation {held}, not {request.generation}",
            )
        if s.stop_requested:
            return pb.PersistResponse(
                scheduled=False, error="the run is stopping after a checkpoint"
            )
        scheduled, error = s.persister.schedule(request.slot, request.generation)
        return pb.PersistResponse(scheduled=scheduled, error=error)

    @guarded
    def PrepareFullRollback(  # noqa: N802 - gRPC method name
        self, request: RollbackRequest, context: grpc.ServicerContext
    ) -> pb.PrepareFullRollbackResponse:
        check_version(request.version)
        if not request.rollback_id:
            raise RequestInvalid("rollback_id", "must not be empty")
        if request.tier not in (
            RollbackTier.ROLLBACK_TIER_UNSPECIFIED,
            RollbackTier.ROLLBACK_TIER_FULL,
        ):
            raise RequestInvalid("tier", "must be ROLLBACK_TIER_FULL (or unset)")
        check_enum("reason", AnomalyKind, request.reason)
        self._run(request.run_id, required=False)
        s = self._s
        deadline_ns = s.machine.start_rollback_deadline(request.rollback_id)
        started = RollbackRequest()
        started.CopyFrom(request)
        started.tier = RollbackTier.ROLLBACK_TIER_FULL
        started.run_id = s.config.run_id
        started.deadline_unix_ms = (time.time_ns() + (deadline_ns - s.clock.now_ns())) // 1_000_000
        if not started.HasField("requested_at"):
            started.requested_at.GetCurrentTime()
        s.rollback_started(started)
        response = pb.PrepareFullRollbackResponse(deadline_unix_ms=started.deadline_unix_ms)
        try:
            loaded = s.slots.load_checkpoint(
                deadline_ns=deadline_ns, max_step=request.max_target_step or None
            )
        except (NoCheckpoint, BufferTooSmall, CheckpointCorrupt, CheckpointLoadFailed) as err:
            logger.error("full rollback %s cannot load a checkpoint: %s", request.rollback_id, err)
            return self._load_failed(response, err)
        return self._loaded(response, loaded)

    @guarded
    def LoadCheckpoint(  # noqa: N802 - gRPC method name
        self, request: pb.LoadCheckpointRequest, context: grpc.ServicerContext
    ) -> pb.PrepareFullRollbackResponse:
        """Crash resume and `--resume`: the newest checkpoint this instance may use, put into
        a slot; no rollback deadline starts (nothing is being rolled back)."""
        check_version(request.version)
        self._run(request.run_id, required=False)
        s = self._s
        deadline_s = s.config.rollback.full_deadline_seconds
        deadline_ns = s.clock.now_ns() + int(deadline_s * 1e9)
        response = pb.PrepareFullRollbackResponse()
        try:
            loaded = s.slots.load_checkpoint(
                deadline_ns=deadline_ns,
                max_step=request.max_step or None,
                layout_fingerprint=request.layout_fingerprint,
            )
        except (NoCheckpoint, BufferTooSmall, CheckpointCorrupt, CheckpointLoadFailed) as err:
            logger.warning("no checkpoint to load for %s: %s", request.reason or "resume", err)
            return self._load_failed(response, err)
        return self._loaded(response, loaded)

    def _load_failed(
        self, response: pb.PrepareFullRollbackResponse, err: Exception
    ) -> pb.PrepareFullRollbackResponse:
        """Not ready, saying why, with the checkpoints the load refused (also counted)."""
        rejections = self._s.slots.last_rejections
        response.ready = False
        response.error = str(err)
        response.rejections.extend(rejections)
        self._s.checkpoints_rejected(rejections)
        return response

    def _loaded(
        self, response: pb.PrepareFullRollbackResponse, loaded: LoadedCheckpoint
    ) -> pb.PrepareFullRollbackResponse:
        """Ready: the slot holding the checkpoint, its record, phases and what was refused."""
        self._s.checkpoints_rejected(loaded.rejections)
        response.ready = True
        response.slot.CopyFrom(loaded.slot)
        response.checkpoint.CopyFrom(loaded.record)
        response.phases.extend(loaded.phases)
        response.rejections.extend(loaded.rejections)
        return response

    @guarded
    def ReportRollback(self, request: RollbackReport, context: grpc.ServicerContext) -> pb.LinkAck:  # noqa: N802 - gRPC method name
        check_version(request.version)
        if not request.rollback_id:
            raise RequestInvalid("rollback_id", "must not be empty")
        check_enum("tier", RollbackTier, request.tier, required=True)
        check_enum("outcome", RollbackOutcome, request.outcome, required=True)
        check_enum("reason", AnomalyKind, request.reason)
        self._s.rollback_finished(request)
        return pb.LinkAck(ok=True)

    @guarded
    def RaiseEmergency(  # noqa: N802 - gRPC method name
        self, request: EmergencySignal, context: grpc.ServicerContext
    ) -> pb.RaiseEmergencyResponse:
        check_signal(request, self._s.config.run_id)
        signal = EmergencySignal()
        signal.CopyFrom(request)
        if not signal.source:
            signal.source = TRAINER
        if not signal.origin:
            signal.origin = "trainer"
        generation, level = self._s.machine.raise_signal(signal)
        return pb.RaiseEmergencyResponse(generation=generation, effective_level=level)

    @guarded
    def ResolveEmergency(  # noqa: N802 - gRPC method name
        self, request: EmergencyResolution, context: grpc.ServicerContext
    ) -> pb.LinkAck:
        check_version(request.version)
        self._s.machine.resolve(
            request.generation,
            request.resolved_by or "trainer",
            request.reason,
            incident_id=request.incident_id,
        )
        return pb.LinkAck(ok=True)

    @guarded
    def Heartbeat(  # noqa: N802 - gRPC method name
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatResponse:
        self._run(request.run_id, required=False)
        check_enum("phase", RunPhase, request.phase)
        check_enum("health", HealthStatus, request.health)
        s = self._s
        s.heartbeat(request)
        response = pb.HeartbeatResponse(stop_requested=s.stop_requested, stop_reason=s.stop_reason)
        active = s.machine.active()
        if active is not None:
            response.active_emergency.CopyFrom(active)
        return response

    @guarded
    def Detach(self, request: pb.DetachRequest, context: grpc.ServicerContext) -> pb.LinkAck:  # noqa: N802 - gRPC method name
        self._run(request.run_id, required=False)
        check_enum("final_phase", RunPhase, request.final_phase)
        self._s.trainer_detached(request.final_phase, request.reason)
        return pb.LinkAck(ok=True)

    @guarded
    def GetStatus(  # noqa: N802 - gRPC method name
        self, request: pb.GetStatusRequest, context: grpc.ServicerContext
    ) -> pb.SidecarStatus:
        return self._s.status()
