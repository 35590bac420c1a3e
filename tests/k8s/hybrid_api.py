"""One API endpoint made of two servers: Tolaria's resources on the real CRD API server,
everything else (pods, secrets, services, network policies, events) on kmock.

The operator and kopf see one plain-HTTP URL. `/apis/tolaria.dev/...` goes to the real server
(TLS with the kubeconfig's client certificate), `/apis` merges both group lists, and the rest
goes to kmock; responses are streamed, so watches work through it. Every PATCH the operator
sends to a Tolaria object is recorded with the server's answer: `pruned()` names each field the
operator wrote that the real server dropped or changed (the CRD schema's pruning), and
`status_ignored()` each status sent to the main resource (where the server ignores it).
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes
from aiohttp import web
from kubernetes.client import Configuration

TOLARIA_PREFIX = "/apis/tolaria.dev/"
_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "authorization"}


@dataclass
class Exchange:
    path: str
    sent: Any
    answer: Any


def _real_server(kubeconfig: Path) -> tuple[str, ssl.SSLContext]:
    config = Configuration()
    kubernetes.config.load_kube_config(str(kubeconfig), client_configuration=config)
    context = ssl.create_default_context(cafile=config.ssl_ca_cert)
    context.load_cert_chain(config.cert_file, config.key_file)
    return str(config.host).rstrip("/"), context


def missing_leaves(sent: Any, answer: Any, path: str = "") -> list[str]:
    """Fields of a merge patch `sent` that are not in `answer` as written (null = deletion)."""
    if isinstance(sent, dict):
        if not isinstance(answer, dict):
            return [path or "."]
        out: list[str] = []
        for key, value in sent.items():
            if value is None:
                continue
            out += missing_leaves(value, answer.get(key), f"{path}.{key}" if path else key)
        return out
    if isinstance(sent, list):
        if not isinstance(answer, list) or len(answer) != len(sent):
            return [path]
        out = []
        for i, (a, b) in enumerate(zip(sent, answer, strict=True)):
            out += missing_leaves(a, b, f"{path}[{i}]")
        return out
    return [] if sent == answer else [f"{path} (sent {sent!r}, stored {answer!r})"]


@dataclass
class HybridApi:
    kubeconfig: Path
    kmock_url: str
    exchanges: list[Exchange] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None
    _real: str = ""
    _ssl: ssl.SSLContext | None = None

    async def start(self) -> str:
        self._real, self._ssl = _real_server(self.kubeconfig)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    # -- checks ------------------------------------------------------------------------------

    def status_writes(self) -> list[Exchange]:
        return [
            e for e in self.exchanges if e.path.endswith("/status") and isinstance(e.sent, dict)
        ]

    def pruned(self) -> list[str]:
        out = []
        for e in self.status_writes():
            for leaf in missing_leaves(e.sent.get("status") or {}, e.answer.get("status") or {}):
                out.append(f"{e.path}: status.{leaf}")
        return out

    def status_ignored(self) -> list[str]:
        return [
            e.path
            for e in self.exchanges
            if not e.path.endswith("/status")
            and isinstance(e.sent, dict)
            and e.sent.get("status") is not None
        ]

    # -- proxying ----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == "/apis" and request.method == "GET":
            return await self._merged_groups()
        real = path.startswith(TOLARIA_PREFIX)
        target = (self._real if real else self.kmock_url.rstrip("/")) + request.path_qs
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        assert self._session is not None
        async with self._session.request(
            request.method,
            target,
            data=body if body else None,
            headers=headers,
            ssl=self._ssl if real else None,
        ) as upstream:
            if real and request.method == "PATCH" and upstream.status < 300:
                answer = await upstream.read()
                self.exchanges.append(Exchange(path, json.loads(body), json.loads(answer)))
                return web.Response(
                    body=answer,
                    status=upstream.status,
                    content_type=upstream.content_type,
                )
            response = web.StreamResponse(status=upstream.status)
            response.content_type = upstream.content_type
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            except (ConnectionError, aiohttp.ClientError):
                pass  # the client went away mid-stream (a watch closed at shutdown)
            return response

    async def _merged_groups(self) -> web.Response:
        assert self._session is not None
        groups: dict[str, Any] = {}
        for base, context in ((self._real, self._ssl), (self.kmock_url.rstrip("/"), None)):
            async with self._session.get(base + "/apis", ssl=context) as answer:
                if answer.status >= 300:
                    continue
                for group in (await answer.json()).get("groups", []):
                    groups.setdefault(group["name"], group)
        return web.json_response(
            {"kind": "APIGroupList", "apiVersion": "v1", "groups": list(groups.values())}
        )
