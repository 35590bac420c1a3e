"""The operator's Deployment: one replica replaced by Recreate, restricted and non-root, and
told by its settings what the values say: which namespaces, which images runs get, who may
scrape run pods. The settings are read back with the operator's own command line and
settings parser, and the pods it would build are checked (values -> settings -> pods)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from tests.chart.rendering import (
    CHART_DIR,
    NAMESPACE,
    SCRAPER_NAMESPACE,
    SCRAPER_PODS,
    VALUE_SETS,
    WATCHED,
    one,
    operator_container,
    operator_env,
    render,
)
from tests.operator.builders import new_pod, run_object
from tolaria_operator.__main__ import build_parser, kopf_arguments, settings_environment
from tolaria_operator.config import TolariaSettings, env_name, from_env
from tolaria_operator.pods import network_policy


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(objects, "Deployment")["spec"]["template"]["spec"]
    return spec


def operator_settings(objects: list[dict[str, Any]]) -> TolariaSettings:
    """The settings the operator starts with in the rendered pod: its arguments and environment
    through `tolaria-operator`'s own parsing (POD_NAMESPACE as the downward API fills it)."""
    args, _ = build_parser().parse_known_args(operator_container(objects)["args"])
    env = {**operator_env(objects), "POD_NAMESPACE": NAMESPACE}
    return from_env(settings_environment(args, env))


def kopf_args(objects: list[dict[str, Any]]) -> list[str]:
    args, rest = build_parser().parse_known_args(operator_container(objects)["args"])
    assert rest == []
    return kopf_arguments(args, rest)


def test_two_operators_by_default_rolled_one_at_a_time_since_a_lease_elects_the_leader() -> None:
    spec = one(render(), "Deployment")["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert one(render({"operator": {"replicas": 3}}), "Deployment")["spec"]["replicas"] == 3


def test_the_operators_elect_a_leader_on_a_lease_named_for_the_release() -> None:
    election = operator_settings(render()).leader_election
    assert election.enabled is True
    assert election.lease_name == "tolaria-operator-leader"
    env = operator_container(render())["env"]
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in env


@pytest.mark.req("R10.5")
def test_the_operator_pod_runs_non_root_read_only_without_capabilities() -> None:
    spec = pod_spec(render())
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = operator_container(render())["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["privileged"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}


def test_the_operator_has_requests_and_limits() -> None:
    resources = operator_container(render())["resources"]
    assert set(resources) == {"requests", "limits"}
    assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(
        resources["limits"]
    )


def test_the_operator_is_probed_where_a_standby_answers_too() -> None:
    """kopf's liveness endpoint starts only after the startup handlers, in which a standby waits
    for the leader lease: the probe asks the metrics server's /healthz, served from the start."""
    container = operator_container(render())
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert {"name": "metrics", "containerPort": 9403, "protocol": "TCP"} in container["ports"]


def test_cluster_wide_the_operator_watches_all_namespaces() -> None:
    args = kopf_args(render(VALUE_SETS["cluster-wide"]))
    assert "--all-namespaces" in args and "--namespace" not in args
    assert operator_settings(render(VALUE_SETS["cluster-wide"])).escalation.watch_namespaces == ()


def test_per_namespace_the_operator_watches_exactly_the_listed_namespaces() -> None:
    objects = render(VALUE_SETS["namespaced"])
    args = kopf_args(objects)
    assert "--all-namespaces" not in args
    assert [args[i + 1] for i, a in enumerate(args) if a == "--namespace"] == WATCHED
    # incidents reach runs in these namespaces only
    assert operator_settings(objects).escalation.watch_namespaces == tuple(WATCHED)


def test_the_operator_knows_its_own_namespace() -> None:
    env = operator_container(render())["env"]
    assert {
        "name": "POD_NAMESPACE",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
    } in env
    assert operator_settings(render()).network.operator_namespace == NAMESPACE


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_the_operator_accepts_every_setting_the_chart_renders(name: str) -> None:
    """The operator refuses an unknown or malformed setting at start-up (exit 2): a rendered
    typo would crash-loop the pod. `from_env` raises SettingsInvalid naming it."""
    assert isinstance(operator_settings(render(VALUE_SETS[name])), TolariaSettings)


def test_operator_settings_refuses_exactly_the_settings_the_chart_derives() -> None:
    """One value, one place: what the chart sets from other values (its environment, plus what
    the operator derives from POD_NAMESPACE and --namespace) cannot be set again."""
    schema = json.loads((CHART_DIR / "values.schema.json").read_text(encoding="utf-8"))
    refused = schema["properties"]["operator"]["properties"]["settings"]["propertyNames"]["not"]
    derived = {
        f"{section}.{field}"
        for section in (s.name for s in dataclasses.fields(TolariaSettings))
        for field in _fields(section)
        if env_name(section, field) in operator_env(render())
    } | {"network.operator_namespace", "escalation.watch_namespaces"}
    assert set(refused["enum"]) == derived


def _fields(section: str) -> list[str]:
    return [f.name for f in dataclasses.fields(getattr(TolariaSettings(), section))]


def test_further_settings_reach_the_operator_as_set_flags() -> None:
    values = {
        "operator": {
            "settings": {
                "pods.termination_grace_period_seconds": 120,
                "pods.default_shm_bytes": 8589934592,
                "status.progress_patch_interval_seconds": 0.5,
                "pods.sidecar_cpu": "1",
            }
        }
    }
    settings = operator_settings(render(values))
    assert settings.pods.termination_grace_period_seconds == 120
    assert settings.pods.default_shm_bytes == 8589934592
    assert settings.status.progress_patch_interval_seconds == 0.5
    assert settings.pods.sidecar_cpu == "1"


def test_the_operator_pod_carries_the_labels_run_pods_admit_to_the_control_port() -> None:
    objects = render()
    labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    settings = operator_settings(objects)
    assert dict(settings.network.operator_pod_labels).items() <= labels.items()
    policy = network_policy(run_object(), settings)
    control = policy["spec"]["ingress"][0]["from"][0]
    assert control["podSelector"]["matchLabels"].items() <= labels.items()
    assert control["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}
    }


def test_run_pods_get_the_released_images_by_default() -> None:
    pod = new_pod(run_object(), 1, operator_settings(render()))
    images = {
        c["name"]: c["image"] for c in [*pod["spec"]["initContainers"], *pod["spec"]["containers"]]
    }
    assert images == {
        "sidecar": "ghcr.io/tolaria/sidecar:0.1.0",
        "trainer": "ghcr.io/tolaria/trainer:0.1.0",
    }
    assert operator_container(render())["image"] == "ghcr.io/tolaria/operator:0.1.0"


def test_a_private_registry_reaches_the_operator_and_every_run_pod() -> None:
    objects = render(VALUE_SETS["private-registry"])
    assert (
        operator_container(objects)["image"]
        == "registry.example.com:5000/ml/tolaria/operator:0.1.0"
    )
    assert operator_container(objects)["imagePullPolicy"] == "Always"
    assert pod_spec(objects)["imagePullSecrets"] == [{"name": "regcred"}]
    pod = new_pod(run_object(), 1, operator_settings(objects))
    containers = [*pod["spec"]["initContainers"], *pod["spec"]["containers"]]
    assert {c["name"]: (c["image"], c["imagePullPolicy"]) for c in containers} == {
        "trainer": ("registry.example.com:5000/ml/tolaria/trainer:1.2.3", "Always"),
        "sidecar": ("mirror.example.com/tolaria/sidecar:1.2.3", "Always"),
    }
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]


def test_a_run_naming_its_images_keeps_them() -> None:
    settings = operator_settings(render(VALUE_SETS["private-registry"]))
    run = run_object(
        spec={"pod": {"image": "mine/trainer:dev", "sidecarImage": "mine/sidecar:dev"}}
    )
    pod = new_pod(run, 1, settings)
    containers = [*pod["spec"]["initContainers"], *pod["spec"]["containers"]]
    assert {c["image"] for c in containers} == {"mine/trainer:dev", "mine/sidecar:dev"}


def test_an_image_without_a_registry_is_a_docker_hub_name() -> None:
    objects = render({"images": {"registry": "", "trainer": {"repository": "acme/trainer"}}})
    assert operator_env(objects)[env_name("images", "trainer")] == "acme/trainer:0.1.0"


def test_run_pods_admit_the_named_prometheus_to_their_metrics_ports() -> None:
    settings = operator_settings(render(VALUE_SETS["monitoring-on"]))
    assert settings.network.metrics_namespace_labels == SCRAPER_NAMESPACE
    assert settings.network.metrics_pod_labels == SCRAPER_PODS
    _, metrics = network_policy(run_object(), settings)["spec"]["ingress"]
    assert metrics["from"] == [
        {
            "podSelector": {"matchLabels": SCRAPER_PODS},
            "namespaceSelector": {"matchLabels": SCRAPER_NAMESPACE},
        }
    ]


def test_without_a_named_scraper_run_metrics_stay_in_the_runs_namespace() -> None:
    _, metrics = network_policy(run_object(), operator_settings(render()))["spec"]["ingress"]
    assert metrics["from"] == [{"podSelector": {"matchLabels": {}}}]


@pytest.mark.parametrize("native", [True, False])
def test_native_sidecars_follow_the_value(native: bool) -> None:
    settings = operator_settings(render({"runs": {"nativeSidecar": native}}))
    assert settings.pods.native_sidecar is native
    pod = new_pod(run_object(), 1, settings)
    assert ("initContainers" in pod["spec"]) is native


def test_the_metrics_service_exposes_the_operators_metrics_port() -> None:
    objects = render({"operator": {"metricsPort": 9500}})
    (port,) = one(objects, "Service")["spec"]["ports"]
    assert port == {"name": "metrics", "port": 9500, "targetPort": "metrics", "protocol": "TCP"}
    assert {"name": "metrics", "containerPort": 9500, "protocol": "TCP"} in operator_container(
        objects
    )["ports"]
    assert operator_settings(objects).metrics.port == 9500
    selector = one(objects, "Service")["spec"]["selector"]
    assert (
        selector.items()
        <= one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"].items()
    )


def test_by_default_the_operator_confines_every_incident_to_its_namespace() -> None:
    settings = operator_settings(render())
    assert settings.escalation.max_scope == "namespace"
    assert settings.escalation.cluster_scope_namespaces == ()


def test_the_escalation_policy_reaches_the_operator() -> None:
    """An administrator grants cluster reach in the release's values, never in a run."""
    values = {"escalation": {"maxScope": "run", "clusterScopeNamespaces": ["ml-platform", "sre"]}}
    settings = operator_settings(render(values))
    assert settings.escalation.max_scope == "run"
    assert settings.escalation.cluster_scope_namespaces == ("ml-platform", "sre")
