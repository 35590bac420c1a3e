"""The shipped rules and the processes' metrics, end to end: a real Prometheus scrapes a real
`tolaria run` (trainer and sidecar, labelled as the chart's PodMonitor labels them) and
evaluates the shipped rules (`for:` scaled down, see conftest). Everything is observed through
Prometheus's HTTP API, as an on-call engineer's tools would."""

from __future__ import annotations

import time

import pytest

from scripts.livemon import wait_for
from tests.monitoring.conftest import SPIKE_STEP, Watched

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DEADLINE_S = 480.0
"""A torch import, a sidecar start and hundreds of steps on a loaded 2-core machine."""
FAST_SUCCEEDED = 'tier="ROLLBACK_TIER_FAST",outcome="ROLLBACK_OUTCOME_SUCCEEDED"'


def run_series(watched: Watched, metric: str, matchers: str = "") -> str:
    labels = f'namespace="{watched.namespace}",run="{watched.run.name}"'
    return f"{metric}{{{labels}{',' + matchers if matchers else ''}}}"


def test_prometheus_scrapes_the_trainer_and_the_sidecar_under_the_pods_labels(
    watched: Watched,
) -> None:
    prom = watched.prometheus
    up = run_series(watched, "up")
    found = wait_for("both run targets up", lambda: prom.values(f"sum({up})") == [2.0], DEADLINE_S)
    assert found
    pods = prom.query(f"count by (pod) ({run_series(watched, 'tolaria_sidecar_run_phase')})")
    assert [r["metric"]["pod"] for r in pods] == [f"{watched.run.name}-a1"]


def test_a_loss_spike_moves_the_fast_rollback_series_from_0_to_1(watched: Watched) -> None:
    prom = watched.prometheus
    series = run_series(watched, "tolaria_sidecar_rollbacks_total", FAST_SUCCEEDED)
    started = time.time()
    wait_for("a fast rollback counted", lambda: prom.values(series) == [1.0], DEADLINE_S)
    # the grid's last point may fall before the newest scrape: end a step past it
    seen = prom.query_range(series, started - 600, time.time() + 2, step=1)
    values = [float(v) for _, v in seen[0]["values"]]
    assert values[0] == 0.0, f"the first scrape came after the spike at step {SPIKE_STEP}"
    assert values[-1] == 1.0, values
    assert sorted(values) == values, values
    durations = run_series(
        watched, "tolaria_sidecar_rollback_duration_seconds_count", 'tier="ROLLBACK_TIER_FAST"'
    )
    assert prom.values(durations) == [1.0]


def test_a_hang_fires_the_no_progress_alert_for_the_run(watched: Watched) -> None:
    prom = watched.prometheus
    firing = wait_for(
        "TolariaRunNoProgress firing", lambda: prom.firing("TolariaRunNoProgress"), DEADLINE_S
    )
    labels = firing[0]["labels"]
    assert (labels["namespace"], labels["run"], labels["pod"]) == (
        watched.namespace,
        watched.run.name,
        f"{watched.run.name}-a1",
    )
    assert labels["severity"] == "warning"
    assert firing[0]["annotations"]["runbook_url"].endswith("#tolariarunnoprogress")


def test_the_hangs_critical_emergency_fires_the_emergency_alert(watched: Watched) -> None:
    prom = watched.prometheus
    firing = wait_for(
        "TolariaEmergencySevere firing", lambda: prom.firing("TolariaEmergencySevere"), DEADLINE_S
    )
    assert firing[0]["labels"]["run"] == watched.run.name
    assert "CRITICAL" in firing[0]["annotations"]["summary"]


def test_a_healthy_operator_target_keeps_the_operator_alerts_silent(watched: Watched) -> None:
    prom = watched.prometheus
    wait_for(
        "the operator target up",
        lambda: prom.values('up{job="tolaria-operator"}') == [1.0],
        DEADLINE_S,
    )
    names = {a["labels"]["alertname"] for a in prom.alerts()}
    assert not names & {"TolariaOperatorAbsent", "TolariaOperatorReconcileErrors"}
