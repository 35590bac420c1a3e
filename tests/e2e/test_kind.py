"""End to end on a real cluster: kind, the three images, the Helm chart, a run (R10).

Needs a Docker engine, the `kind` and `kubectl` binaries and helm-python-sdk (which installs the
chart as `helm install` does, through Helm's own Go SDK); skips, saying which is missing, where
they cannot run (CI machines here have no Docker engine). Builds the images with `make images`,
loads them into a throwaway kind cluster, installs `charts/tolaria` (CRDs, RBAC, operator) as
release `tolaria` in `tolaria-system`, applies `examples/kind-quickstart.yaml` and waits for
Succeeded; then uninstalls the release, which must leave the CRDs and the run.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "tolaria"
IMAGES = ("trainer", "sidecar", "operator")
VERSION = "0.1.0"
RELEASE, NAMESPACE = "tolaria", "tolaria-system"


def _missing() -> str | None:
    for tool in ("docker", "kind", "kubectl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if importlib.util.find_spec("helm_python") is None:
        return "helm-python-sdk is not installed (pip install -e '.[dev]')"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, check=False)
    if info.returncode != 0:
        return "no Docker engine is running (docker info failed)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=f"kind e2e: {_missing()}")


def sh(*args: str, timeout: float = 900) -> str:
    done = subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )
    return done.stdout


def helm_install(kubeconfig: Path) -> None:
    """`helm install tolaria charts/tolaria -n tolaria-system --create-namespace`, through the
    SDK (the README's command, with the chart's default values)."""
    import helm_python as helm

    with helm.Config(kubeconfig_path=kubeconfig, namespace=NAMESPACE) as config:
        config.install(CHART, RELEASE, namespace=NAMESPACE, create_namespace=True, timeout=300)


def helm_uninstall(kubeconfig: str) -> None:
    import helm_python as helm

    with helm.Config(kubeconfig_path=kubeconfig, namespace=NAMESPACE) as config:
        config.uninstall(RELEASE, timeout=300)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    name = f"tolaria-e2e-{uuid.uuid4().hex[:6]}"
    kubeconfig = tmp_path_factory.mktemp("kind") / "kubeconfig"
    sh("make", "images")
    sh(
        "kind",
        "create",
        "cluster",
        "--name",
        name,
        "--kubeconfig",
        str(kubeconfig),
        "--wait",
        "120s",
    )
    try:
        for image in IMAGES:
            sh("kind", "load", "docker-image", f"ghcr.io/tolaria/{image}:{VERSION}", "--name", name)
        helm_install(kubeconfig)
        sh(
            "kubectl",
            "--kubeconfig",
            str(kubeconfig),
            "-n",
            NAMESPACE,
            "rollout",
            "status",
            "deployment/tolaria-operator",
            "--timeout=180s",
        )
        yield str(kubeconfig)
    finally:
        subprocess.run(["kind", "delete", "cluster", "--name", name], check=False)


def run_status(kubeconfig: str, name: str) -> dict[str, object]:
    out = sh("kubectl", "--kubeconfig", kubeconfig, "get", "trun", name, "-o", "json")
    status: dict[str, object] = json.loads(out).get("status", {})
    return status


@pytest.mark.req("R10.1")
def test_the_quickstart_runs_to_success_on_kind(cluster: str) -> None:
    sh("kubectl", "--kubeconfig", cluster, "apply", "-f", "examples/kind-quickstart.yaml")
    deadline = time.monotonic() + 900
    status: dict[str, object] = {}
    while time.monotonic() < deadline:
        status = run_status(cluster, "kind-quickstart")
        if status.get("phase") in ("Succeeded", "Failed", "Halted"):
            break
        time.sleep(5)
    assert status.get("phase") == "Succeeded", status
    assert status.get("latestCheckpoint"), status


@pytest.mark.req("R10.1")
def test_uninstalling_the_chart_keeps_the_crds_and_the_runs(cluster: str) -> None:
    helm_uninstall(cluster)
    sh("kubectl", "--kubeconfig", cluster, "get", "crd", "tolariaruns.tolaria.dev")
    sh("kubectl", "--kubeconfig", cluster, "get", "crd", "tolariaincidents.tolaria.dev")
    assert run_status(cluster, "kind-quickstart").get("phase") == "Succeeded"
