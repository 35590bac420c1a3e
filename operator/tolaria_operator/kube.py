"""`KubeApi`: the operator's own asynchronous Kubernetes client (get, list, create, merge-patch,
delete of plain JSON objects), on aiohttp in kopf's event loop.

Used by the reconciler, the sidecar follower and the escalation path; the `protocols.Kube`
seam lets tests swap it. Credentials come from the `kubernetes` client's configuration, which
kopf's login loaded (kubeconfig or in-cluster service account), read again on every request
so rotated tokens are honoured. No model (de)serialisation: the operator builds and reads
dicts. Never retries on its own (kopf retries handlers), never blocks the loop, and maps
every non-2xx answer to a typed error naming the method, the path and the server's reason.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from typing import Any

import aiohttp
from kubernetes.client import Configuration

from tolaria_operator.errors import KubeApiError, ObjectExists
from tolaria_operator.resources import Resource

MERGE_PATCH = "application/merge-patch+json"


class KubeApi:
    """A minimal JSON client for the API server (see the module docstring)."""

    def __init__(
        self, configuration: Configuration | None = None, *, request_timeout_s: float = 30.0
    ) -> None:
        self._configuration = configuration
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _config(self) -> Configuration:
        if self._configuration is not None:
            return self._configuration
        # kopf's login handler loads it (kubeconfig or in-cluster) after the startup handlers
        # ran, and may load it again when credentials expire: read it on every request.
        return Configuration.get_default_copy()

    def _ssl(self, config: Configuration) -> ssl.SSLContext | bool:
        if not str(config.host).startswith("https"):
            return False
        context = ssl.create_default_context(cafile=config.ssl_ca_cert or None)
        if config.cert_file and config.key_file:
            context.load_cert_chain(config.cert_file, config.key_file)
        if not config.verify_ssl:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def _headers(self, config: Configuration) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix(
            "authorization"
        )
        if token:
            headers["Authorization"] = token if " " in token else f"Bearer {token}"
        elif config.username or config.password:
            basic = aiohttp.BasicAuth(config.username or "", config.password or "")
            headers["Authorization"] = basic.encode()
        return headers

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        missing_ok: bool = False,
    ) -> dict[str, Any] | None:
        config = self._config()
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        headers = self._headers(config)
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body)
        url = f"{str(config.host).rstrip('/')}{path}"
        try:
            async with self._session.request(
                method, url, params=params, data=data, headers=headers, ssl=self._ssl(config)
            ) as response:
                text = await response.text()
                if response.status == 404 and missing_ok:
                    return None
                if response.status >= 300:
                    raise _error(method, path, response.status, text)
                return json.loads(text) if text else {}
        except (aiohttp.ClientError, TimeoutError) as err:
            raise KubeApiError(method, path, 0, type(err).__name__, str(err)) from err

    async def get(
        self, resource: Resource, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        return await self._request("GET", resource.path(namespace, name), missing_ok=True)

    async def list(
        self,
        resource: Resource,
        namespace: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """Objects of `resource` in `namespace` (all namespaces when None) matching `labels`.

        The selector is also applied here, so a server that ignores it cannot widen the set.
        """
        params = (
            {"labelSelector": ",".join(f"{k}={v}" for k, v in labels.items())} if labels else None
        )
        answer = await self._request("GET", resource.path(namespace), params=params) or {}
        items: list[dict[str, Any]] = [dict(i) for i in answer.get("items") or []]
        if labels:
            items = [
                i
                for i in items
                if all(
                    ((i.get("metadata") or {}).get("labels") or {}).get(k) == v
                    for k, v in labels.items()
                )
            ]
        return items

    async def create(
        self, resource: Resource, namespace: str | None, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Creates the object; raises `ObjectExists` when it is already there."""
        return await self._request("POST", resource.path(namespace), body=dict(body)) or {}

    async def patch(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str = "",
    ) -> dict[str, Any] | None:
        """JSON merge patch (of `/status` with `subresource="status"`); None when gone."""
        path = resource.path(namespace, name) + (f"/{subresource}" if subresource else "")
        return await self._request(
            "PATCH", path, body=dict(patch), content_type=MERGE_PATCH, missing_ok=True
        )

    async def delete(
        self, resource: Resource, namespace: str | None, name: str, *, uid: str = ""
    ) -> bool:
        """Deletes the object (background propagation: the garbage collector then removes
        what it owns); False when it was already gone. With `uid`, only that object: False
        when the name now holds another one (the server's UID precondition fails, 409)."""
        body: dict[str, Any] = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "propagationPolicy": "Background",
        }
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            answer = await self._request(
                "DELETE", resource.path(namespace, name), body=body, missing_ok=True
            )
        except ObjectExists:
            if uid:
                return False
            raise
        return answer is not None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _error(method: str, path: str, status: int, text: str) -> KubeApiError:
    reason, message = "", text[:500]
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        reason = str(doc.get("reason") or "")
        message = str(doc.get("message") or message)[:500]
    cls = ObjectExists if status == 409 else KubeApiError
    return cls(method, path, status, reason, message)
