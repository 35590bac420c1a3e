"""The Grafana dashboard: a well-formed JSON model whose data source is a variable, and whose
every query - variables substituted as Grafana would for the watched run - is accepted by a
real Prometheus and returns data while a real run trains (see conftest)."""

from __future__ import annotations

import json
import re

import pytest

from scripts.livemon import (
    DASHBOARD,
    PromQLError,
    dashboard,
    dashboard_queries,
    grafana_variables,
    panels,
    substitute,
    wait_for,
)
from tests.monitoring.conftest import Watched

DEADLINE_S = 480.0
REQUIRED_TOPICS = (
    "Runs by phase",
    "Progress",
    "Rollbacks by tier",
    "Rollback duration",
    "Emergency level",
    "hook latency",
    "Snapshot and checkpoint age",
    "Incidents",
)


def test_the_dashboard_is_a_grafana_model_with_datasource_namespace_and_run_variables() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "run"} <= set(variables)
    for panel in panels(board):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_dashboard_covers_what_an_on_call_engineer_needs() -> None:
    titles = " | ".join(p["title"] for p in panels(dashboard()))
    for topic in REQUIRED_TOPICS:
        assert topic.lower() in titles.lower(), f"no panel about {topic!r}: {titles}"


def test_variables_are_substituted_as_grafana_writes_them_into_a_regex_match() -> None:
    variables = grafana_variables("ml", "run-1.b")
    expr = substitute('x{run=~"$run"}[$__rate_interval] ${namespace}', variables)
    assert expr == 'x{run=~"run-1\\\\.b"}[15s] ml'


def test_every_run_query_selects_the_namespace_and_run_variables() -> None:
    """A run panel that ignored the variables would show every run whatever is selected."""
    for title, _, expr in dashboard_queries(dashboard(), {}):
        if re.search(r"tolaria_(?!operator_)\w+", expr):
            assert '$namespace"' in expr and '$run"' in expr, f"{title}: {expr}"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_variables_list_the_watched_run(watched: Watched) -> None:
    prom = watched.prometheus

    def listed() -> bool:
        namespaces = prom.api("label/namespace/values", **{"match[]": "tolaria_sidecar_run_phase"})
        runs = prom.api("label/run/values", **{"match[]": "tolaria_sidecar_run_phase"})
        return watched.namespace in namespaces and watched.run.name in runs

    assert wait_for("the run in the variables' label values", listed, DEADLINE_S)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_panel_query_is_accepted_and_returns_data_during_a_run(watched: Watched) -> None:
    prom = watched.prometheus
    queries = dashboard_queries(dashboard(), grafana_variables(watched.namespace, watched.run.name))
    refused = []
    for title, _, expr in queries:
        try:
            prom.query(expr)
        except PromQLError as err:
            refused.append(f"{title}: {err}")
    assert not refused, refused

    def empty() -> list[str]:
        return [f"{title}: {expr}" for title, _, expr in queries if not prom.query(expr)]

    missing: list[str] = []

    def all_answer() -> bool:
        missing[:] = empty()
        return not missing

    try:
        wait_for("every panel query returning data", all_answer, DEADLINE_S, step_s=2)
    except TimeoutError:
        pytest.fail(f"queries without data: {missing}")
