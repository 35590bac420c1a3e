"""Operator metrics on a fresh registry: every label value present from the start, bounded
labels, and the /metrics endpoint (R8.3, R11.1)."""

from __future__ import annotations

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from tolaria_operator.metrics import MetricsServer, OperatorMetrics


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_every_label_value_exists_from_the_start() -> None:
    registry = CollectorRegistry()
    OperatorMetrics(registry)
    for phase in (
        "Pending",
        "Running",
        "Succeeded",
        "Failed",
        "Halted",
        "Suspended",
        "Restarting",
        "RollingBack",
    ):
        assert sample(registry, "tolaria_operator_runs", phase=phase) == 0
    for counted in ("true", "false"):
        assert sample(registry, "tolaria_operator_restarts_total", counted=counted) == 0
    for handler in (
        "reconcile",
        "pod_event",
        "deadline",
        "resync",
        "sidecar",
        "delete",
        "escalation",
    ):
        assert sample(registry, "tolaria_operator_reconcile_errors_total", handler=handler) == 0
    assert sample(registry, "tolaria_operator_incidents_total", level="critical") == 0
    assert sample(registry, "tolaria_operator_incident_signals_total", ack="Unreachable") == 0
    assert sample(registry, "tolaria_operator_deadline_misses_total") == 0
    assert (
        sample(
            registry, "tolaria_operator_rollback_duration_seconds_count", tier="ROLLBACK_TIER_FULL"
        )
        == 0
    )


def test_runs_move_between_phases_and_restarts_split_by_counting() -> None:
    registry = CollectorRegistry()
    metrics = OperatorMetrics(registry)
    metrics.observe_phase(("ns", "a"), "Pending")
    metrics.observe_phase(("ns", "a"), "Running")
    metrics.observe_phase(("ns", "b"), "Running")
    assert sample(registry, "tolaria_operator_runs", phase="Pending") == 0
    assert sample(registry, "tolaria_operator_runs", phase="Running") == 2
    metrics.forget_run(("ns", "a"))
    assert sample(registry, "tolaria_operator_runs", phase="Running") == 1
    metrics.observe_restarts(added=3, counted=1)
    assert sample(registry, "tolaria_operator_restarts_total", counted="true") == 1
    assert sample(registry, "tolaria_operator_restarts_total", counted="false") == 2
    metrics.incident_opened("i-1", "critical")
    metrics.incident_opened("i-1", "critical")
    assert sample(registry, "tolaria_operator_incidents_open") == 1
    assert sample(registry, "tolaria_operator_incidents_total", level="critical") == 1
    metrics.incident_closed("i-1")
    assert sample(registry, "tolaria_operator_incidents_open") == 0


@pytest.mark.asyncio
async def test_the_endpoint_serves_the_registry() -> None:
    registry = CollectorRegistry()
    metrics = OperatorMetrics(registry)
    metrics.deadline_misses.inc()
    server = MetricsServer(registry)
    port = await server.start("127.0.0.1", 0)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/metrics") as response,
        ):
            text = await response.text()
    finally:
        await server.stop()
    assert "tolaria_operator_deadline_misses_total 1.0" in text


def test_handler_durations_are_timed_for_every_handler_but_the_sidecar_follower() -> None:
    """The follower lives as long as its run: its 'duration' would say nothing."""
    registry = CollectorRegistry()
    OperatorMetrics(registry)
    name = "tolaria_operator_reconcile_duration_seconds_count"
    for handler in ("reconcile", "pod_event", "deadline", "resync", "delete", "escalation"):
        assert sample(registry, name, handler=handler) == 0
    assert sample(registry, name, handler="sidecar") is None


def test_each_run_has_one_phase_series_and_a_restart_counter_until_it_is_deleted() -> None:
    registry = CollectorRegistry()
    metrics = OperatorMetrics(registry)
    metrics.observe_phase(("team-a", "r1"), "Running", restarts=0)
    metrics.observe_phase(("team-a", "r1"), "Halted", restarts=2)
    metrics.observe_phase(("team-b", "r1"), "Running", restarts=1)
    phase = "tolaria_operator_run_phase"
    assert sample(registry, phase, run_namespace="team-a", run="r1", phase="Halted") == 1
    assert sample(registry, phase, run_namespace="team-a", run="r1", phase="Running") is None
    assert sample(registry, phase, run_namespace="team-b", run="r1", phase="Running") == 1
    restarts = "tolaria_operator_run_restarts_total"
    assert sample(registry, restarts, run_namespace="team-a", run="r1") == 2
    metrics.forget_run(("team-a", "r1"))
    assert sample(registry, phase, run_namespace="team-a", run="r1", phase="Halted") is None
    assert sample(registry, restarts, run_namespace="team-a", run="r1") is None
    assert sample(registry, restarts, run_namespace="team-b", run="r1") == 1


def test_a_run_restart_counter_never_goes_back() -> None:
    """A reconcile that read an older status must not make `increase()` see a reset."""
    registry = CollectorRegistry()
    metrics = OperatorMetrics(registry)
    metrics.observe_phase(("ns", "r"), "Running", restarts=3)
    metrics.observe_phase(("ns", "r"), "Running", restarts=2)
    assert sample(registry, "tolaria_operator_run_restarts_total", run_namespace="ns", run="r") == 3


def test_incident_runs_count_the_latest_answers_of_open_incidents_only() -> None:
    registry = CollectorRegistry()
    metrics = OperatorMetrics(registry)
    metrics.incident_opened("i-1", "critical")
    metrics.incident_answers("i-1", ["Awaiting", "NoAck", "Unreachable"])
    metrics.incident_answers("i-1", ["Acknowledged", "NoAck", "Unreachable"])
    metrics.incident_answers("i-2", ["NoAck"])
    runs = "tolaria_operator_incident_runs"
    assert sample(registry, runs, ack="Awaiting") == 0
    assert sample(registry, runs, ack="Acknowledged") == 1
    assert sample(registry, runs, ack="NoAck") == 2
    metrics.incident_closed("i-1")
    assert sample(registry, runs, ack="NoAck") == 1
    assert sample(registry, runs, ack="Unreachable") == 0
    metrics.reset_open_incidents({"i-3"}, {"i-3": ["Awaiting"]})
    assert sample(registry, runs, ack="Awaiting") == 1
    assert sample(registry, runs, ack="NoAck") == 0
