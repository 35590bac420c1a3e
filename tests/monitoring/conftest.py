"""Live monitoring fixtures: one real Prometheus (the shipped rules, `for:` scaled down) that
scrapes one real local run and the operator's metrics registry, shared by every live test of
this package, so the machine trains one run for all of them.

The run (`WATCHED`) has a loss spike early and a hang later: the spike moves the rollback
series, the hang stops the heartbeat until the no-progress alert fires. Its stall budget is 5 s
and its halt comes 180 s after the stall, so the frozen run stays scrapeable long enough for a
slow machine. The tests wait on what they need to see (polling Prometheus), never on time.

The operator target is the operator's real `OperatorMetrics` registry served over HTTP and fed
through its own methods with the run's phase: there is no Kubernetes API in these tests, and
the dashboard's operator panels need the series to exist under their real names and labels.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry, start_http_server

from scripts.livemon import (
    LOCAL_NAMESPACE,
    OPERATOR_JOB,
    RULES,
    LocalRun,
    Prometheus,
    Target,
    scaled_rules,
)
from tolaria_operator.metrics import OperatorMetrics

TIME_SCALE = 60.0
"""The live rules' `for:` durations are the shipped ones divided by this: one shipped minute is
one live second (the 10 minutes of TolariaRunNoProgress become 10 s)."""
DISCOVERY_DEADLINE_S = 120.0
"""file_sd is re-read every second; minutes only on a machine far beyond loaded."""
SPIKE_STEP = 640
HANG_STEP = 1600
DRILLS = (f"loss-spike@step={SPIKE_STEP}", f"hang@step={HANG_STEP}")


def watched_manifest(name: str = "watched-run") -> dict[str, object]:
    """64 steps an epoch, 40 epochs: the spike in epoch 10, seconds after the sidecar is first
    scraped, and the hang in epoch 25, long before the end."""
    return {
        "apiVersion": "tolaria.dev/v1alpha1",
        "kind": "TolariaRun",
        "metadata": {"name": name},
        "spec": {
            "training": {
                "task": "synthetic-mlp",
                "epochs": 40,
                "batchSize": 32,
                "data": {"trainSamples": 2048, "validationSamples": 256},
                "model": {"hiddenSize": 32},
            },
            "snapshots": {"everySteps": 10},
            "detection": {"stallSeconds": 5},
            "emergency": {"haltAfterSeconds": 180},
        },
    }


@dataclass
class Watched:
    """The live Prometheus, the run it scrapes, and the operator registry it scrapes."""

    prometheus: Prometheus
    run: LocalRun
    operator: OperatorMetrics

    @property
    def namespace(self) -> str:
        return LOCAL_NAMESPACE


@pytest.fixture(scope="session")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Watched]:
    if shutil.which("prometheus") is None or shutil.which("promtool") is None:
        pytest.skip("prometheus/promtool are not installed (scripts/system-deps.sh installs them)")
    root = tmp_path_factory.mktemp("monitoring")
    rules = scaled_rules(RULES, root / "rules.yaml", TIME_SCALE)
    registry = CollectorRegistry()
    operator = OperatorMetrics(registry)
    server, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
    prometheus = Prometheus(root / "prometheus", rule_files=[rules]).start()
    run = LocalRun(watched_manifest(), root / "run", DRILLS)
    try:
        operator_labels = {"namespace": "tolaria-system"}
        prometheus.add_targets(
            Target(OPERATOR_JOB, f"127.0.0.1:{server.server_port}", operator_labels)
        )
        run_targets = (run.target("sidecar"), run.target("trainer"))
        prometheus.add_targets(*run_targets)
        prometheus.wait_discovered(run_targets, DISCOVERY_DEADLINE_S)
        run.start()  # scraped from its first second: the spike cannot come before a scrape
        operator.observe_phase((LOCAL_NAMESPACE, run.name), "Running", restarts=0)
        yield Watched(prometheus, run, operator)
    finally:
        run.stop()
        prometheus.stop()
        server.shutdown()
