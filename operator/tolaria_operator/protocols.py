"""The operator's seams, as Protocols: the Kubernetes API, Event posting, a daemon's stop flag.

Implemented by `kube.KubeApi`, `lifecycle.KopfEvents` and kopf's `DaemonStopped`; tests pass
their own without inheriting. Each method says what it must never do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from tolaria_operator.resources import Resource


class Kube(Protocol):
    async def get(
        self, resource: Resource, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        """The object or None; never raises for a missing object."""
        ...

    async def list(
        self,
        resource: Resource,
        namespace: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """Objects matching `labels`; never returns one that does not match them."""
        ...

    async def create(
        self, resource: Resource, namespace: str | None, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Creates; raises `ObjectExists` on a conflict, never overwrites."""
        ...

    async def patch(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str = "",
    ) -> dict[str, Any] | None:
        """JSON merge patch; None when the object is gone, never creates it."""
        ...

    async def delete(
        self, resource: Resource, namespace: str | None, name: str, *, uid: str = ""
    ) -> bool:
        """Deletes (only the object with `uid`, when given); False when already gone or another
        object holds the name now, never waits for the object to disappear."""
        ...


class EventSink(Protocol):
    def post(self, ref: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """Queues a Kubernetes Event on the object `ref`; never blocks, never raises."""
        ...


class StopFlag(Protocol):
    def is_set(self) -> bool:
        """Whether the daemon must stop (kopf also cancels the daemon's task); never blocks."""
        ...
