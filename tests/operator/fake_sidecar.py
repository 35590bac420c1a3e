"""A small real `SidecarControl` server on 127.0.0.1 (grpc.aio, the generated servicer base):
a fake at our seam - the gRPC contract - that honours the run token like the real sidecar's
`TokenAuth`, streams the events a test publishes, and records the operator's calls."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from datetime import datetime

import grpc
from google.protobuf.message import Message

from leyline import (
    CheckpointRecord,
    EmergencyAck,
    EmergencyLevel,
    EmergencyResolution,
    EmergencySignal,
    Participant,
    RollbackReport,
    RollbackRequest,
)
from leyline.v1 import sidecar_pb2 as pb
from leyline.v1.sidecar_pb2_grpc import SidecarControlServicer, add_SidecarControlServicer_to_server
from tolaria_operator.control_tls import ServerCert


class FakeSidecar(SidecarControlServicer):
    """One run's sidecar as the operator sees it."""

    def __init__(
        self, run_id: str, token: Callable[[], str | None], clock: Callable[[], datetime]
    ) -> None:
        self.run_id = run_id
        self._token = token
        self._clock = clock
        self.status = pb.SidecarStatus(
            run_id=run_id, trainer_attached=True, fast_tier_feasible=True
        )
        self.events: list[pb.SidecarEvent] = []
        self.sequence = 1_000_000
        self._changed = asyncio.Event()
        self.acknowledge = True
        self.echo = True
        self.generation = 0
        self.signals: list[EmergencySignal] = []
        self.resolutions: list[EmergencyResolution] = []
        self.checkpoint_requests: list[pb.CheckpointRequest] = []
        self.refused = 0
        self.server: grpc.aio.Server | None = None
        self.port = 0

    # -- what a test does ------------------------------------------------------------------

    def publish(self, **event: Message) -> pb.SidecarEvent:
        self.sequence += 1
        ev = pb.SidecarEvent(sequence=self.sequence, run_id=self.run_id, **event)
        ev.at.FromDatetime(self._clock())
        self.events.append(ev)
        self._changed.set()
        return ev

    def rollback_started(self, rollback_id: str = "rb-1") -> RollbackRequest:
        request = RollbackRequest(
            version=1, rollback_id=rollback_id, tier=2, reason=4, run_id=self.run_id
        )
        request.requested_at.FromDatetime(self._clock())
        self.status.active_rollback.CopyFrom(request)
        self.publish(rollback_started=pb.RollbackStarted(request=request))
        return request

    def rollback_finished(self, rollback_id: str = "rb-1", outcome: int = 1) -> None:
        report = RollbackReport(
            version=1,
            rollback_id=rollback_id,
            tier=2,
            reason=4,
            outcome=outcome,
            total_ns=3_000_000_000,
        )
        self.status.ClearField("active_rollback")
        self.publish(rollback_finished=report)

    def emergency(
        self,
        level: int = EmergencyLevel.EMERGENCY_LEVEL_CRITICAL,
        kind: int = 8,
        reason: str = "breaker storm: 5 breakers tripped",
    ) -> EmergencySignal:
        self.generation += 1
        signal = EmergencySignal(
            version=1,
            level=level,
            reason=reason,
            origin="trainer",
            run_id=self.run_id,
            generation=self.generation,
            kind=kind,
            source=Participant.PARTICIPANT_TRAINER,
        )
        signal.triggered_at.FromDatetime(self._clock())
        self.status.active_emergency.CopyFrom(signal)
        self.publish(emergency=signal)
        return signal

    def ack(self, latency_ns: int = 2_000_000) -> None:
        self.publish(
            ack=EmergencyAck(
                version=1,
                generation=self.generation,
                participant=Participant.PARTICIPANT_TRAINER,
                level=self.status.active_emergency.level,
                latency_ns=latency_ns,
                run_id=self.run_id,
                frozen=True,
            )
        )

    def resolve(self, reason: str = "breakers closed again") -> None:
        resolution = EmergencyResolution(
            version=1,
            generation=self.generation,
            resolved_by="trainer",
            reason=reason,
            run_id=self.run_id,
        )
        self.status.ClearField("active_emergency")
        self.publish(resolution=resolution)

    # -- the gRPC contract -----------------------------------------------------------------

    async def _authorized(self, context: grpc.aio.ServicerContext) -> None:
        expected = self._token()
        presented = dict(context.invocation_metadata() or ()).get("authorization")
        if not expected or presented != f"Bearer {expected}":
            self.refused += 1
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the run token is wrong")

    async def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.SidecarStatus:
        await self._authorized(context)
        return self.status

    async def StreamEvents(
        self,
        request: pb.StreamEventsRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.SidecarEvent]:
        await self._authorized(context)
        after = request.after_sequence
        while True:
            fresh = [e for e in self.events if e.sequence > after]
            for event in fresh:
                after = event.sequence
                yield event
            self._changed.clear()
            if not [e for e in self.events if e.sequence > after]:
                await self._changed.wait()

    async def SignalEmergency(
        self, request: EmergencySignal, context: grpc.aio.ServicerContext
    ) -> EmergencyAck:
        await self._authorized(context)
        self.signals.append(request)
        if not self.acknowledge:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "trainer: no ack within 100 ms")
        self.generation += 1
        signal = EmergencySignal()
        signal.CopyFrom(request)
        signal.generation = self.generation
        self.status.active_emergency.CopyFrom(signal)
        if self.echo:  # the real sidecar streams the emergency it was given
            self.publish(emergency=signal)
        return EmergencyAck(
            version=1,
            generation=self.generation,
            participant=Participant.PARTICIPANT_TRAINER,
            level=request.level,
            latency_ns=1_500_000,
            run_id=self.run_id,
            frozen=True,
        )

    async def ResolveEmergency(
        self, request: EmergencyResolution, context: grpc.aio.ServicerContext
    ) -> pb.ResolveEmergencyResponse:
        await self._authorized(context)
        self.resolutions.append(request)
        self.status.ClearField("active_emergency")
        return pb.ResolveEmergencyResponse(resolved=True)

    async def RequestCheckpoint(
        self, request: pb.CheckpointRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckpointResponse:
        await self._authorized(context)
        self.checkpoint_requests.append(request)
        record = CheckpointRecord(
            version=1,
            checkpoint_id="ckpt-0007",
            sequence=7,
            epoch=3,
            global_step=1200,
            payload_bytes=4096,
            run_id=self.run_id,
        )
        record.committed_at.FromDatetime(self._clock())
        self.status.last_checkpoint.CopyFrom(record)
        return pb.CheckpointResponse(scheduled=True, checkpoint=record)

    # -- serving ---------------------------------------------------------------------------

    async def start(self, tls: ServerCert | None = None) -> int:
        """Serves on a free 127.0.0.1 port, over TLS with `tls` as a pod's sidecar does (the
        operator's connector speaks TLS only), plain text without it."""
        self.server = grpc.aio.server()
        add_SidecarControlServicer_to_server(self, self.server)
        if tls is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            credentials = grpc.ssl_server_credentials([(tls.key_pem, tls.cert_pem)])
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        await self.server.start()
        return self.port

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=None)
            self.server = None


def closed_port() -> int:
    """A local port nothing listens on (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
