"""A real Kubernetes CRD API server for the session, with both Tolaria CRDs applied as the Helm
chart renders them (the same bytes as `crds/`, which tests/chart checks; `crds/` itself is used
only where helm-python-sdk is not installed).

`tools/crd-apiserver` builds Kubernetes' own apiextensions-apiserver (cached in
`~/.cache/tolaria/crd-apiserver`) and runs it on 127.0.0.1 with a private etcd.
The build is a step of `make test` that runs before pytest under its own time
bound (`scripts/crd-apiserver.sh`, `make crd-apiserver`); the suite never
builds, because a cold build (minutes) inside the first test that needs the
server would run into pytest's per-test timeout. Tests that need it are marked
`apiserver` and take the `kube` fixture: they are skipped, with the build's
recorded error (or "not built"), where there is no current server, and fail
where a built server does not start. Each test works in its own namespace
(`namespace` fixture; the server accepts any name without a Namespace object).
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kubernetes
import pytest
import pytest_asyncio
import yaml
from kubernetes.client import ApiClient, ApiextensionsV1Api, CustomObjectsApi
from kubernetes.client.rest import ApiException

from leyline.crd import crds

if TYPE_CHECKING:
    from tests.k8s.hybrid_api import HybridApi
    from tests.k8s.operator_world import RealCluster

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "crd-apiserver"
CRD_DIR = ROOT / "crds"
DEADLINE_SECONDS = 60.0
"""Generous: the server answers in well under a second, but CI machines stall."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "apiserver: needs the real CRD API server (skipped when it cannot be built)"
    )


def wait_for(what: str, probe: Callable[[], Any], deadline_s: float = DEADLINE_SECONDS) -> Any:
    """Polls `probe` until it returns something truthy; fails naming `what` after the deadline."""
    end = time.monotonic() + deadline_s
    last: Any = None
    while time.monotonic() < end:
        last = probe()
        if last:
            return last
        time.sleep(0.05)
    pytest.fail(f"{what}: not within {deadline_s:.0f} s (last: {last!r})")


@pytest.fixture(scope="session")
def crd_apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Kubeconfig of a real CRD API server shared by the session; skips when none is built."""
    build = subprocess.run(
        [TOOL / "build.sh", "--no-build"], capture_output=True, text=True, timeout=60, check=False
    )
    if build.returncode != 0:
        reason = (build.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"real CRD API server unavailable: {reason}")
    workdir = tmp_path_factory.mktemp("crd-apiserver")
    start = subprocess.run(
        [TOOL / "start.sh", workdir], capture_output=True, text=True, timeout=180, check=False
    )
    if start.returncode != 0:
        subprocess.run([TOOL / "stop.sh", workdir], capture_output=True, check=False)
        pytest.fail(f"start.sh failed (the server is built, so this is a bug):\n{start.stderr}")
    try:
        yield workdir / "kubeconfig"
    finally:
        subprocess.run([TOOL / "stop.sh", workdir], capture_output=True, check=False)


def installed_crds() -> list[dict[str, Any]]:
    """The CRDs `helm install` would create: the chart's rendering, else `crds/`."""
    from tests.chart.rendering import helm, of_kind, render

    if helm is not None:
        return of_kind(render(), "CustomResourceDefinition")
    return [  # pragma: no cover - helm-python-sdk is a dev dependency
        yaml.safe_load((CRD_DIR / name).read_text(encoding="utf-8")) for name in crds()
    ]


def _established(ext: ApiextensionsV1Api, name: str) -> bool:
    conditions = ext.read_custom_resource_definition(name).status.conditions or []
    return any(c.type == "Established" and c.status == "True" for c in conditions)


def _serving(custom: CustomObjectsApi, crd: dict[str, Any]) -> bool:
    """Whether the resource's endpoint answers: Established can precede the handler by a moment."""
    plural = crd["spec"]["names"]["plural"]
    try:
        custom.list_cluster_custom_object(crd["spec"]["group"], "v1alpha1", plural, limit=1)
    except ApiException as err:
        if err.status == 404:
            return False
        raise
    return True


@pytest.fixture(scope="session")
def kube(crd_apiserver: Path) -> Iterator[ApiClient]:
    """An ApiClient for the test server with the chart's CRDs applied and Established.

    Built from the kubeconfig file, never from `$KUBECONFIG` (the client reads that once, at
    import time).
    """
    api = kubernetes.config.new_client_from_config(config_file=str(crd_apiserver))
    ext = ApiextensionsV1Api(api)
    custom = CustomObjectsApi(api)
    bodies = installed_crds()
    assert sorted(b["metadata"]["name"] for b in bodies) == sorted(
        c["metadata"]["name"] for c in crds().values()
    )
    for body in bodies:
        ext.create_custom_resource_definition(body)
    for name, crd in crds().items():
        wait_for(f"{name} Established", lambda n=crd["metadata"]["name"]: _established(ext, n))
        wait_for(f"{name} served", lambda c=crd: _serving(custom, c))
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def custom(kube: ApiClient) -> CustomObjectsApi:
    """CustomObjectsApi on the test server."""
    return CustomObjectsApi(kube)


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> str:
    """A namespace name of this test's own (CRDs are cluster-wide; names must not collide)."""
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    return f"{stem}-{uuid.uuid4().hex[:6]}"


@pytest_asyncio.fixture
async def world(
    kmock: Any,
    kube: ApiClient,
    crd_apiserver: Path,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[RealCluster, HybridApi]]:
    """The in-process operator's cluster on the real server for Tolaria's objects and kmock for
    the rest (`operator_world`); the operator is started by the test."""
    from tests.k8s.operator_world import open_world

    async with open_world(kmock, kube, crd_apiserver, namespace, tmp_path, monkeypatch) as pair:
        yield pair
