"""Rendering the Helm chart `charts/tolaria` with Helm's own template engine (helm-python-sdk
binds Helm's Go SDK; no `helm` binary, no cluster) for the value sets the tests share. Used by
tests/chart and by tests/k8s (which applies the chart's CRDs to the real CRD API server).

`render` returns the objects of one rendering, `render_files` the text of every template, as
Helm wrote it (NOTES.txt included). A chart is loaded once per session; renders are cached by
their values, because each one goes through Helm's engine (a few tens of ms) and most tests
read the same few renderings.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import yaml

try:
    import helm_python as helm
except ImportError:  # pragma: no cover - a dev dependency; tests/chart skips without it
    helm = None

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "charts" / "tolaria"
RELEASE = "tolaria"
NAMESPACE = "tolaria-system"
WATCHED = ["team-a", "team-b"]
SCRAPER_NAMESPACE = {"kubernetes.io/metadata.name": "monitoring"}
SCRAPER_PODS = {"app.kubernetes.io/name": "prometheus"}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "cluster-wide": {"watch": {"allNamespaces": True, "namespaces": []}},
    "namespaced": {"watch": {"allNamespaces": False, "namespaces": WATCHED}},
    "monitoring-off": {"monitoring": {"enabled": False}},
    "monitoring-on": {
        "monitoring": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "runs": {
            "metricsScraper": {"namespaceLabels": SCRAPER_NAMESPACE, "podLabels": SCRAPER_PODS}
        },
    },
    "namespaced-monitoring-on": {
        "watch": {"allNamespaces": False, "namespaces": WATCHED},
        "monitoring": {"enabled": True},
    },
    "private-registry": {
        "images": {
            "registry": "registry.example.com:5000/ml",
            "pullPolicy": "Always",
            "pullSecrets": ["regcred"],
            "trainer": {"tag": "1.2.3"},
            "sidecar": {"registry": "mirror.example.com", "tag": "1.2.3"},
        }
    },
}
"""The value sets every rendering test runs over (the chart's main modes)."""


@cache
def _chart() -> Any:
    return helm.Chart.load(CHART_DIR)


@cache
def _render(values_json: str, namespace: str) -> dict[str, str]:
    return dict(
        _chart().render(json.loads(values_json), name=RELEASE, namespace=namespace, is_install=True)
    )


def render_files(
    values: Mapping[str, Any] | None = None, *, namespace: str = NAMESPACE
) -> dict[str, str]:
    """Template path (e.g. `tolaria/templates/deployment.yaml`) -> the text Helm rendered."""
    return _render(json.dumps(values or {}, sort_keys=True), namespace)


def render(
    values: Mapping[str, Any] | None = None, *, namespace: str = NAMESPACE
) -> list[dict[str, Any]]:
    """Every object of one rendering (NOTES.txt and empty documents left out), in template
    order; each a fresh copy, so a test may change it."""
    objects: list[dict[str, Any]] = []
    for path, text in sorted(render_files(values, namespace=namespace).items()):
        if path.endswith("NOTES.txt"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return copy.deepcopy(objects)


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = of_kind(objects, kind)
    return found


def oldest_kubernetes() -> str:
    """The oldest Kubernetes the chart supports: the lower bound of Chart.yaml's kubeVersion."""
    meta = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text(encoding="utf-8"))
    found = re.fullmatch(r">=\s*(\d+\.\d+\.\d+)(-0)?", meta["kubeVersion"].strip())
    assert found, f"kubeVersion {meta['kubeVersion']!r} is not a plain lower bound"
    return found.group(1)


def operator_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def operator_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The operator's plain environment variables (name -> value)."""
    return {e["name"]: e["value"] for e in operator_container(objects)["env"] if "value" in e}


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (path, value) below `node`, mappings and lists alike."""
    yield path, node
    if isinstance(node, dict):
        for key, child in node.items():
            yield from walk(child, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from walk(child, f"{path}[{i}]")
