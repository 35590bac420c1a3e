"""Every object the chart renders, for every value set, is valid: the built-in kinds and the
CRDs by Kubernetes' own OpenAPI schemas in strict mode (kubernetes-validate) for the oldest
Kubernetes the chart supports and the newest the validator ships; the Prometheus Operator
kinds, which the validator does not know, by the schemas in `monitoring_schemas`."""

from __future__ import annotations

from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from kubernetes_validate.utils import latest_version

from tests.chart.monitoring_schemas import SCHEMAS
from tests.chart.rendering import VALUE_SETS, oldest_kubernetes, render

VERSIONS = [oldest_kubernetes(), latest_version()]
PROMETHEUS_OPERATOR_KINDS = set(SCHEMAS)


def _id(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"


def test_the_versions_are_the_oldest_supported_and_the_newest_the_validator_knows() -> None:
    assert VERSIONS[0] == "1.28.0"
    assert tuple(int(p) for p in VERSIONS[1].split(".")) > (1, 28, 0)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_kubernetes_object_validates_strictly(name: str, version: str) -> None:
    objects = [o for o in render(VALUE_SETS[name]) if o["kind"] not in PROMETHEUS_OPERATOR_KINDS]
    assert objects
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:  # pragma: no cover - the failure
            pytest.fail(f"{_id(obj)} on Kubernetes {version}: {err}")


@pytest.mark.parametrize("name", ["monitoring-on", "namespaced-monitoring-on"])
def test_every_prometheus_operator_object_validates_strictly(name: str) -> None:
    objects = [o for o in render(VALUE_SETS[name]) if o["kind"] in PROMETHEUS_OPERATOR_KINDS]
    assert {o["kind"] for o in objects} == PROMETHEUS_OPERATOR_KINDS
    for obj in objects:
        jsonschema.Draft7Validator(SCHEMAS[obj["kind"]]).validate(obj)


def test_the_monitoring_schemas_refuse_a_misspelt_field() -> None:
    """The point of the strict schemas: the real CRD would prune this relabelling silently."""
    (monitor,) = [o for o in render(VALUE_SETS["monitoring-on"]) if o["kind"] == "PodMonitor"]
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    endpoint["relabellings"] = endpoint.pop("relabelings")
    with pytest.raises(jsonschema.ValidationError, match="relabellings"):
        jsonschema.Draft7Validator(SCHEMAS["PodMonitor"]).validate(monitor)


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_namespaced_object_of_the_release_is_in_the_release_namespace(name: str) -> None:
    """Roles are the exception: they live in the namespaces the operator watches, but for the
    token-key and leader-election Roles, which are about a Secret and a Lease of the release
    namespace."""
    for obj in render(VALUE_SETS[name]):
        kind, namespace = obj["kind"], obj["metadata"].get("namespace")
        if kind in ("Role", "RoleBinding") and obj["metadata"]["name"].endswith(
            ("-token-key", "-leader-election")
        ):
            assert namespace == "tolaria-system", _id(obj)
        elif kind in ("Role", "RoleBinding"):
            assert namespace in VALUE_SETS[name]["watch"]["namespaces"], _id(obj)
        elif kind in ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"):
            assert namespace is None, _id(obj)
        else:
            assert namespace == "tolaria-system", _id(obj)


def test_object_names_follow_the_release_name() -> None:
    names = {(o["kind"], o["metadata"]["name"]) for o in render()}
    assert ("Deployment", "tolaria-operator") in names
    assert ("Service", "tolaria-operator-metrics") in names
    renamed = {o["metadata"]["name"] for o in render({"fullnameOverride": "ml"})}
    assert {"ml-operator", "ml-operator-metrics", "ml-operator-runs"} <= renamed
