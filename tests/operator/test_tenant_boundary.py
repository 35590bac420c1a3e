"""The tenant boundary of escalation, on the whole operator in-process (kmock, looptime, real
gRPC fake sidecars): a run's author may write `spec.escalation.scope: cluster`, but only the
operator's settings decide whether its incident may reach another namespace (R10.4).

Each test has a source run in `default` (watched by the operator) and a running victim in
`team-b` with a live sidecar that would acknowledge a freeze. The victim is placed there as a
cluster would hold it (a run with a pod and a token), so the only thing between the source's
incident and the victim's sidecar is the policy under test.
"""

from __future__ import annotations

import base64
from dataclasses import replace
from typing import Any

import pytest

from tests.operator.builders import run_body
from tests.operator.harness import Cluster
from tolaria_operator.tokens import derive_token

pytestmark = pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning")

TENANT = "team-b"
CLUSTER_SCOPE = {
    "failurePolicy": {"podStartTimeoutSeconds": 86_400},
    "escalation": {"threshold": "critical", "scope": "cluster"},
}
MERGE = "application/merge-patch+json"


async def _running_victim(cluster: Cluster) -> None:
    """A run of another tenant with a pod and the token its sidecar checks, as it would be after
    an operator started it (this test's operator does not watch `team-b`): the pod mounts a
    Secret holding the token derived from the run's identity under the operator's key."""
    runs = f"/apis/tolaria.dev/v1alpha1/namespaces/{TENANT}/tolariaruns"
    await cluster.request("POST", runs, run_body("victim", namespace=TENANT))
    status = {"status": {"phase": "Running", "podName": "victim-a1", "attempt": 1}}
    await cluster.request("PATCH", f"{runs}/victim/status", status, MERGE)
    uid = (cluster.get("tolariaruns", TENANT, "victim") or {})["metadata"]["uid"]
    token = derive_token(cluster.token_key, TENANT, "victim", uid)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "victim-a1-token-0a1b2c3d", "namespace": TENANT},
        "data": {"token": base64.b64encode(token.encode()).decode()},
    }
    await cluster.request("POST", f"/api/v1/namespaces/{TENANT}/secrets", secret)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "victim-a1", "namespace": TENANT},
        "spec": {
            "containers": [{"name": "trainer", "image": "trainer"}],
            "volumes": [{"name": "token", "secret": {"secretName": secret["metadata"]["name"]}}],
        },
    }
    await cluster.request("POST", f"/api/v1/namespaces/{TENANT}/pods", pod)


async def _incident_after_an_emergency(cluster: Cluster) -> dict[str, Any]:
    """Start the source, raise a CRITICAL emergency on it, return the incident once every run
    it selected has answered."""
    source = cluster.sidecars[("default", "src")]
    await cluster.create_run(run_body("src", spec=CLUSTER_SCOPE))
    pod = await cluster.eventually("pod src-a1", lambda: cluster.get("pods", "default", "src-a1"))
    assert pod is not None
    await cluster.eventually(
        "src records its pod", lambda: cluster.run_status("src").get("podName") == "src-a1"
    )
    await cluster.trainer_running("src-a1")
    await cluster.eventually("src Running", lambda: cluster.run_status("src").get("phase"))
    source.emergency()
    source.ack(latency_ns=1_000_000)
    found = await cluster.eventually(
        "incident with answers",
        lambda: [
            i
            for i in cluster.incidents()
            if (i.get("status") or {}).get("runs")
            and all(r["ack"] != "Awaiting" for r in i["status"]["runs"])
        ],
    )
    return dict(found[0])


@pytest.mark.slow
@pytest.mark.req("R10.4")
@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_cluster_scoped_incident_never_signals_another_tenants_run(
    cluster: Cluster,
) -> None:
    await cluster.sidecar("src")
    victim = await cluster.sidecar("victim", namespace=TENANT)
    await _running_victim(cluster)
    await cluster.start_operator()

    incident = await _incident_after_an_emergency(cluster)

    assert victim.signals == []  # never frozen, so never halted
    assert "incident" not in cluster.run_status("victim", TENANT)
    assert [(r["namespace"], r["name"]) for r in incident["status"]["runs"]] == [("default", "src")]
    assert incident["spec"]["scope"] == "namespace"
    assert incident["spec"]["requestedScope"] == "cluster"
    assert not incident["spec"].get("crossNamespace")
    assert "EscalationNarrowed" in cluster.events.reasons("src")
    await cluster.close()


@pytest.mark.slow
@pytest.mark.req("R10.4")
@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_namespace_the_administrator_granted_reaches_other_tenants(
    cluster: Cluster,
) -> None:
    """The positive control of the test above: the same victim is reached once `default` is
    granted cluster reach, so its silence there is the policy, not the test's setup."""
    escalation = replace(
        cluster.settings.escalation,
        cluster_scope_namespaces=("default",),
        watch_namespaces=("default", TENANT),
    )
    cluster.settings = replace(cluster.settings, escalation=escalation)
    await cluster.sidecar("src")
    victim = await cluster.sidecar("victim", namespace=TENANT)
    await _running_victim(cluster)
    await cluster.start_operator()

    incident = await _incident_after_an_emergency(cluster)

    assert incident["spec"]["scope"] == "cluster" and incident["spec"]["crossNamespace"]
    reached = {(r["namespace"], r["name"]): r["ack"] for r in incident["status"]["runs"]}
    assert reached[(TENANT, "victim")] == "Acknowledged"
    assert [s.incident_id for s in victim.signals] == [incident["metadata"]["name"]]
    await cluster.close()
