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
