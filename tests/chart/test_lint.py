"""`helm lint` (Helm's own linter, through the SDK) finds nothing to warn about, in strict mode,
for every value set, at the oldest Kubernetes the chart supports and the newest."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes_validate.utils import latest_version

from tests.chart.rendering import CHART_DIR, NAMESPACE, VALUE_SETS, helm, oldest_kubernetes

INFO = 1
"""Severity of a lint message that is only a suggestion (e.g. "icon is recommended")."""


def lint(values: dict[str, Any], kube_version: str) -> dict[str, Any]:
    report: dict[str, Any] = helm.lint(
        CHART_DIR, values, strict=True, namespace=NAMESPACE, kube_version=f"v{kube_version}"
    )
    return report


@pytest.mark.parametrize("kube_version", [oldest_kubernetes(), latest_version()])
@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_the_chart_lints_clean(name: str, kube_version: str) -> None:
    values = dict(VALUE_SETS[name])
    if kube_version == oldest_kubernetes():
        values["runs"] = {**values.get("runs", {}), "nativeSidecar": False}
    report = lint(values, kube_version)
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] > INFO] == []


def test_lint_reports_values_the_schema_refuses() -> None:
    """The linter is really looking: a bad value is an error in its report."""
    report = lint({"images": {"pullPolicy": "Sometimes"}}, latest_version())
    errors = [m["error"] for m in report["messages"] if m["severity"] > INFO]
    assert any("/images/pullPolicy" in e for e in errors), report
