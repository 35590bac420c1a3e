"""The operator's link to a run's sidecar: `SidecarControl` over gRPC (grpc.aio, TCP), every call
carrying the run's token as `authorization: Bearer <token>` (R10.5).

`SidecarConnector.open` resolves the address (the headless Service by default; a callable
in tests) and reads the token from the run's Secret; `SidecarClient` wraps the five calls.
Every deadline is a gRPC deadline, so it bounds real time even when the event loop's clock
is faked. gRPC errors become `SidecarUnavailable` (no answer: connection refused, connect
timeout, token refused) or `SidecarCallFailed`/`AckTimeout` (an answer that is an error);
nothing here retries, logs a token, or holds a connection after `close`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from leyline import EmergencyAck, EmergencyResolution, EmergencySignal
from leyline.v1.sidecar_pb2 import (
    CheckpointRequest,
    CheckpointResponse,
    GetStatusRequest,
    ResolveEmergencyResponse,
    SidecarEvent,
    SidecarStatus,
    StreamEventsRequest,
)
from leyline.v1.sidecar_pb2_grpc import SidecarControlStub
from tolaria_operator.config import SidecarLinkSettings
from tolaria_operator.errors import (
    AckTimeout,
    KubeApiError,
    SidecarCallFailed,
    SidecarUnavailable,
)
from tolaria_operator.pods import read_token
from tolaria_operator.protocols import Kube
from tolaria_operator.resources import SECRETS, service_name, token_name

AddressResolver = Callable[[str, str, int], str]
"""(namespace, run, control port) -> `host:port` of the run's sidecar."""

_NO_ANSWER = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.CANCELLED,
}


def template_resolver(template: str) -> AddressResolver:
    """A resolver filling `{service}`, `{run}`, `{namespace}` and `{port}` into `template`."""

    def resolve(namespace: str, run: str, port: int) -> str:
        return template.format(service=service_name(run), run=run, namespace=namespace, port=port)

    return resolve


class SidecarClient:
    """One connection to one run's sidecar."""

    def __init__(self, run: str, address: str, token: str, settings: SidecarLinkSettings) -> None:
        self.run = run
        self.address = address
        self._settings = settings
        self._channel = grpc.aio.insecure_channel(
            address,
            options=[
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2_000),
            ],
        )
        self._stub = SidecarControlStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),)

    def _unavailable(self, call: str, err: grpc.aio.AioRpcError) -> SidecarUnavailable:
        code = err.code()
        detail = f"{call} at {self.address}: {code.name if code else '?'}: {err.details() or ''}"
        return SidecarUnavailable(self.run, detail.strip())

    def _failed(self, call: str, err: grpc.aio.AioRpcError) -> SidecarCallFailed:
        code = err.code()
        return SidecarCallFailed(self.run, call, code.name if code else "?", err.details() or "")

    async def get_status(self, timeout_s: float | None = None) -> SidecarStatus:
        """`GetStatus`; a sidecar that does not answer within the connect timeout (or refuses
        the token) is unavailable."""
        timeout = timeout_s if timeout_s is not None else self._settings.connect_timeout_seconds
        try:
            return await self._stub.GetStatus(
                GetStatusRequest(), timeout=timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as err:
            if err.code() in _NO_ANSWER or err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise self._unavailable("GetStatus", err) from err
            raise self._failed("GetStatus", err) from err

    async def events(self, after_sequence: int) -> AsyncIterator[SidecarEvent]:
        """`StreamEvents` from after `after_sequence` until the stream breaks, which raises
        `SidecarUnavailable` (the caller reconnects with the last sequence it saw)."""
        call = self._stub.StreamEvents(
            StreamEventsRequest(after_sequence=after_sequence), metadata=self._metadata
        )
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as err:
            raise self._unavailable("StreamEvents", err) from err
        finally:
            call.cancel()
        raise SidecarUnavailable(self.run, f"StreamEvents at {self.address}: stream ended")

    async def signal_emergency(self, signal: EmergencySignal, budget_s: float) -> EmergencyAck:
        """`SignalEmergency`, waiting the level's response budget plus the network grace.

        Raises `AckTimeout` when the sidecar (or the deadline) says nobody acknowledged in
        time, `SidecarUnavailable` when it cannot be reached.
        """
        timeout = budget_s + self._settings.signal_grace_seconds
        try:
            return await self._stub.SignalEmergency(
                signal, timeout=timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise AckTimeout(
                    self.run,
                    "SignalEmergency",
                    "DEADLINE_EXCEEDED",
                    err.details() or f"no acknowledgement within {budget_s:g} s",
                ) from err
            if err.code() in _NO_ANSWER:
                raise self._unavailable("SignalEmergency", err) from err
            raise self._failed("SignalEmergency", err) from err

    async def resolve_emergency(self, resolution: EmergencyResolution) -> ResolveEmergencyResponse:
        try:
            return await self._stub.ResolveEmergency(
                resolution, timeout=self._settings.call_timeout_seconds, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as err:
            if err.code() in _NO_ANSWER or err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise self._unavailable("ResolveEmergency", err) from err
            raise self._failed("ResolveEmergency", err) from err

    async def request_checkpoint(
        self, reason: str, *, stop_after: bool, timeout_s: float
    ) -> CheckpointResponse:
        """`RequestCheckpoint`: the sidecar persists its newest snapshot and answers once it is
        durable or `timeout_s` is nearly over (it then says it is still being written)."""
        try:
            return await self._stub.RequestCheckpoint(
                CheckpointRequest(reason=reason, stop_after=stop_after),
                timeout=timeout_s,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as err:
            if err.code() in _NO_ANSWER:
                raise self._unavailable("RequestCheckpoint", err) from err
            raise self._failed("RequestCheckpoint", err) from err

    async def close(self) -> None:
        await self._channel.close(grace=None)

    async def __aenter__(self) -> SidecarClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class SidecarConnector:
    """Opens `SidecarClient`s: address from the resolver, token from the run's Secret."""

    def __init__(
        self,
        kube: Kube,
        settings: SidecarLinkSettings,
        *,
        control_port: int,
        resolve: AddressResolver | None = None,
    ) -> None:
        self._kube = kube
        self._settings = settings
        self._port = control_port
        self._resolve = resolve or template_resolver(settings.address_template)
        self._tokens: dict[tuple[str, str], str] = {}

    async def token(self, namespace: str, run: str) -> str:
        """The run token from `<run>-token` (cached; `forget` drops it after a refusal)."""
        key = (namespace, run)
        if key not in self._tokens:
            try:
                secret = await self._kube.get(SECRETS, namespace, token_name(run))
            except KubeApiError as err:
                raise SidecarUnavailable(f"{namespace}/{run}", f"token unreadable: {err}") from err
            if secret is None:
                raise SidecarUnavailable(f"{namespace}/{run}", f"no secret {token_name(run)}")
            try:
                self._tokens[key] = read_token(secret)
            except ValueError as err:
                raise SidecarUnavailable(f"{namespace}/{run}", f"token unreadable: {err}") from err
        return self._tokens[key]

    def forget(self, namespace: str, run: str) -> None:
        self._tokens.pop((namespace, run), None)

    async def open(self, namespace: str, run: str) -> SidecarClient:
        """A client for the run's current sidecar; raises `SidecarUnavailable` without a token."""
        token = await self.token(namespace, run)
        address = self._resolve(namespace, run, self._port)
        return SidecarClient(f"{namespace}/{run}", address, token, self._settings)
