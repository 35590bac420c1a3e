"""A run's end of life and its ownership on the real CRD API server (R10.5): the finalizer
kopf puts on an active run, and the documented way to delete a run when no operator is
running; no finalizer on a finished run; `spec.ttlSecondsAfterFinished` as the server
validates it and the retention sweep's deletions (UID precondition included) as the server
performs them; a name conflict as a `Ready` condition the schema keeps.

The server has no garbage collector (it is the CRD API server alone): that a run's objects go
with it is checked as what the collector reads, their ownerReferences (tests/operator).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from kubernetes.client import ApiClient, CustomObjectsApi
from kubernetes.client.rest import ApiException

from tests.k8s.hybrid_api import HybridApi
from tests.k8s.operator_world import RealCluster
from tests.operator import builders as b
from tolaria_operator.clock import SystemClock, format_time
from tolaria_operator.config import EscalationSettings, TolariaSettings
from tolaria_operator.context import OperatorContext, build_context
from tolaria_operator.kube import KubeApi
from tolaria_operator.lifecycle import FINALIZER
from tolaria_operator.resources import RUNS
from tolaria_operator.retention import expire_incidents, expire_runs

pytestmark = [
    pytest.mark.apiserver,
    pytest.mark.req("R10.5"),
    pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning"),
]

GROUP, VERSION = "tolaria.dev", "v1alpha1"
MERGE_PATCH = "application/merge-patch+json"
REMOVE_FINALIZERS = {"metadata": {"finalizers": None}}
"""The body of the documented `kubectl patch trun R --type=merge -p '{"metadata":
{"finalizers":null}}'`."""
LONG_START = {"failurePolicy": {"podStartTimeoutSeconds": 86_400}}


def run_doc(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TolariaRun",
        "metadata": {"name": name},
        "spec": {"training": {"task": "synthetic-mlp"}, **spec},
    }


class Runs:
    """A user's (or kubectl's) calls on the runs of one namespace."""

    def __init__(self, custom: CustomObjectsApi, namespace: str) -> None:
        self.custom, self.namespace = custom, namespace

    def create(self, doc: dict[str, Any]) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(  # type: ignore[no-any-return]
            GROUP, VERSION, self.namespace, "tolariaruns", doc
        )

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(  # type: ignore[no-any-return]
                GROUP, VERSION, self.namespace, "tolariaruns", name
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def patch(self, name: str, body: dict[str, Any], *, status: bool = False) -> None:
        call = (
            self.custom.patch_namespaced_custom_object_status
            if status
            else self.custom.patch_namespaced_custom_object
        )
        call(GROUP, VERSION, self.namespace, "tolariaruns", name, body, _content_type=MERGE_PATCH)

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "tolariaruns", name
        )


@pytest.fixture
def runs(custom: CustomObjectsApi, namespace: str) -> Runs:
    return Runs(custom, namespace)


def operator_context(kube: ApiClient, namespace: str) -> OperatorContext:
    """The operator's own client and settings, on the real server, watching `namespace`."""
    settings = TolariaSettings(escalation=EscalationSettings(watch_namespaces=(namespace,)))
    api = KubeApi(kube.configuration)
    return build_context(settings, kube=api, clock=SystemClock(), token_key=b"k" * 32)


# -- the finalizer ------------------------------------------------------------------------


def test_a_run_held_by_the_finalizer_is_deleted_once_the_documented_patch_removes_it(
    runs: Runs,
) -> None:
    """What an operator that is gone leaves: the run stays, marked for deletion, until the
    finalizer is removed by hand; then it goes at once."""
    runs.create(run_doc("held"))
    runs.patch("held", {"metadata": {"finalizers": [FINALIZER]}})  # as kopf puts it
    runs.delete("held")
    marked = runs.get("held")
    assert marked is not None and marked["metadata"]["deletionTimestamp"]
    runs.patch("held", REMOVE_FINALIZERS)
    assert runs.get("held") is None


def test_a_run_without_the_finalizer_is_deleted_at_once(runs: Runs) -> None:
    runs.create(run_doc("free"))
    runs.delete("free")
    assert runs.get("free") is None


@pytest.mark.slow
@pytest.mark.asyncio
async def test_only_the_active_run_keeps_the_finalizer_once_the_operator_is_gone(
    world: tuple[RealCluster, HybridApi], custom: CustomObjectsApi
) -> None:
    cluster, _ = world
    ns = cluster.namespace
    runs = Runs(custom, ns)
    await cluster.start_operator()
    await cluster.create_run(b.run_body("active", namespace=ns, spec=LONG_START))
    await cluster.create_run(b.run_body("done", namespace=ns, spec=LONG_START))
    pod = await cluster.eventually("pod done-a1", lambda: cluster.get("pods", ns, "done-a1"))
    await cluster.eventually(
        "podName recorded", lambda: cluster.run_status("done", ns).get("podName") == "done-a1"
    )
    finished = b.finished(copy.deepcopy(pod), "Succeeded", "all epochs done")
    await cluster.kubelet("done-a1", finished["status"], ns)

    def finalizers(name: str) -> list[str]:
        return list(((runs.get(name) or {}).get("metadata") or {}).get("finalizers") or [])

    await cluster.eventually("the active run's finalizer", lambda: finalizers("active"))
    await cluster.eventually(
        "done Succeeded", lambda: cluster.run_status("done", ns).get("phase") == "Succeeded"
    )
    await cluster.eventually("no finalizer once finished", lambda: not finalizers("done"))
    await cluster.stop_operator()

    runs.delete("done")
    assert runs.get("done") is None
    runs.delete("active")
    assert (runs.get("active") or {})["metadata"]["deletionTimestamp"]
    runs.patch("active", REMOVE_FINALIZERS)
    assert runs.get("active") is None


# -- spec.ttlSecondsAfterFinished and the retention sweep --------------------------------


def test_the_server_refuses_a_negative_ttl_naming_the_field(runs: Runs) -> None:
    with pytest.raises(ApiException) as refused:
        runs.create(run_doc("neg", ttlSecondsAfterFinished=-1))
    assert refused.value.status == 422
    assert "spec.ttlSecondsAfterFinished" in json.loads(refused.value.body)["message"]
    runs.create(run_doc("pos", ttlSecondsAfterFinished=0))


@pytest.mark.asyncio
async def test_the_sweep_deletes_a_finished_run_past_its_ttl_and_only_by_its_uid(
    runs: Runs, kube: ApiClient, namespace: str
) -> None:
    runs.create(run_doc("expired", ttlSecondsAfterFinished=60))
    runs.create(run_doc("young", ttlSecondsAfterFinished=3600))
    for name in ("expired", "young"):  # both finished at T0; the sweep looks at T0 + 120 s
        status = {"phase": "Succeeded", "completionTime": format_time(b.at(0))}
        runs.patch(name, {"status": status}, status=True)
    ctx = operator_context(kube, namespace)
    try:
        wrong = await ctx.kube.delete(RUNS, namespace, "expired", uid="not-its-uid")
        assert wrong is False and runs.get("expired") is not None
        assert await expire_runs(ctx, b.at(120)) == [f"{namespace}/expired"]
    finally:
        await ctx.kube.close()  # type: ignore[attr-defined]
    assert runs.get("expired") is None
    assert runs.get("young") is not None


@pytest.mark.asyncio
async def test_the_sweep_deletes_a_resolved_incident_past_its_ttl(
    custom: CustomObjectsApi, kube: ApiClient, namespace: str
) -> None:
    name = f"{namespace}-inc"
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TolariaIncident",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "tolaria-operator"}},
        "spec": {
            "level": "critical",
            "sourceRun": {"namespace": namespace, "name": "src"},
            "scope": "run",
        },
    }
    custom.create_cluster_custom_object(GROUP, VERSION, "tolariaincidents", body)
    status = {
        "phase": "Resolved",
        "resolution": {"time": format_time(b.at(0)), "by": "test", "reason": "over"},
    }
    custom.patch_cluster_custom_object_status(
        GROUP, VERSION, "tolariaincidents", name, {"status": status}, _content_type=MERGE_PATCH
    )
    ctx = operator_context(kube, namespace)
    try:
        assert await expire_incidents(ctx, b.at(3600)) == []  # within the day
        assert await expire_incidents(ctx, b.at(86_401)) == [name]
    finally:
        await ctx.kube.close()  # type: ignore[attr-defined]
    with pytest.raises(ApiException) as gone:
        custom.get_cluster_custom_object(GROUP, VERSION, "tolariaincidents", name)
    assert gone.value.status == 404


# -- ownership ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.asyncio
async def test_a_name_conflict_is_a_ready_condition_the_schema_keeps(
    world: tuple[RealCluster, HybridApi],
) -> None:
    cluster, hybrid = world
    ns = cluster.namespace
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "clash-manifest", "namespace": ns},
        "data": {"run.yaml": "someone else's"},
    }
    await cluster.request("POST", f"/api/v1/namespaces/{ns}/configmaps", config_map)
    await cluster.start_operator()
    await cluster.create_run(b.run_body("clash", namespace=ns, spec=LONG_START))

    def ready() -> dict[str, Any] | None:
        conditions = cluster.run_status("clash", ns).get("conditions") or []
        found = {c["type"]: c for c in conditions}.get("Ready") or {}
        return found if found.get("reason") == "NameConflict" else None

    condition = await cluster.eventually("Ready=False, reason NameConflict", ready)
    assert condition["status"] == "False"
    assert f"ConfigMap {ns}/clash-manifest" in condition["message"]
    assert cluster.get("pods", ns, "clash-a1") is None
    await cluster.stop_operator()
    assert hybrid.pruned() == [], "the condition the operator wrote was pruned or changed"
