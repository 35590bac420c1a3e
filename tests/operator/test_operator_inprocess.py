"""The whole operator in-process against kmock, with looptime for time and real gRPC sidecars
on 127.0.0.1 (R10.1-R10.5). kmock has no kubelet and no garbage collector: the tests patch
pod statuses as a kubelet would, and check that what a run makes carries the ownerReference
the garbage collector deletes it by (the operator deletes nothing of a run by name)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.operator.builders import run_body, uid_of
from tests.operator.harness import Cluster

pytestmark = pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning")

LONG_START = {"failurePolicy": {"podStartTimeoutSeconds": 86_400}}
"""Pods in kmock never start by themselves; keep the start timeout out of the way."""
GROUP = "tolaria.dev/group"


def _spec(**extra: object) -> dict[str, object]:
    return {**LONG_START, **extra}


@pytest.mark.slow
@pytest.mark.req("R10.1")
@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_new_run_gets_its_pod_service_token_manifest_and_policy(cluster: Cluster) -> None:
    await cluster.start_operator()
    await cluster.create_run(run_body("r1", spec=_spec()))
    pod = await cluster.eventually("pod r1-a1", lambda: cluster.get("pods", "default", "r1-a1"))
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["sidecar"]
    assert [c["name"] for c in pod["spec"]["containers"]] == ["trainer"]
    assert pod["metadata"]["labels"]["tolaria.dev/attempt"] == "1"
    for plural, name in (
        ("services", "r1-sidecar"),
        ("secrets", token_secret_of(pod)),
        ("configmaps", "r1-manifest"),
        ("networkpolicies", "r1-sidecar"),
        ("pods", "r1-a1"),
    ):
        obj = cluster.get(plural, "default", name)
        assert obj is not None, name
        assert obj["metadata"]["ownerReferences"][0]["uid"] == uid_of("r1")
    status = await cluster.eventually(
        "status.podName",
        lambda: cluster.run_status("r1").get("podName") and cluster.run_status("r1"),
    )
    assert (status["attempt"], status["phase"], status["sidecarService"]) == (
        1,
        "Pending",
        "r1-sidecar",
    )
    assert {c["type"] for c in status["conditions"]} >= {
        "Ready",
        "Progressing",
        "Succeeded",
        "Failed",
    }

    await cluster.trainer_running("r1-a1")
    await cluster.eventually("Running", lambda: cluster.run_status("r1").get("phase") == "Running")
    await cluster.close()


def token_secret_of(pod: dict[str, Any]) -> str:
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    return str(volumes["token"]["secret"]["secretName"])


@pytest.mark.slow
@pytest.mark.req("R10.1")
@pytest.mark.asyncio
@pytest.mark.looptime
async def test_deleting_a_run_leaves_what_it_owns_to_the_garbage_collector(
    cluster: Cluster,
) -> None:
    """The active run holds kopf's finalizer (its sidecar daemon is stopped first); the
    operator then lets it go and deletes nothing by name."""
    await cluster.start_operator()
    await cluster.create_run(run_body("r1", spec=_spec()))
    await cluster.eventually("pod", lambda: cluster.run_status("r1").get("podName"))
    pod = cluster.get("pods", "default", "r1-a1")
    assert pod is not None
    await cluster.delete_run("r1")
    await cluster.eventually(
        "run gone", lambda: cluster.get("tolariaruns", "default", "r1") is None
    )
    for plural, name in (
        ("pods", "r1-a1"),
        ("services", "r1-sidecar"),
        ("secrets", token_secret_of(pod)),
        ("configmaps", "r1-manifest"),
        ("networkpolicies", "r1-sidecar"),
    ):
        obj = cluster.get(plural, "default", name)
        assert obj is not None and not cluster.was_deleted(plural, "default", name), name
        assert obj["metadata"]["ownerReferences"][0]["uid"] == uid_of("r1"), name
    await cluster.close()


@pytest.mark.slow
@pytest.mark.req("R10.5")
@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_foreign_secret_named_like_the_run_token_is_never_mounted(
    cluster: Cluster,
) -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "r1-token", "namespace": "default"},
        "data": {"token": "c2Vuc2l0aXZl"},
    }
    await cluster.request("POST", "/api/v1/namespaces/default/secrets", secret)
    before = cluster.get("secrets", "default", "r1-token")
    await cluster.start_operator()
    await cluster.create_run(run_body("r1", spec=_spec()))
    pod = await cluster.eventually("pod r1-a1", lambda: cluster.get("pods", "default", "r1-a1"))
    assert token_secret_of(pod).startswith("r1-a1-token-")
    assert cluster.get("secrets", "default", "r1-token") == before
    await cluster.close()


@pytest.mark.slow
@pytest.mark.req("R10.5")
@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_name_conflict_holds_the_run_and_its_deletion_leaves_the_object(
    cluster: Cluster,
) -> None:
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "r1-manifest", "namespace": "default"},
        "data": {"run.yaml": "someone else's"},
    }
    await cluster.request("POST", "/api/v1/namespaces/default/configmaps", config_map)
    before = cluster.get("configmaps", "default", "r1-manifest")
    await cluster.start_operator()
    await cluster.create_run(run_body("r1", spec=_spec()))

    def name_conflict() -> dict[str, Any] | None:
        conditions = cluster.run_status("r1").get("conditions") or []
        ready = {c["type"]: c for c in conditions}.get("Ready") or {}
        return ready if ready.get("reason") == "NameConflict" else None

    ready = await cluster.eventually("Ready=False, reason NameConflict", name_conflict)
    assert ready["status"] == "False" and "ConfigMap default/r1-manifest" in ready["message"]
    assert "NameConflict" in cluster.events.reasons("r1")
    assert cluster.get("pods", "default", "r1-a1") is None
    await cluster.delete_run("r1")
    await cluster.eventually(
        "run gone", lambda: cluster.get("tolariaruns", "default", "r1") is None
    )
    assert cluster.get("configmaps", "default", "r1-manifest") == before
    assert not cluster.was_deleted("configmaps", "default", "r1-manifest")
    await cluster.close()


@pytest.mark.slow
@pytest.mark.req("R10.2")
@pytest.mark.asyncio
@pytest.mark.looptime
async def test_an_evicted_pod_is_replaced_without_counting_the_restart(cluster: Cluster) -> None:
    await cluster.start_operator()
    await cluster.create_run(run_body("r1", spec=_spec()))
    await cluster.attempt_running("r1")
    await cluster.kubelet(
        "r1-a1", {"phase": "Failed", "reason": "Evicted", "message": "low on memory"}
    )
    await cluster.eventually(
        "attempt 2", lambda: cluster.run_status("r1").get("podName") == "r1-a2"
    )
    status = cluster.run_status("r1")
    assert (status["restarts"], status["restartsCounted"]) == (1, 0)
    assert cluster.was_deleted("pods", "default", "r1-a1")
    assert status.get("firstFailure") is None
    await cluster.close()


async def _rollback_in_progress(cluster: Cluster, run: str, deadline_s: float) -> str:
    fake = cluster.sidecars[("default", run)]
    await cluster.create_run(
        run_body(run, spec=_spec(rollback={"fullDeadlineSeconds": deadline_s}))
    )
    await cluster.attempt_running(run)
    await cluster.eventually(
        "sidecar followed",
        lambda: (
            fake.server is not None
            and cluster.ctx
            and cluster.ctx.views.get(("default", run))
            and cluster.ctx.views[("default", run)].reachable
        ),
    )
    fake.rollback_started("rb-1")
    rollback = await cluster.eventually(
        "rollback in status",
        lambda: (
            (cluster.run_status(run).get("rollback") or {}).get("state") == "InProgress"
            and cluster.run_status(run)["rollback"]
        ),
    )
    assert rollback["tier"] == "ROLLBACK_TIER_FULL" and rollback["deadline"]
    return str(rollback["deadline"])


async def _assert_deadline_enforced(cluster: Cluster, run: str, step_s: float = 0.1) -> None:
    name = f"{run}-{uid_of(run).replace('-', '')[:8]}-a1-deadline"
    incident = await cluster.eventually(
        "deadline incident", lambda: cluster.get("tolariaincidents", None, name), step_s=step_s
    )
    assert incident["spec"]["level"] == "critical"
    assert incident["spec"]["kind"] == "ANOMALY_KIND_ROLLBACK_DEADLINE_MISSED"
    assert incident["spec"]["sourceRun"] == {"namespace": "default", "name": run}
    await cluster.eventually(
        "attempt 2 created", lambda: cluster.get("pods", "default", f"{run}-a2")
    )
    assert cluster.was_deleted("pods", "default", f"{run}-a1")
    status = await cluster.eventually(
        "status of attempt 2",
        lambda: cluster.run_status(run).get("podName") == f"{run}-a2" and cluster.run_status(run),
    )
    assert status["rollback"]["state"] == "DeadlineMissed"
    assert (status["attempt"], status["restartsCounted"]) == (2, 1)
    assert status["firstFailure"]["reason"] == "RollbackDeadlineMissed"


@pytest.mark.slow
@pytest.mark.req("R10.3")
@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_missed_full_rollback_deadline_raises_a_critical_incident_and_recreates_the_pod(
    cluster: Cluster,
) -> None:
    await cluster.sidecar("r1")  # before the operator: kopf cancels tasks started while it runs
    ctx = await cluster.start_operator()
    deadline = await _rollback_in_progress(cluster, "r1", deadline_s=12.0)
    assert cluster.incidents() == []
    await _assert_deadline_enforced(cluster, "r1")
    assert ctx.metrics.deadline_misses._value.get() == 1
    assert "RollbackDeadlineMissed" in cluster.events.reasons("r1")
    assert deadline
    await cluster.close()


@pytest.mark.slow
@pytest.mark.req("R10.3")
@pytest.mark.asyncio
@pytest.mark.looptime
async def test_the_deadline_is_enforced_from_status_alone_after_an_operator_restart(
    cluster: Cluster,
) -> None:
    await cluster.sidecar("r1")
    await cluster.start_operator()
    await _rollback_in_progress(cluster, "r1", deadline_s=60.0)
    await cluster.sidecars[("default", "r1")].stop()  # the new operator learns nothing from it
    await cluster.stop_operator()
    assert cluster.incidents() == []
    assert cluster.run_status("r1")["rollback"]["state"] == "InProgress"

    await cluster.start_operator()
    await _assert_deadline_enforced(cluster, "r1", step_s=1.0)
    await cluster.close()


@pytest.mark.slow
@pytest.mark.req("R10.4")
@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_group_incident_reaches_every_run_and_marks_the_unreachable_one(
    cluster: Cluster,
) -> None:
    escalation = {"threshold": "critical", "scope": "group", "groupLabel": GROUP}
    source = await cluster.sidecar("src")
    peer = await cluster.sidecar("peer")
    await cluster.start_operator()
    for name in ("src", "peer", "dark"):  # "dark" has a pod but no sidecar answering
        await cluster.create_run(
            run_body(name, spec=_spec(escalation=escalation), labels={GROUP: "g1"})
        )
    for name in ("src", "peer", "dark"):
        await cluster.attempt_running(name)

    source.emergency()
    source.ack(latency_ns=3_000_000)
    answered = await cluster.eventually(
        "incident with answers",
        lambda: [
            i
            for i in cluster.incidents()
            if len((i.get("status") or {}).get("runs") or []) == 3
            and all(r["ack"] != "Awaiting" for r in i["status"]["runs"])
        ],
    )
    incident = answered[0]
    acks = {r["name"]: r["ack"] for r in incident["status"]["runs"]}
    assert acks == {"src": "Acknowledged", "peer": "Acknowledged", "dark": "Unreachable"}
    assert incident["spec"]["scope"] == "group" and incident["spec"]["groupValue"] == "g1"
    assert incident["status"]["phase"] == "Open"
    assert [s.incident_id for s in peer.signals] == [incident["metadata"]["name"]]
    assert cluster.run_status("peer")["incident"]["role"] == "reached"
    assert cluster.run_status("src")["incident"]["role"] == "source"
    assert "incident" not in cluster.run_status("dark")
    await asyncio.sleep(2)
    assert len(cluster.incidents()) == 1, "the peer's echo of the signal must not escalate again"

    source.resolve()
    resolved = await cluster.eventually(
        "resolved",
        lambda: (
            (cluster.get("tolariaincidents", None, incident["metadata"]["name"]) or {})
            .get("status", {})
            .get("phase")
            == "Resolved"
            and cluster.get("tolariaincidents", None, incident["metadata"]["name"])
        ),
    )
    assert resolved["status"]["resolution"]["reason"] == "breakers closed again"
    await cluster.eventually("peer resolved on its sidecar", lambda: peer.resolutions)
    assert peer.resolutions[0].incident_id == incident["metadata"]["name"]
    await cluster.eventually(
        "refs cleared",
        lambda: (
            "incident" not in cluster.run_status("peer")
            and "incident" not in cluster.run_status("src")
        ),
    )
    await cluster.close()


@pytest.mark.slow
@pytest.mark.req("R10.1")
@pytest.mark.asyncio
@pytest.mark.looptime
async def test_suspend_checkpoints_then_stops_and_resume_starts_a_new_attempt(
    cluster: Cluster,
) -> None:
    fake = await cluster.sidecar("r1")
    await cluster.start_operator()
    await cluster.create_run(run_body("r1", spec=_spec()))
    await cluster.attempt_running("r1")
    await cluster.request(
        "PATCH",
        "/apis/tolaria.dev/v1alpha1/namespaces/default/tolariaruns/r1",
        {"spec": {"suspend": True}},
        "application/merge-patch+json",
    )
    status = await cluster.eventually(
        "Suspended",
        lambda: cluster.run_status("r1").get("phase") == "Suspended" and cluster.run_status("r1"),
    )
    assert [(r.reason, r.stop_after) for r in fake.checkpoint_requests] == [("suspend", True)]
    assert status["latestCheckpoint"]["id"] == "ckpt-0007"
    assert cluster.get("pods", "default", "r1-a1") is None
    assert status["podName"] == ""

    await cluster.request(
        "PATCH",
        "/apis/tolaria.dev/v1alpha1/namespaces/default/tolariaruns/r1",
        {"spec": {"suspend": False}},
        "application/merge-patch+json",
    )
    await cluster.eventually(
        "attempt 2", lambda: cluster.run_status("r1").get("podName") == "r1-a2"
    )
    status = cluster.run_status("r1")
    assert (status["attempt"], status["restarts"], status["restartsCounted"]) == (2, 0, 0)
    await cluster.close()
