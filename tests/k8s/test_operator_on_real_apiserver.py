"""The operator against the real CRD API server: every status it writes survives the schema.

Tolaria's resources live on Kubernetes' own CRD API server (validation, defaults, pruning,
`/status`); pods, secrets, services and network policies on kmock, behind one URL
(`HybridApi`). The first test runs real sidecar and trainer processes (`ProcessKubelet`) with
a hang drill, the second drives a missed full-rollback deadline through a fake sidecar. Both
end by checking every status PATCH the operator sent against what the server stored.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest

from tests.k8s.hybrid_api import HybridApi
from tests.k8s.operator_world import RealCluster
from tests.operator.builders import run_body

pytestmark = [
    pytest.mark.apiserver,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning"),
]

GROUP = "tolaria.dev/group"


def written_keys(hybrid: HybridApi) -> set[str]:
    return {key for e in hybrid.status_writes() for key in (e.sent.get("status") or {})}


def assert_every_status_write_survived(hybrid: HybridApi) -> None:
    assert hybrid.status_writes(), "the operator wrote no status"
    assert hybrid.pruned() == [], "fields the operator wrote were pruned or changed"
    assert hybrid.status_ignored() == [], "status sent to the main resource is ignored"


@pytest.mark.req("R10.3")
@pytest.mark.asyncio
async def test_status_written_for_real_processes_and_a_group_incident_survives_the_schema(
    world: tuple[RealCluster, HybridApi], tmp_path: Path
) -> None:
    cluster, hybrid = world
    ns = cluster.namespace
    kubelet = cluster.run_pods_as_processes(tmp_path, {"src": ["--inject", "hang@step=40"]})
    kubelet.start()
    try:
        await cluster.start_operator()
        escalation = {"threshold": "critical", "scope": "group", "groupLabel": GROUP}
        training = {
            "task": "synthetic-mlp",
            "epochs": 200,
            "batchSize": 64,
            "data": {"trainSamples": 1024, "validationSamples": 256},
            "model": {"hiddenSize": 32},
        }
        base = {"training": training, "escalation": escalation, "snapshots": {"everySteps": 8}}
        await cluster.create_run(
            run_body(
                "src",
                namespace=ns,
                labels={GROUP: "g"},
                spec={
                    **base,
                    "detection": {"stallSeconds": 2},
                    "emergency": {"haltAfterSeconds": 3},
                },
            )
        )
        await cluster.create_run(run_body("peer", namespace=ns, labels={GROUP: "g"}, spec=base))

        def answered() -> list[dict[str, Any]]:
            return [
                i
                for i in cluster.incidents()
                if len((i.get("status") or {}).get("runs") or []) == 2
                and all(r["ack"] != "Awaiting" for r in i["status"]["runs"])
            ]

        (incident,) = await cluster.eventually("an answered group incident", answered)
        assert {r["name"]: r["ack"] for r in incident["status"]["runs"]} == {
            "src": "Acknowledged",
            "peer": "Acknowledged",
        }
        final = await cluster.eventually(
            "src halts (its emergency is never resolved)",
            lambda: (
                cluster.run_status("src", ns).get("phase") in ("Halted", "Failed")
                and cluster.run_status("src", ns)
            ),
        )
        assert final["phase"] == "Halted", final
        assert final["latestCheckpoint"]["id"], "the halt leaves a durable checkpoint"
        ready = {c["type"]: c for c in final["conditions"]}["Ready"]
        assert ready["status"] == "False" and ready["lastTransitionTime"], ready
        name = incident["metadata"]["name"]
        resolved = await cluster.eventually(
            "the incident resolves once its source has ended",
            lambda: (
                (cluster.get("tolariaincidents", None, name) or {})
                .get("status", {})
                .get("resolution")
            ),
        )
        assert resolved["reason"].startswith(f"source run {ns}/src ended Halted"), resolved
        await cluster.eventually(
            "the peer is released", lambda: "incident" not in cluster.run_status("peer", ns)
        )
        assert cluster.run_status("peer", ns)["phase"] == "Running"
    finally:
        await cluster.stop_operator()
        await kubelet.close()
    assert written_keys(hybrid) >= {
        "phase",
        "conditions",
        "attempt",
        "podName",
        "progress",
        "latestSnapshot",
        "latestCheckpoint",
        "incident",
    }, written_keys(hybrid)
    assert_every_status_write_survived(hybrid)


@pytest.mark.req("R10.3")
@pytest.mark.asyncio
async def test_a_missed_rollback_deadline_and_its_recreate_survive_the_schema(
    world: tuple[RealCluster, HybridApi],
) -> None:
    cluster, hybrid = world
    ns = cluster.namespace
    fake = await cluster.sidecar("rb", ns)
    cluster.resolve = lambda namespace, run, port: f"127.0.0.1:{fake.port}"  # type: ignore[method-assign]
    await cluster.start_operator()
    await cluster.create_run(
        run_body(
            "rb",
            namespace=ns,
            spec={"rollback": {"fullDeadlineSeconds": 2}, "training": {"epochs": 5}},
        )
    )
    await cluster.eventually("pod rb-a1", lambda: cluster.get("pods", ns, "rb-a1"))
    await cluster.trainer_running("rb-a1", namespace=ns)
    await cluster.eventually(
        "Running", lambda: cluster.run_status("rb", ns).get("phase") == "Running"
    )
    await cluster.eventually(
        "sidecar followed",
        lambda: cluster.ctx and (v := cluster.ctx.views.get((ns, "rb"))) and v.reachable,
    )
    fake.rollback_started("rb-1")
    await cluster.eventually(
        "rollback in status", lambda: cluster.run_status("rb", ns).get("rollback")
    )
    await cluster.eventually(
        "attempt 2 after the missed deadline",
        lambda: cluster.run_status("rb", ns).get("podName") == "rb-a2",
    )
    status = cluster.run_status("rb", ns)
    assert status["rollback"]["state"] == "DeadlineMissed"
    assert status["firstFailure"]["reason"] == "RollbackDeadlineMissed"
    (incident,) = cluster.incidents()
    assert incident["spec"]["level"] == "critical"
    with contextlib.suppress(Exception):
        await fake.stop()
    await cluster.stop_operator()
    assert written_keys(hybrid) >= {"rollback", "firstFailure", "incident", "restartsCounted"}
    assert_every_status_write_survived(hybrid)
