"""Behind monitoring.enabled: a ServiceMonitor for the operator, a PodMonitor for run pods (the
run becomes the Prometheus label `run`), the alert rules from files/prometheus and the Grafana
dashboard from files/grafana; nothing of it when monitoring is off."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.rendering import (
    CHART_DIR,
    NAMESPACE,
    VALUE_SETS,
    WATCHED,
    of_kind,
    one,
    render,
)
from tests.operator.builders import new_pod, run_object
from tolaria_operator.config import PodSettings, TolariaSettings
from tolaria_operator.resources import RUN_LABEL

ON = VALUE_SETS["monitoring-on"]
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
RULES_FILE = CHART_DIR / "files" / "prometheus" / "tolaria-rules.yaml"
DASHBOARD_FILE = CHART_DIR / "files" / "grafana" / "tolaria-overview.json"


def dashboards(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")
    ]


def meta_label(label: str) -> str:
    """The Prometheus service-discovery label of a pod label (every other character is `_`)."""
    return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", label)


def run_pod(*, native: bool = True) -> dict[str, Any]:
    settings = TolariaSettings(pods=PodSettings(native_sidecar=native))
    return new_pod(run_object(name="r1", namespace="team-a"), 1, settings)


def container_ports(pod: dict[str, Any]) -> set[str]:
    containers = [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]
    return {p["name"] for c in containers for p in c.get("ports", [])}


@pytest.mark.parametrize("name", ["default", "monitoring-off", "namespaced"])
def test_without_monitoring_nothing_of_it_is_rendered(name: str) -> None:
    objects = render(VALUE_SETS[name])
    assert {o["kind"] for o in objects}.isdisjoint(MONITORING_KINDS)
    assert dashboards(objects) == []


def test_with_monitoring_the_monitors_rules_and_dashboard_are_rendered() -> None:
    objects = render(ON)
    assert {o["kind"] for o in objects} >= MONITORING_KINDS
    assert len(dashboards(objects)) == 1


@pytest.mark.parametrize(
    ("part", "kind"),
    [
        ("serviceMonitor", "ServiceMonitor"),
        ("podMonitor", "PodMonitor"),
        ("prometheusRule", "PrometheusRule"),
        ("dashboard", "dashboard"),
    ],
)
def test_each_part_can_be_left_out(part: str, kind: str) -> None:
    objects = render({"monitoring": {"enabled": True, part: {"enabled": False}}})
    rendered = {o["kind"] for o in objects} & MONITORING_KINDS
    rendered |= {"dashboard"} if dashboards(objects) else set()
    assert rendered == (MONITORING_KINDS | {"dashboard"}) - {kind}


def test_the_extra_labels_go_on_every_monitor_and_the_rules() -> None:
    for obj in render(ON):
        if obj["kind"] in MONITORING_KINDS:
            assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack", obj["kind"]


def test_the_service_monitor_scrapes_the_operators_metrics_service() -> None:
    objects = render(ON)
    monitor, service = one(objects, "ServiceMonitor"), one(objects, "Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


@pytest.mark.parametrize("native", [True, False], ids=["native-sidecar", "plain-sidecar"])
def test_the_pod_monitor_selects_run_pods_and_their_metrics_ports(native: bool) -> None:
    spec = one(render(ON), "PodMonitor")["spec"]
    pod = run_pod(native=native)
    labels = pod["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    for expression in spec["selector"]["matchExpressions"]:
        assert expression["operator"] == "Exists" and expression["key"] in labels
    ports = [e["port"] for e in spec["podMetricsEndpoints"]]
    assert sorted(ports) == sorted(p for p in container_ports(pod) if p.endswith("-metrics"))
    assert sorted(ports) == ["sidecar-metrics", "trainer-metrics"]


def test_the_pod_monitor_does_not_select_the_operator() -> None:
    objects = render(ON)
    operator_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    wanted = one(objects, "PodMonitor")["spec"]["selector"]["matchLabels"]
    assert not wanted.items() <= operator_labels.items()


def relabel(pod: dict[str, Any], relabelings: list[dict[str, Any]]) -> dict[str, str]:
    """The target labels Prometheus derives for `pod` (replace actions with the default regex
    `(.*)` and replacement `$1`, which is all the chart uses)."""
    discovered = {meta_label(k): v for k, v in pod["metadata"]["labels"].items()}
    discovered["__meta_kubernetes_namespace"] = pod["metadata"]["namespace"]
    discovered["__meta_kubernetes_pod_name"] = pod["metadata"]["name"]
    out: dict[str, str] = {}
    for step in relabelings:
        assert step.get("action", "replace") == "replace"
        assert "regex" not in step and "replacement" not in step
        out[step["targetLabel"]] = ";".join(discovered.get(s, "") for s in step["sourceLabels"])
    return out


def test_the_run_becomes_the_label_run_next_to_namespace_and_pod() -> None:
    pod = run_pod()
    for endpoint in one(render(ON), "PodMonitor")["spec"]["podMetricsEndpoints"]:
        assert relabel(pod, endpoint["relabelings"]) == {
            "run": "r1",
            "namespace": "team-a",
            "pod": "r1-a1",
        }
        assert endpoint["relabelings"][0]["sourceLabels"] == [meta_label(RUN_LABEL)]


def test_cluster_wide_the_pod_monitor_looks_in_every_namespace() -> None:
    assert one(render(ON), "PodMonitor")["spec"]["namespaceSelector"] == {"any": True}


def test_per_namespace_the_pod_monitor_looks_in_the_watched_namespaces() -> None:
    monitor = one(render(VALUE_SETS["namespaced-monitoring-on"]), "PodMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": WATCHED}


def test_the_prometheus_rule_spec_is_the_rule_file() -> None:
    rule = one(render(ON), "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))
    assert rule["spec"]["groups"]


def test_the_rendered_rules_pass_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make test installs it as root with apt)")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(one(render(ON), "PrometheusRule")["spec"]), encoding="utf-8")
    done = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dashboard_config_map_holds_the_dashboard_file_unchanged() -> None:
    (config_map,) = dashboards(render(ON))
    text = DASHBOARD_FILE.read_text(encoding="utf-8")
    assert config_map["data"] == {"tolaria-overview.json": text.rstrip("\n")}
    assert json.loads(config_map["data"]["tolaria-overview.json"]) == json.loads(text)


def test_grafanas_sidecar_finds_the_dashboard_by_its_default_label() -> None:
    (config_map,) = dashboards(render(ON))
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == NAMESPACE


def test_the_dashboard_label_namespace_and_annotations_are_configurable() -> None:
    dashboard = {
        "labelKey": "grafana.io/dashboard",
        "labelValue": "tolaria",
        "namespace": "grafana",
        "annotations": {"grafana_folder": "Training"},
    }
    (config_map,) = dashboards(render({"monitoring": {"enabled": True, "dashboard": dashboard}}))
    assert config_map["metadata"]["labels"]["grafana.io/dashboard"] == "tolaria"
    assert "grafana_dashboard" not in config_map["metadata"]["labels"]
    assert config_map["metadata"]["namespace"] == "grafana"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "Training"}


@pytest.mark.parametrize("names", [{}, {"fullnameOverride": "acme"}], ids=["default", "renamed"])
def test_the_operators_scrape_job_is_the_one_the_absent_alert_looks_for(
    names: dict[str, str],
) -> None:
    monitor = one(render({**ON, **names}), "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    (relabel,) = [r for r in endpoint["relabelings"] if r["targetLabel"] == "job"]
    rules = RULES_FILE.read_text(encoding="utf-8")
    assert relabel["replacement"] == "tolaria-operator"
    assert 'absent(up{job=~".*tolaria-operator.*"} == 1)' in rules


def test_the_rule_file_and_the_dashboard_parse() -> None:
    assert "groups" in yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))
    assert json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))["uid"]
