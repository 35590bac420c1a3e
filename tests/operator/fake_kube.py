"""An in-memory `protocols.Kube` for reconciler tests (a fake at our seam; no HTTP)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from tolaria_operator.errors import KubeApiError, ObjectExists
from tolaria_operator.resources import Resource


def _merge(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str | None, str], dict[str, Any]] = {}
        self.terminating: set[str] = set()
        """Names whose deletion only marks them (a pod with a long grace period)."""
        self.calls: list[tuple[str, str, str]] = []
        """(verb, plural, name) of every call; a list's name is its namespace, or `*`."""
        self.refuse: dict[str, KubeApiError] = {}
        """Creates of these plurals fail with the error (an API server refusing the object)."""

    async def get(
        self, resource: Resource, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        self.calls.append(("get", resource.plural, name))
        obj = self.objects.get((resource.plural, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    async def list(
        self,
        resource: Resource,
        namespace: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        self.calls.append(("list", resource.plural, namespace or "*"))
        return [
            copy.deepcopy(o)
            for (plural, ns, _), o in self.objects.items()
            if plural == resource.plural
            and (namespace is None or ns == namespace)
            and all(
                (o["metadata"].get("labels") or {}).get(k) == v for k, v in (labels or {}).items()
            )
        ]

    async def create(
        self, resource: Resource, namespace: str | None, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        key = (resource.plural, namespace, body["metadata"]["name"])
        self.calls.append(("create", resource.plural, key[2]))
        if key in self.objects:
            raise ObjectExists("POST", resource.path(namespace), 409, "AlreadyExists", "exists")
        if resource.plural in self.refuse:
            raise self.refuse[resource.plural]
        self.objects[key] = copy.deepcopy(dict(body))
        return copy.deepcopy(dict(body))

    async def patch(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str = "",
    ) -> dict[str, Any] | None:
        obj = self.objects.get((resource.plural, namespace, name))
        self.calls.append(
            ("patch", resource.plural, name + (f"/{subresource}" if subresource else ""))
        )
        if obj is None:
            return None
        _merge(obj, patch)
        return copy.deepcopy(obj)

    async def delete(
        self, resource: Resource, namespace: str | None, name: str, *, uid: str = ""
    ) -> bool:
        key = (resource.plural, namespace, name)
        self.calls.append(("delete", resource.plural, name))
        if key not in self.objects:
            return False
        if uid and self.objects[key]["metadata"].get("uid") != uid:
            return False
        if name in self.terminating:
            self.objects[key]["metadata"]["deletionTimestamp"] = "2026-11-25T12:00:00Z"
        else:
            del self.objects[key]
        return True
