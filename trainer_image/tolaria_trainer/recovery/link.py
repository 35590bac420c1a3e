"""The trainer's client of the sidecar's `TrainerLink` service (Unix socket).

Every call has a deadline and none is made on the hot path: commits come from
the snapshot worker, rollbacks and emergencies from the rare paths, heartbeats
once per epoch (the per-step liveness signal is a shared-memory word, not an
RPC). When the sidecar is unreachable (crashed, restarting) calls raise
`SidecarUnavailable` and `on_health` tells the runtime, which keeps training
DEGRADED; the channel reconnects by itself when the sidecar is back. A call the
sidecar answers with a refusal raises `SidecarRefused` (a subclass, so callers
that only carry on need not tell them apart).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from leyline import EmergencyResolution, EmergencySignal, RollbackReport, RollbackRequest
from leyline.v1 import sidecar_pb2 as pb
from leyline.v1.sidecar_pb2_grpc import TrainerLinkStub
from tolaria_trainer.errors import TrainerError

logger = logging.getLogger(__name__)


class SidecarUnavailable(TrainerError):
    """The sidecar did not answer in time or refused the call; carry on DEGRADED."""


class SidecarRefused(SidecarUnavailable):
    """The sidecar answered and refused the call (a full /dev/shm, an invalid request): it is
    reachable, and the same call would be refused again. `code` is the gRPC status name and
    `detail` the sidecar's message (e.g. the bytes needed and available)."""

    def __init__(self, method: str, code: str, detail: str) -> None:
        super().__init__(f"the sidecar refused {method} ({code}): {detail}")
        self.method = method
        self.code = code
        self.detail = detail


UNREACHABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
    }
)
"""Codes that mean the call did not reach a working sidecar (crashed, restarting, stuck);
every other code is an answer (`SidecarRefused`)."""


@dataclass
class LinkHealth:
    """Whether the last call reached the sidecar; read by the health assessment."""

    reachable: bool = True
    last_error: str = ""


class SidecarLink:
    """Calls to the sidecar with deadlines; thread-safe (gRPC channels are)."""

    def __init__(
        self,
        socket_path: str,
        *,
        timeout_s: float = 5.0,
        on_health: Callable[[LinkHealth], None] = lambda health: None,
    ) -> None:
        """`on_health` is called (on the calling thread) whenever reachability changes, so the
        run's health says DEGRADED while the sidecar is away (R8.2)."""
        self._target = f"unix://{socket_path}"
        self._channel = grpc.insecure_channel(
            self._target,
            options=[
                ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )
        self._stub = TrainerLinkStub(self._channel)
        self._timeout = timeout_s
        self._lock = threading.Lock()
        self._on_health = on_health
        self.health = LinkHealth()

    def wait_ready(self, timeout_s: float) -> None:
        """Blocks until the channel connects (start-up only)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError as err:
            raise SidecarUnavailable(
                f"sidecar at {self._target} not ready after {timeout_s:g} s"
            ) from err

    def _call(self, name: str, request: object, timeout_s: float | None = None) -> object:
        method = getattr(self._stub, name)
        try:
            reply = method(request, timeout=timeout_s or self._timeout)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            detail = err.details() if hasattr(err, "details") else str(err)
            if code is not None and code not in UNREACHABLE:
                self._set_health(LinkHealth(True, ""))
                raise SidecarRefused(name, code.name, detail or "") from err
            what = code.name if code is not None else "no answer"
            self._set_health(LinkHealth(False, f"{name}: {what}"))
            raise SidecarUnavailable(f"sidecar {name} failed: {code}: {detail}") from err
        self._set_health(LinkHealth(True, ""))
        return reply

    def _set_health(self, health: LinkHealth) -> None:
        with self._lock:
            changed = health.reachable != self.health.reachable
            self.health = health
        if not changed:
            return
        if health.reachable:
            logger.warning("sidecar reachable again")
        else:
            logger.warning("sidecar unreachable: %s", health.last_error)
        self._on_health(health)

    def attach(self, request: pb.AttachRequest, timeout_s: float) -> pb.AttachResponse:
        return self._call("Attach", request, timeout_s)  # type: ignore[return-value]

    def commit(self, slot: int, generation: int) -> pb.CommitSnapshotResponse:
        return self._call(  # type: ignore[return-value]
            "CommitSnapshot", pb.CommitSnapshotRequest(slot=slot, generation=generation)
        )

    def persist(self, slot: int, generation: int) -> pb.PersistResponse:
        return self._call("PersistSnapshot", pb.PersistRequest(slot=slot, generation=generation))  # type: ignore[return-value]

    def prepare_full_rollback(
        self, request: RollbackRequest, timeout_s: float
    ) -> pb.PrepareFullRollbackResponse:
        return self._call("PrepareFullRollback", request, timeout_s)  # type: ignore[return-value]

    def load_checkpoint(
        self, request: pb.LoadCheckpointRequest, timeout_s: float
    ) -> pb.PrepareFullRollbackResponse:
        return self._call("LoadCheckpoint", request, timeout_s)  # type: ignore[return-value]

    def report_rollback(self, report: RollbackReport) -> None:
        self._call("ReportRollback", report)

    def raise_emergency(self, signal: EmergencySignal) -> pb.RaiseEmergencyResponse:
        return self._call("RaiseEmergency", signal)  # type: ignore[return-value]

    def resolve_emergency(self, resolution: EmergencyResolution) -> None:
        self._call("ResolveEmergency", resolution)

    def heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        return self._call("Heartbeat", request, 2.0)  # type: ignore[return-value]

    def status(self) -> pb.SidecarStatus:
        return self._call("GetStatus", pb.GetStatusRequest(), 5.0)  # type: ignore[return-value]

    def detach(self, request: pb.DetachRequest) -> None:
        self._call("Detach", request, 5.0)

    def close(self) -> None:
        self._channel.close()
