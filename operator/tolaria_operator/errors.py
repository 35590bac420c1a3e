"""The operator's errors, named for what the caller does next (cf. kopf's `PermanentError`,
`TemporaryError`).

Raised by the settings parser, the Kubernetes and sidecar clients and the reconciler;
`lifecycle.kopf_errors` maps them onto kopf's retry semantics at the handler boundary.
Every error carries its context in attributes and in the message; none is ever used for
control flow on a hot path, and none swallows its cause (`raise ... from err`).
"""

from __future__ import annotations


class OperatorError(Exception):
    """Base of every error the operator raises on purpose."""


class SettingsInvalid(OperatorError):
    """A setting (flag or environment variable) is refused at start-up: fix it and restart."""

    def __init__(self, name: str, rule: str) -> None:
        super().__init__(f"{name}: {rule}")
        self.name = name
        self.rule = rule


class SpecInvalid(OperatorError):
    """The run's manifest cannot be run as it is: give up until the spec changes."""

    def __init__(self, run: str, detail: str) -> None:
        super().__init__(f"TolariaRun {run}: {detail}")
        self.run = run
        self.detail = detail


class KubeApiError(OperatorError):
    """The API server refused or failed a request: retry later (it usually heals)."""

    def __init__(self, method: str, path: str, status: int, reason: str, message: str) -> None:
        super().__init__(f"{method} {path}: {status} {reason}: {message}")
        self.method = method
        self.path = path
        self.status = status
        self.reason = reason
        self.detail = message


class ObjectExists(KubeApiError):
    """409 Conflict: on create, the object is already there (read it instead of creating it);
    on a write with a precondition (`resourceVersion`, `uid`), the object changed since."""


class WatchExpired(KubeApiError):
    """410 on a watch: the server no longer keeps that resourceVersion; list again."""


class PodNotGone(OperatorError):
    """A deleted pod is still there: retry later; the next attempt waits for it (never two
    pods of one run at once)."""

    def __init__(self, pod: str, waited_s: float) -> None:
        super().__init__(f"pod {pod} still exists {waited_s:.0f} s after its deletion")
        self.pod = pod
        self.waited_s = waited_s


class SidecarUnavailable(OperatorError):
    """A run's sidecar cannot be reached (no pod, refused, connect timeout, token refused):
    mark the run Unreachable, or reconnect after a back-off."""

    def __init__(self, run: str, detail: str) -> None:
        super().__init__(f"sidecar of {run}: {detail}")
        self.run = run
        self.detail = detail


class SidecarCallFailed(OperatorError):
    """The sidecar answered with an error: record it; the call is not retried blindly."""

    def __init__(self, run: str, call: str, code: str, detail: str) -> None:
        super().__init__(f"sidecar of {run}: {call} failed: {code}: {detail}")
        self.run = run
        self.call = call
        self.code = code
        self.detail = detail


class AckTimeout(SidecarCallFailed):
    """A signalled sidecar did not acknowledge within the level's budget: record NoAck."""


class TokenKeyInvalid(OperatorError):
    """The Secret keeping the operator's run-token key is unusable: fix or delete it (a new key
    is then made; runs started before get the new token with their next attempt)."""

    def __init__(self, where: str, detail: str) -> None:
        super().__init__(f"run-token key in {where}: {detail}")
        self.where = where
        self.detail = detail
