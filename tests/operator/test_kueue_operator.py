"""Kueue's pod integration end to end: the whole operator in-process against kmock (looptime),
the test acting as Kueue (its webhook's admission gate, its admission, its preemption) and as
the kubelet. The planner-level rules are in `test_kueue.py`; this checks they hold through the
real watch, resync and pod lifecycle, with the start timeout and `restarts.limit: 0` set so
that any wrong count or timeout would fail the run."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from tests.operator.builders import run_body
from tests.operator.harness import Cluster
from tolaria_operator.resources import KUEUE_QUEUE_LABEL

pytestmark = pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning")

START_TIMEOUT_S = 60
GATE = "kueue.x-k8s.io/admission"
MERGE = "application/merge-patch+json"


async def patch_pod(cluster: Cluster, name: str, patch: dict[str, Any]) -> None:
    await cluster.request("PATCH", f"/api/v1/namespaces/default/pods/{name}", patch, MERGE)


async def kueue_gates(cluster: Cluster, pod: str) -> None:
    """What Kueue's webhook does to the pod at creation (kmock has no webhooks)."""
    await patch_pod(
        cluster,
        pod,
        {
            "spec": {"schedulingGates": [{"name": GATE}]},
            "status": {
                "phase": "Pending",
                "conditions": [
                    {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}
                ],
            },
        },
    )


async def kueue_admits(cluster: Cluster, pod: str) -> None:
    await patch_pod(cluster, pod, {"spec": {"schedulingGates": None}, "status": {"conditions": []}})


async def kueue_preempts(cluster: Cluster, pod: str) -> None:
    """Kueue's pod controller marks the pod it takes back, then deletes it."""
    await patch_pod(
        cluster,
        pod,
        {
            "status": {
                "conditions": [
                    {
                        "type": "TerminationTarget",
                        "status": "True",
                        "reason": "StoppedByKueue",
                        "message": "Preempted to accommodate a higher priority Workload",
                    }
                ]
            }
        },
    )
    async with (
        aiohttp.ClientSession() as session,
        session.delete(f"{cluster.url}/api/v1/namespaces/default/pods/{pod}") as response,
    ):
        assert response.status in (200, 202, 404), await response.text()


@pytest.mark.slow
@pytest.mark.req("R10.2")
@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_queued_run_outwaits_its_start_timeout_runs_once_admitted_and_survives_preemption(
    cluster: Cluster,
) -> None:
    await cluster.sidecar("q1")
    await cluster.start_operator()
    await cluster.create_run(
        run_body(
            "q1",
            labels={KUEUE_QUEUE_LABEL: "team-a"},
            spec={
                "failurePolicy": {"podStartTimeoutSeconds": START_TIMEOUT_S},
                "restarts": {"limit": 0},
            },
        )
    )
    pod = await cluster.eventually("pod q1-a1", lambda: cluster.get("pods", "default", "q1-a1"))
    assert pod["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "team-a"
    await kueue_gates(cluster, "q1-a1")
    await cluster.eventually("Queued", lambda: cluster.run_status("q1").get("reason") == "Queued")

    await asyncio.sleep(10 * START_TIMEOUT_S)  # ten start timeouts in the queue
    status = cluster.run_status("q1")
    assert (status["phase"], status["reason"]) == ("Pending", "Queued")
    assert cluster.get("pods", "default", "q1-a1") is not None, "a queued pod is left alone"

    await kueue_admits(cluster, "q1-a1")
    await cluster.trainer_running("q1-a1")
    await cluster.eventually("Running", lambda: cluster.run_status("q1").get("phase") == "Running")

    await kueue_preempts(cluster, "q1-a1")
    await cluster.eventually("pod q1-a2", lambda: cluster.get("pods", "default", "q1-a2"))
    status = cluster.run_status("q1")
    assert status["phase"] != "Failed", status
    assert (status["restarts"], status["restartsCounted"]) == (1, 0)
    assert status["reason"] == "StoppedByKueue"
