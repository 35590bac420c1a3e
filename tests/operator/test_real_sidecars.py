"""The operator with real sidecar and trainer processes (R10.3, R10.4).

kmock serves the API; `ProcessKubelet` runs every pod the operator creates as the pod's own
containers - `python -m tolaria_sidecar` and `python -m tolaria_trainer.worker --pod`, with
the token from the run's Secret and the manifest from its ConfigMap - on 127.0.0.1. Time is
real here (no looptime): these tests wait on real training, so they poll with generous real
deadlines and never assert on durations.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.operator.builders import run_body
from tests.operator.harness import Cluster
from tests.operator.process_kubelet import ProcessKubelet

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning"),
]

GROUP = "tolaria.dev/group"


def training(epochs: int) -> dict[str, Any]:
    """A small classifier: a few hundred steps a second on a 2-core CPU."""
    return {
        "task": "synthetic-mlp",
        "epochs": epochs,
        "batchSize": 64,
        "data": {"trainSamples": 1024, "validationSamples": 256},
        "model": {"hiddenSize": 32},
    }


def spec(epochs: int, **extra: Any) -> dict[str, Any]:
    return {
        "training": training(epochs),
        "failurePolicy": {"podStartTimeoutSeconds": 600},
        "snapshots": {"everySteps": 8},
        **extra,
    }


@pytest_asyncio.fixture
async def node(cluster: Cluster, tmp_path: Path) -> AsyncIterator[ProcessKubelet]:
    """A node running the operator's pods as processes (see `Cluster.run_pods_as_processes`)."""
    kubelet = cluster.run_pods_as_processes(tmp_path)
    kubelet.start()
    try:
        yield kubelet
    finally:
        await cluster.stop_operator()
        await kubelet.close()


async def _until(cluster: Cluster, node: ProcessKubelet, what: str, probe: Any) -> Any:
    try:
        return await cluster.eventually(what, probe, step_s=0.2)
    except BaseException:
        print(node.logs(what.split(maxsplit=1)[0]))
        raise


@pytest.mark.req("R10.3")
@pytest.mark.asyncio
async def test_the_run_status_follows_the_real_sidecars_events(
    cluster: Cluster, node: ProcessKubelet
) -> None:
    await cluster.start_operator()
    await cluster.create_run(run_body("live", spec=spec(epochs=300)))

    seen_epochs: set[int] = set()

    def progressing() -> bool:
        status = cluster.run_status("live")
        progress = status.get("progress") or {}
        if progress.get("step", 0) > 0:
            seen_epochs.add(int(progress.get("epoch", 0)))
        return len(seen_epochs) >= 2

    await _until(cluster, node, "live progresses epoch by epoch", progressing)
    status = cluster.run_status("live")
    assert status["progress"]["heartbeat"], "a heartbeat time comes from the sidecar's events"
    await _until(
        cluster,
        node,
        "live has a snapshot and a durable checkpoint",
        lambda: (
            cluster.run_status("live").get("latestSnapshot")
            and cluster.run_status("live").get("latestCheckpoint")
        ),
    )
    done = await _until(
        cluster,
        node,
        "live Succeeded",
        lambda: (
            cluster.run_status("live").get("phase") == "Succeeded" and cluster.run_status("live")
        ),
    )
    assert done["latestCheckpoint"]["id"], done
    assert done["restarts"] == 0 and done["attempt"] == 1


@pytest.mark.req("R10.4")
@pytest.mark.asyncio
async def test_a_hang_in_one_run_raises_an_incident_that_reaches_every_run_in_its_group(
    cluster: Cluster, node: ProcessKubelet
) -> None:
    node.drills["hang"] = ["--inject", "hang@step=30"]
    escalation = {"threshold": "critical", "scope": "group", "groupLabel": GROUP}
    await cluster.start_operator()
    await cluster.create_run(
        run_body(
            "hang",
            spec=spec(
                epochs=200,
                escalation=escalation,
                detection={"stallSeconds": 2},
                emergency={"haltAfterSeconds": 20},
            ),
            labels={GROUP: "g1"},
        )
    )
    for peer in ("peer-a", "peer-b"):
        await cluster.create_run(
            run_body(peer, spec=spec(epochs=200, escalation=escalation), labels={GROUP: "g1"})
        )
    for run in ("hang", "peer-a", "peer-b"):
        await _until(
            cluster,
            node,
            f"{run} Running with progress",
            lambda run=run: (
                cluster.run_status(run).get("phase") == "Running"
                and (cluster.run_status(run).get("progress") or {}).get("step", 0) > 0
            ),
        )

    def answered() -> list[dict[str, Any]]:
        return [
            i
            for i in cluster.incidents()
            if len((i.get("status") or {}).get("runs") or []) == 3
            and all(r["ack"] != "Awaiting" for r in i["status"]["runs"])
        ]

    (incident,) = await _until(cluster, node, "hang: a group incident answered by all", answered)
    assert incident["spec"]["level"] == "critical"
    assert incident["spec"]["scope"] == "group" and incident["spec"]["groupValue"] == "g1"
    assert incident["spec"]["sourceRun"]["name"] == "hang"
    assert "stalled" in incident["spec"]["kind"].lower(), incident["spec"]
    acks = {r["name"]: r["ack"] for r in incident["status"]["runs"]}
    assert acks == {"hang": "Acknowledged", "peer-a": "Acknowledged", "peer-b": "Acknowledged"}
    assert cluster.run_status("hang")["incident"]["role"] == "source"
    for peer in ("peer-a", "peer-b"):
        await _until(
            cluster,
            node,
            f"{peer} references the incident",
            lambda peer=peer: (
                (cluster.run_status(peer).get("incident") or {}).get("role") == "reached"
            ),
        )
    await asyncio.sleep(1)
    assert len(cluster.incidents()) == 1, "the peers' echo of the signal must not escalate again"
