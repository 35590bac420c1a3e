"""The operator's JSON client against kmock: missing objects, conflicts, merge patches,
label selection applied even by a server that ignores it; one kept-alive TLS connection."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
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


@pytest.mark.asyncio
async def test_calls_over_tls_share_one_kept_alive_connection(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    peers: set[object] = set()

    async def answer(request: web.Request) -> web.Response:
        peers.add(request.transport)
        return web.json_response({"kind": "ConfigMap", "metadata": {"name": "m"}})

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/default/configmaps/m", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    config = Configuration(host=f"https://127.0.0.1:{port}")
    config.ssl_ca_cert = str(cert)
    api = KubeApi(config)
    try:
        for _ in range(20):
            assert await api.get(CONFIGMAPS, "default", "m") is not None
        assert len(peers) == 1, f"{len(peers)} TLS connections for 20 calls"
    finally:
        await api.close()
        await runner.cleanup()


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "server.crt", tmp_path / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
