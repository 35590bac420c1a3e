"""The operator's link to a run's sidecar: `SidecarControl` over gRPC (grpc.aio, TCP, TLS), every
call carrying the run's token as `authorization: Bearer <token>` (R10.5).

The channel trusts only the operator's control CA (`control_tls`, derived from the token key)
and checks that the sidecar's certificate names `<service>.<namespace>.svc` of this run, also
when a resolver dials an IP; the token is sent only inside that TLS session.

`SidecarConnector.open` resolves the address (the headless Service by default; a callable
in tests) and derives the token from the run's UID (`tokens`: no Secret is read);
`SidecarClient` wraps the five calls.
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
from tolaria_operator.control_tls import tls_name
from tolaria_operator.errors import (
    AckTimeout,
    KubeApiError,
    SidecarCallFailed,
    SidecarUnavailable,
    TokenKeyInvalid,
)
from tolaria_operator.protocols import Kube
from tolaria_operator.resources import RUNS, service_name
from tolaria_operator.tokens import RunTokens

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

    def __init__(
        self,
        run: str,
        address: str,
        token: str,
        settings: SidecarLinkSettings,
        *,
        root_ca: bytes | None = None,
        tls_name: str = "",
    ) -> None:
        """Over TLS trusting only `root_ca` and requiring `tls_name` in the sidecar's
        certificate, whatever host `address` names; plain text without `root_ca` (tests of
        loopback sidecars only: a pod's sidecar serves TLS alone)."""
        self.run = run
        self.address = address
        self._settings = settings
        options: list[tuple[str, int | str]] = [
            # pings every 10 s also on an idle event stream, so a dead peer (node gone, no
            # FIN) breaks the stream within ~15 s and the watcher reconnects
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2_000),
        ]
        if root_ca is None:
            self._channel = grpc.aio.insecure_channel(address, options=options)
        else:
            if tls_name:
                options.append(("grpc.ssl_target_name_override", tls_name))
            credentials = grpc.ssl_channel_credentials(root_certificates=root_ca)
            self._channel = grpc.aio.secure_channel(address, credentials, options=options)
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
    """Opens `SidecarClient`s: address from the resolver, token derived from the run's UID."""

    def __init__(
        self,
        kube: Kube,
        settings: SidecarLinkSettings,
        *,
        control_port: int,
        tokens: RunTokens,
        resolve: AddressResolver | None = None,
    ) -> None:
        self._kube = kube
        self._settings = settings
        self._port = control_port
        self._tokens = tokens
        self._resolve = resolve or template_resolver(settings.address_template)

    async def token(self, namespace: str, run: str) -> str:
        """The token of the run as it exists now: its UID is read each time, so a run deleted
        and created again under the same name is never called with the old one's token."""
        where = f"{namespace}/{run}"
        try:
            body = await self._kube.get(RUNS, namespace, run)
        except KubeApiError as err:
            raise SidecarUnavailable(where, f"run unreadable: {err}") from err
        if body is None:
            raise SidecarUnavailable(where, "the run does not exist")
        uid = str((body.get("metadata") or {}).get("uid") or "")
        try:
            return await self._tokens.token(namespace, run, uid)
        except (KubeApiError, TokenKeyInvalid) as err:
            raise SidecarUnavailable(where, f"no run-token key: {err}") from err

    async def open(self, namespace: str, run: str) -> SidecarClient:
        """A client for the run's current sidecar; raises `SidecarUnavailable` without a token."""
        token = await self.token(namespace, run)
        address = self._resolve(namespace, run, self._port)
        ca = await self._tokens.ca()
        return SidecarClient(
            f"{namespace}/{run}",
            address,
            token,
            self._settings,
            root_ca=ca.cert_pem,
            tls_name=tls_name(namespace, run),
        )
