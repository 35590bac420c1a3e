"""The `SidecarControl` servicer: the operator's calls over TCP, each one already
authenticated by `auth.TokenAuth`.

Served by `serving.start_control_server`. Status, the event stream (replayed from a sequence,
then followed live), emergencies signalled with the trainer's acknowledgement awaited within
the level's budget, resolution, and checkpoint requests awaited within the client's gRPC
deadline. Each method checks its request at the edge (`boundary`); it never touches slot
bytes or disk itself, never waits past its deadline, and knows the sidecar only through
`protocols.ServicedSidecar`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc

from leyline import (
    AnomalyKind,
    EmergencyAck,
    EmergencyResolution,
    EmergencySignal,
    Participant,
)
from leyline.v1 import sidecar_pb2 as pb
from leyline.v1.sidecar_pb2_grpc import SidecarControlServicer
from tolaria_sidecar.boundary import check_signal, check_version, guarded
from tolaria_sidecar.emergency import TRAINER, budget_ms, participant_name
from tolaria_sidecar.errors import AckTimeout, PersistFailed, PreconditionFailed
from tolaria_sidecar.protocols import ServicedSidecar


class SidecarControlService(SidecarControlServicer):
    """The operator's calls, over TCP; `auth.TokenAuth` has checked the token already."""

    def __init__(self, sidecar: ServicedSidecar, *, max_streams: int = 4) -> None:
        self._s = sidecar
        self._max_streams = max_streams
        self._streams = threading.BoundedSemaphore(max_streams)

    @guarded
    def GetStatus(  # noqa: N802 - gRPC method name
        self, request: pb.GetStatusRequest, context: grpc.ServicerContext
    ) -> pb.SidecarStatus:
        return self._s.status()

    def StreamEvents(  # noqa: N802 - gRPC method name
        self, request: pb.StreamEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.SidecarEvent]:
        """Replays buffered events after `after_sequence`, then follows live until the client
        goes away or the sidecar stops. A client too slow for the ring loses the oldest events
        (counted) and sees the jump in `sequence`.

        At most `max_streams` are open at once: each holds a worker thread, and the pool has
        threads beyond the cap for the unary calls. One more is refused at once with
        RESOURCE_EXHAUSTED (the client retries later) rather than left waiting for a thread."""
        if not self._streams.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._max_streams} event streams are open already; retry when one closes",
            )
        try:
            subscription = self._s.events.subscribe(request.after_sequence)
            poll_s = self._s.config.tuning.monitor_idle_interval_ms / 1e3
            while context.is_active() and not subscription.closed:
                yield from subscription.next_batch(poll_s)
        finally:
            self._streams.release()

    @guarded
    def SignalEmergency(  # noqa: N802 - gRPC method name
        self, request: EmergencySignal, context: grpc.ServicerContext
    ) -> EmergencyAck:
        s = self._s
        check_signal(request, s.config.run_id)
        signal = EmergencySignal()
        signal.CopyFrom(request)
        signal.source = Participant.PARTICIPANT_OPERATOR
        signal.origin = signal.origin or "operator"
        if not signal.kind and signal.incident_id:
            signal.kind = AnomalyKind.ANOMALY_KIND_CLUSTER_INCIDENT
        generation, level = s.machine.raise_signal(signal)
        budget = budget_ms(s.config.emergency, level)
        ack = s.machine.wait_for_ack(generation, TRAINER, budget / 1e3)
        if ack is None:
            raise AckTimeout(generation, participant_name(TRAINER), budget)
        return ack

    @guarded
    def ResolveEmergency(  # noqa: N802 - gRPC method name
        self, request: EmergencyResolution, context: grpc.ServicerContext
    ) -> pb.ResolveEmergencyResponse:
        check_version(request.version)
        self._s.machine.resolve(
            request.generation,
            request.resolved_by or "operator",
            request.reason,
            incident_id=request.incident_id,
        )
        return pb.ResolveEmergencyResponse(resolved=True)

    @guarded
    def RequestCheckpoint(  # noqa: N802 - gRPC method name
        self, request: pb.CheckpointRequest, context: grpc.ServicerContext
    ) -> pb.CheckpointResponse:
        s = self._s
        entry = s.slots.newest_persistable()
        if entry is None:
            raise PreconditionFailed("slot", "no committed snapshot to persist yet")
        reason = request.reason or "requested"
        if entry.durable:
            record = s.checkpoint_of(entry.generation)
            if record is not None:
                s.checkpoint_done(request.stop_after, reason)
                return pb.CheckpointResponse(scheduled=True, checkpoint=record)
        scheduled, error = s.persister.schedule(entry.index, entry.generation)
        if not scheduled:
            return pb.CheckpointResponse(scheduled=False, error=error)
        remaining = context.time_remaining()
        wait_s = (
            remaining * 0.9 if remaining is not None else s.config.rollback.full_deadline_seconds
        )
        outcome = s.persister.wait(entry.generation, wait_s)
        if outcome is None:
            return pb.CheckpointResponse(
                scheduled=True,
                error=f"generation {entry.generation} still being written after {wait_s:.1f} s; "
                "watch the event stream for its checkpoint event",
            )
        if isinstance(outcome, PersistFailed):
            return pb.CheckpointResponse(scheduled=True, error=str(outcome))
        s.checkpoint_done(request.stop_after, reason)
        return pb.CheckpointResponse(scheduled=True, checkpoint=outcome)
