"""The gRPC servicers' boundary: every request field checked at the edge, every error mapped
to the status code a client acts on.

Used by both servicers (`trainer_link`, `sidecar_control`): `guarded` wraps each method, the
`check_*` functions refuse a field naming it. Typed errors map to status codes naming the
field: `RequestInvalid` -> INVALID_ARGUMENT, `PreconditionFailed` and other `SidecarError`s ->
FAILED_PRECONDITION, `NotFound` -> NOT_FOUND, `AckTimeout` -> DEADLINE_EXCEEDED,
`SharedMemoryFull` -> RESOURCE_EXHAUSTED. Anything else is a bug: logged with its traceback,
answered INTERNAL. The boundary calls no component and keeps no state.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

import grpc

from leyline import (
    SCHEMA_VERSION,
    AnomalyKind,
    EmergencyAction,
    EmergencySignal,
    Participant,
)
from tolaria_sidecar.errors import (
    AckTimeout,
    NotFound,
    RequestInvalid,
    SharedMemoryFull,
    SidecarError,
)

logger = logging.getLogger(__name__)

_S = TypeVar("_S")
_R = TypeVar("_R")
_P = ParamSpec("_P")

_CODES: tuple[tuple[type[SidecarError], grpc.StatusCode], ...] = (
    (RequestInvalid, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AckTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (SharedMemoryFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (SidecarError, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_code(err: SidecarError) -> grpc.StatusCode:
    """The gRPC status a typed sidecar error is answered with."""
    return next(code for kind, code in _CODES if isinstance(err, kind))


def guarded(
    method: Callable[Concatenate[_S, _P], _R],
) -> Callable[Concatenate[_S, _P], _R]:
    """Servicer boundary: typed errors -> their status code; anything else -> INTERNAL."""

    def wrapper(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        context = args[1] if len(args) > 1 else kwargs["context"]
        if not isinstance(context, grpc.ServicerContext):
            raise TypeError("a servicer method's second argument is its context")
        try:
            return method(self, *args, **kwargs)
        except SidecarError as err:
            context.abort(status_code(err), str(err))
        except Exception as err:  # boundary: a servicer never lets a bug kill the RPC thread
            logger.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}")

    functools.update_wrapper(wrapper, method)
    return wrapper


# -- field checks -----------------------------------------------------------------------------


def check_version(version: int) -> None:
    if version not in (0, SCHEMA_VERSION):
        raise RequestInvalid("version", f"must be {SCHEMA_VERSION} (or unset), got {version}")


def check_enum(field: str, enum: object, value: int, *, required: bool = False) -> None:
    """Refuses a value the Leyline enum does not define (and 0 when `required`)."""
    names = getattr(enum, "items")()  # noqa: B009 - protobuf enum wrappers are untyped here
    if value not in {number for _, number in names}:
        raise RequestInvalid(field, f"{value} is not a {getattr(enum, 'DESCRIPTOR').name} value")  # noqa: B009
    if required and value == 0:
        raise RequestInvalid(field, "must be set")


def check_signal(signal: EmergencySignal, run_id: str) -> None:
    check_version(signal.version)
    if not 1 <= signal.level <= 4:
        raise RequestInvalid("level", f"must be MINOR..CRITICAL (1..4), got {signal.level}")
    check_enum("kind", AnomalyKind, signal.kind)
    check_enum("action", EmergencyAction, signal.action)
    check_enum("source", Participant, signal.source)
    if signal.run_id and signal.run_id != run_id:
        raise RequestInvalid("run_id", f"{signal.run_id!r} is not this sidecar's run {run_id!r}")
