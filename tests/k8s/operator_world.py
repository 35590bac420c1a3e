"""The in-process operator against the real CRD API server (`HybridApi`: Tolaria's objects
on the real server, everything else on kmock), as the operator tests' `Cluster` sees it, and
the `world` fixture that starts both (tests/k8s/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import kubernetes.config.kube_config
import pytest
from kubernetes.client import ApiClient, CustomObjectsApi
from kubernetes.client.rest import ApiException

from tests.k8s.hybrid_api import HybridApi
from tests.operator.harness import Cluster
from tolaria_operator.clock import SystemClock

REAL = {"tolariaruns", "tolariaincidents"}


class RealCluster(Cluster):
    """The harness's cluster, reading Tolaria's objects from the real server."""

    def __init__(self, kmock: Any, custom: CustomObjectsApi, url: str, namespace: str) -> None:
        super().__init__(kmock)
        self.custom = custom
        self.url = url
        self.namespace = namespace
        self.clock = SystemClock()

    async def create_run(self, body: dict[str, Any]) -> None:
        """As a user would: the server assigns uid, resourceVersion and generation."""
        meta = body["metadata"]
        for key in ("uid", "resourceVersion", "generation"):
            meta.pop(key, None)
        await super().create_run(body)

    def get(self, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        if plural not in REAL:
            return super().get(plural, namespace, name)
        try:
            if namespace is None:
                found = self.custom.get_cluster_custom_object(
                    "tolaria.dev", "v1alpha1", plural, name
                )
            else:
                found = self.custom.get_namespaced_custom_object(
                    "tolaria.dev", "v1alpha1", namespace, plural, name
                )
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return dict(found)

    def incidents(self) -> list[dict[str, Any]]:
        listed = self.custom.list_cluster_custom_object(
            "tolaria.dev", "v1alpha1", "tolariaincidents"
        )
        return [i for i in listed["items"] if i["spec"]["sourceRun"]["namespace"] == self.namespace]


@asynccontextmanager
async def open_world(
    kmock: Any,
    kube: ApiClient,
    crd_apiserver: Path,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[RealCluster, HybridApi]]:
    kmock.resources.load_bundled()
    hybrid = HybridApi(crd_apiserver, str(kmock.url))
    url = await hybrid.start()
    config = tmp_path / "kubeconfig"
    config.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: hybrid, cluster: {{server: '{url}'}}}}]\n"
        "users: [{name: test, user: {token: test-token}}]\n"
        "contexts: [{name: hybrid, context: {cluster: hybrid, user: test}}]\n"
        "current-context: hybrid\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(config))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    cluster = RealCluster(kmock, CustomObjectsApi(kube), url, namespace)
    try:
        yield cluster, hybrid
    finally:
        await cluster.close()
        await hybrid.close()
