"""Token authentication of the TCP control server (R10.5).

`TokenAuth` is a gRPC server interceptor installed only on the `SidecarControl` server: every
call must carry the metadata `authorization: Bearer <token>` equal to the run token (compared
with `hmac.compare_digest`, so timing says nothing about the token), or it is aborted with
UNAUTHENTICATED before any servicer runs. The message says whether the token was missing or
wrong; it never echoes what was sent or the expected value, and nothing here logs a token.
The Unix-socket `TrainerLink` server needs none: its socket is created mode 0600.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

import grpc

from tolaria_sidecar.errors import TokenRequired

METADATA_KEY = "authorization"
SCHEME = "Bearer "

MISSING = (
    "the run token is missing: send metadata 'authorization: Bearer <token>' with the run's "
    "sidecar token"
)
WRONG = "the run token is wrong: this sidecar belongs to another run or the token was rotated"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that carries `token` (for clients)."""
    return ((METADATA_KEY, f"{SCHEME}{token}"),)


class TokenAuth(grpc.ServerInterceptor):
    """Refuses every call whose bearer token is not the run token."""

    def __init__(self, token: str | None) -> None:
        if not token:
            raise TokenRequired()
        self._token = token.encode("utf-8")

    def check(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
        """None when `metadata` carries the run token, else the refusal message."""
        presented = None
        for key, value in metadata or ():
            if key.lower() == METADATA_KEY:
                presented = value if isinstance(value, str) else value.decode("utf-8", "replace")
                break
        if presented is None or not presented.startswith(SCHEME):
            return MISSING
        candidate = presented[len(SCHEME) :].strip().encode("utf-8")
        return None if hmac.compare_digest(candidate, self._token) else WRONG

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        refusal = self.check(handler_call_details.invocation_metadata)
        handler = continuation(handler_call_details)
        if refusal is None or handler is None:
            return handler
        return _refusing(handler, refusal)


def _refusing(
    handler: grpc.RpcMethodHandler[Any, Any], message: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same shape as `handler` that aborts with UNAUTHENTICATED."""

    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    request_streaming = handler.request_streaming
    response_streaming = handler.response_streaming
    if request_streaming and response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)
