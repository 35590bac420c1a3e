"""The operator's JSON client against kmock: missing objects, conflicts, merge patches,
label selection applied even by a server that ignores it."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client import Configuration

from tolaria_operator.errors import KubeApiError, ObjectExists
from tolaria_operator.kube import KubeApi
from tolaria_operator.resources import CONFIGMAPS

pytestmark = pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning")


def config_map(name: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "data": {"a": "1"},
    }


@pytest.mark.asyncio
async def test_get_create_list_patch_delete(kmock: Any) -> None:
    kmock.resources.load_bundled()
    config = Configuration(host=str(kmock.url).rstrip("/"))
    config.api_key = {"BearerToken": "t"}
    config.api_key_prefix = {"BearerToken": "Bearer"}
    api = KubeApi(config)
    try:
        assert await api.get(CONFIGMAPS, "default", "m1") is None
        await api.create(CONFIGMAPS, "default", config_map("m1", app="x"))
        await api.create(CONFIGMAPS, "default", config_map("m2", app="y"))
        with pytest.raises(ObjectExists):
            await api.create(CONFIGMAPS, "default", config_map("m1"))
        assert [
            o["metadata"]["name"] for o in await api.list(CONFIGMAPS, "default", {"app": "x"})
        ] == ["m1"]
        patched = await api.patch(CONFIGMAPS, "default", "m1", {"data": {"b": "2"}})
        assert patched is not None and patched["data"] == {"a": "1", "b": "2"}
        assert await api.patch(CONFIGMAPS, "default", "gone", {"data": {}}) is None
        assert await api.delete(CONFIGMAPS, "default", "m1") is True
        assert await api.delete(CONFIGMAPS, "default", "m1") is False
        headers = api._headers(config)
        assert headers["Authorization"] == "Bearer t"
    finally:
        await api.close()


@pytest.mark.asyncio
async def test_an_unreachable_server_is_an_api_error() -> None:
    from tests.operator.fake_sidecar import closed_port

    api = KubeApi(Configuration(host=f"http://127.0.0.1:{closed_port()}"))
    try:
        with pytest.raises(KubeApiError, match="GET /api/v1/namespaces/default/configmaps/x"):
            await api.get(CONFIGMAPS, "default", "x")
    finally:
        await api.close()
