"""`promtool check metrics` finds nothing to lint in the real /metrics of the operator, the
sidecar and the trainer: names, units, `_total` on counters, help texts. The operator's comes
from its own endpoint (`MetricsServer`) after its metrics have seen work; the trainer's and the
sidecar's from the live run's endpoints (see conftest)."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from tests.monitoring.conftest import Watched
from tolaria_operator.metrics import MetricsServer, OperatorMetrics

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (scripts/system-deps.sh installs it: apt prometheus)",
)


def lint(body: bytes) -> str:
    """promtool's complaints about an exposition (empty when clean)."""
    done = subprocess.run(
        ["promtool", "check", "metrics"], input=body, capture_output=True, timeout=60, check=False
    )
    return "" if done.returncode == 0 else (done.stdout + done.stderr).decode()


@needs_promtool
@pytest.mark.asyncio
async def test_the_operators_metrics_endpoint_is_lint_free() -> None:
    metrics = OperatorMetrics(CollectorRegistry())
    metrics.observe_phase(("ml", "r1"), "Halted", restarts=2)
    metrics.incident_opened("i-1", "critical")
    metrics.incident_answers("i-1", ["NoAck"])
    metrics.reconcile_duration.labels("reconcile").observe(0.2)
    server = MetricsServer(metrics.registry)
    port = await server.start("127.0.0.1", 0)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/metrics") as response,
        ):
            body = await response.read()
    finally:
        await server.stop()
    assert b"tolaria_operator_run_phase{" in body
    assert lint(body) == ""


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("which", ["trainer", "sidecar"])
def test_the_runs_metrics_endpoints_are_lint_free(watched: Watched, which: str) -> None:
    with urllib.request.urlopen(watched.run.url(which), timeout=30) as response:
        body = response.read()
    assert lint(body) == ""
