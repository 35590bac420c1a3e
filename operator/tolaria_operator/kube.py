"""`KubeApi`: the operator's own asynchronous Kubernetes client (get, list, create, merge-patch,
delete of plain JSON objects), on aiohttp in kopf's event loop.

Used by the reconciler, the sidecar follower and the escalation path; the `protocols.Kube`
seam lets tests swap it. Credentials come from the `kubernetes` client's configuration, which
kopf's login loaded (kubeconfig or in-cluster service account), read again on every request
so rotated tokens are honoured. No model (de)serialisation: the operator builds and reads
dicts. Never retries on its own (kopf retries handlers), never blocks the loop, and maps
every non-2xx answer to a typed error naming the method, the path and the server's reason.

One session, one kept-alive connection pool, for every call: the TLS context is built once per
set of credentials files and reused, because aiohttp pools connections per TLS context and a
new context per request meant a new TCP and TLS handshake per call. `watch` streams a
resource's changes (with a server-side label selector) for `informer.Informer`.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
from kubernetes.client import Configuration

from tolaria_operator.errors import KubeApiError, ObjectExists, WatchExpired
from tolaria_operator.resources import Resource

MERGE_PATCH = "application/merge-patch+json"
MAX_CONNECTIONS = 16
"""Calls in flight at once; more wait for a kept-alive connection (client-go allows a burst
of 10 requests)."""


class KubeApi:
    """A minimal JSON client for the API server (see the module docstring)."""

    def __init__(
        self, configuration: Configuration | None = None, *, request_timeout_s: float = 30.0
    ) -> None:
        self._configuration = configuration
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._watches: aiohttp.ClientSession | None = None
        self._ssl_contexts: dict[tuple[object, ...], ssl.SSLContext] = {}

    def _config(self) -> Configuration:
        if self._configuration is not None:
            return self._configuration
        # kopf's login handler loads it (kubeconfig or in-cluster) after the startup handlers
        # ran, and may load it again when credentials expire: read it on every request.
        return Configuration.get_default_copy()

    def _ssl(self, config: Configuration) -> ssl.SSLContext | bool:
        """The TLS context for these credentials, built once (see the module docstring)."""
        if not str(config.host).startswith("https"):
            return False
        key = (config.ssl_ca_cert, config.cert_file, config.key_file, bool(config.verify_ssl))
        context = self._ssl_contexts.get(key)
        if context is None:
            context = self._ssl_contexts[key] = self._new_ssl(config)
        return context

    @staticmethod
    def _new_ssl(config: Configuration) -> ssl.SSLContext:
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
        session = self._open()
        headers = self._headers(config)
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body)
        url = f"{str(config.host).rstrip('/')}{path}"
        try:
            async with session.request(
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

    def _open(self) -> aiohttp.ClientSession:
        """The session for calls: at most `MAX_CONNECTIONS` at once, kept alive between calls
        (a burst of reconciles queues here instead of opening a connection each)."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS, keepalive_timeout=60)
            self._session = aiohttp.ClientSession(timeout=self._timeout, connector=connector)
        return self._session

    def _open_watches(self) -> aiohttp.ClientSession:
        """The session for watches: one connection each, held for minutes, so not counted
        against the calls' limit."""
        if self._watches is None or self._watches.closed:
            connector = aiohttp.TCPConnector(limit=0)
            self._watches = aiohttp.ClientSession(connector=connector)
        return self._watches

    async def watch(
        self,
        resource: Resource,
        namespace: str | None,
        *,
        labels: Mapping[str, str],
        resource_version: str,
        timeout_s: int,
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """`(type, object)` changes after `resource_version` until the server ends the stream
        (after `timeout_s`); bookmarks included. The selector is sent to the server, which then
        sends only matching objects. Raises `KubeApiError` for an error answer, `WatchExpired`
        when the server says the version is too old (410: list again)."""
        config = self._config()
        params = {
            "watch": "true",
            "labelSelector": selector(labels),
            "resourceVersion": resource_version,
            "timeoutSeconds": str(timeout_s),
            "allowWatchBookmarks": "true",
        }
        path = resource.path(namespace)
        url = f"{str(config.host).rstrip('/')}{path}"
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=timeout_s + 30)
        try:
            async with self._open_watches().get(
                url,
                params=params,
                headers=self._headers(config),
                ssl=self._ssl(config),
                timeout=timeout,
            ) as response:
                if response.status >= 300:
                    raise _error("WATCH", path, response.status, await response.text())
                buffer = b""
                async for chunk in response.content.iter_any():
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if line.strip():
                            yield _watch_event(path, line)
                if buffer.strip():
                    yield _watch_event(path, buffer)
        except (aiohttp.ClientError, TimeoutError) as err:
            raise KubeApiError("WATCH", path, 0, type(err).__name__, str(err)) from err

    async def list_with_version(
        self, resource: Resource, namespace: str | None, labels: Mapping[str, str]
    ) -> tuple[list[dict[str, Any]], str]:
        """Like `list`, with the list's resourceVersion (where a watch starts)."""
        answer = (
            await self._request(
                "GET", resource.path(namespace), params={"labelSelector": selector(labels)}
            )
            or {}
        )
        items = [dict(i) for i in answer.get("items") or [] if matches(i, labels)]
        return items, str((answer.get("metadata") or {}).get("resourceVersion") or "")

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
        params = {"labelSelector": selector(labels)} if labels else None
        answer = await self._request("GET", resource.path(namespace), params=params) or {}
        return [dict(i) for i in answer.get("items") or [] if matches(i, labels or {})]

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
        for session in (self._session, self._watches):
            if session is not None:
                await session.close()
        self._session = self._watches = None


def selector(labels: Mapping[str, str]) -> str:
    """An equality-based label selector (`a=b,c=d`)."""
    return ",".join(f"{k}={v}" for k, v in labels.items())


def matches(obj: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Whether `obj` carries `labels` (applied here too, so a server that ignores a selector
    cannot widen the set)."""
    have = (obj.get("metadata") or {}).get("labels") or {}
    return all(have.get(k) == v for k, v in labels.items())


def _watch_event(path: str, line: bytes) -> tuple[str, dict[str, Any]]:
    try:
        doc = json.loads(line)
        kind, obj = str(doc["type"]), dict(doc["object"])
    except (ValueError, KeyError, TypeError) as err:
        raise KubeApiError(
            "WATCH", path, 0, "BadWatchEvent", line[:200].decode(errors="replace")
        ) from err
    if kind == "ERROR":
        code = int(obj.get("code") or 0)
        if code == GONE:
            raise WatchExpired(
                "WATCH", path, code, str(obj.get("reason") or ""), str(obj.get("message") or "")
            )
        raise KubeApiError(
            "WATCH", path, code, str(obj.get("reason") or ""), str(obj.get("message") or "")
        )
    return kind, obj


GONE = 410
"""The answer to a watch from a resourceVersion the server no longer keeps."""


def _error(method: str, path: str, status: int, text: str) -> KubeApiError:
    reason, message = "", text[:500]
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        reason = str(doc.get("reason") or "")
        message = str(doc.get("message") or message)[:500]
    cls = ObjectExists if status == 409 else WatchExpired if status == GONE else KubeApiError
    return cls(method, path, status, reason, message)
