"""What Helm checks against the cluster at install time: the chart's kubeVersion (the oldest
Kubernetes it supports) and native sidecars only on 1.29 or later.

A tiny fake API server on 127.0.0.1 answers discovery with a chosen Kubernetes version; Helm
(through the SDK) asks it during a server-side dry-run install, as it asks a real cluster.
It serves no resources, so an install that gets past the templates fails later, building the
objects: that failure is expected and shows the checks under test passed.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.chart.rendering import CHART_DIR, NAMESPACE, RELEASE, helm


def _discovery(path: str, version: tuple[int, int]) -> dict[str, Any] | None:
    major, minor = version
    if path.startswith("/version"):
        return {"major": str(major), "minor": str(minor), "gitVersion": f"v{major}.{minor}.3"}
    if path.startswith("/apis"):
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": []}
    if path.startswith("/api/v1"):
        return {"kind": "APIResourceList", "groupVersion": "v1", "resources": []}
    if path.startswith("/api"):
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
    return None


@pytest.fixture
def cluster_of_version() -> Iterator[Any]:
    """A function: Kubernetes (major, minor) -> a helm Config pointing at a fake API server."""
    servers: list[ThreadingHTTPServer] = []
    configs: list[Any] = []

    def start(version: tuple[int, int]) -> Any:
        class Discovery(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = _discovery(self.path, version)
                data = json.dumps(body).encode() if body is not None else b"{}"
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Discovery)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        config = helm.Config(
            kube_apiserver=f"http://127.0.0.1:{server.server_port}",
            kube_token="test",
            namespace=NAMESPACE,
        )
        configs.append(config)
        return config

    yield start
    for config in configs:
        config.close()
    for server in servers:
        server.shutdown()
        server.server_close()


def dry_run_install(config: Any, values: dict[str, Any] | None = None) -> str:
    """Helm's error from a server-side dry-run install (there always is one, see above)."""
    with helm.Chart.load(CHART_DIR) as chart, pytest.raises(helm.HelmError) as caught:
        config.install(chart, RELEASE, values, namespace=NAMESPACE, dry_run="server")
    return str(caught.value)


def test_a_cluster_older_than_the_oldest_supported_is_refused(cluster_of_version: Any) -> None:
    error = dry_run_install(cluster_of_version((1, 27)), {"runs": {"nativeSidecar": False}})
    assert "kubeVersion" in error and ">=1.28.0-0" in error


def test_native_sidecars_are_refused_on_1_28_naming_the_value(cluster_of_version: Any) -> None:
    error = dry_run_install(cluster_of_version((1, 28)))
    assert "runs.nativeSidecar=true needs Kubernetes 1.29 or later" in error
    assert "v1.28.3" in error and "set runs.nativeSidecar=false" in error


def test_1_28_without_native_sidecars_gets_past_both_checks(cluster_of_version: Any) -> None:
    error = dry_run_install(cluster_of_version((1, 28)), {"runs": {"nativeSidecar": False}})
    assert "kubeVersion" not in error and "nativeSidecar" not in error
    assert "unable to build kubernetes objects" in error


def test_native_sidecars_pass_on_1_29(cluster_of_version: Any) -> None:
    error = dry_run_install(cluster_of_version((1, 29)))
    assert "nativeSidecar" not in error and "unable to build kubernetes objects" in error
