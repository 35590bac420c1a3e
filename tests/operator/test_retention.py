"""Lifecycle on a shared cluster: finished runs go `spec.ttlSecondsAfterFinished` after they
finished, resolved incidents `retention.resolved_incident_ttl_seconds` after their resolution,
an open incident whose source run is gone is resolved, and a finished run carries no
finalizer, so deleting it never waits for the operator. Unit tests against the in-memory
API, then the whole operator against kmock with looptime (R10.4, R10.5)."""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import kopf
import pytest

import tolaria_operator.handlers  # noqa: F401 - registers the handlers
from tests.operator import builders as b
from tests.operator.fake_kube import FakeKube
from tests.operator.harness import Cluster
from tolaria_operator import lifecycle
from tolaria_operator.clock import SystemClock, format_time, parse_time
from tolaria_operator.config import EscalationSettings, RetentionSettings, TolariaSettings
from tolaria_operator.context import OperatorContext, build_context
from tolaria_operator.resources import INCIDENTS, RUNS
from tolaria_operator.retention import (
    expire_incidents,
    expire_runs,
    incident_expiry,
    run_expiry,
)

pytestmark = pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning")

DAY = 86_400.0


class FixedClock(SystemClock):
    def now(self) -> datetime:
        return b.at(0)


def context(kube: FakeKube, *, watch: tuple[str, ...] = ()) -> OperatorContext:
    settings = replace(TolariaSettings(), escalation=EscalationSettings(watch_namespaces=watch))
    return build_context(settings, kube=kube, clock=FixedClock(), token_key=b"k" * 32)


def finished_run(
    name: str, *, ttl: int | None, ago_s: float, phase: str = "Succeeded", namespace: str = "ns"
) -> dict[str, Any]:
    spec = {"ttlSecondsAfterFinished": ttl} if ttl is not None else {}
    status = {"phase": phase, "completionTime": format_time(b.at(-ago_s))}
    return b.run_body(name, namespace=namespace, spec=spec, status=status)


def incident(
    name: str, phase: str, *, resolved_ago_s: float = 0.0, source: str = "src", ns: str = "ns"
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if phase == "Resolved":
        status["resolution"] = {"time": format_time(b.at(-resolved_ago_s)), "by": "x"}
    return {
        "apiVersion": "tolaria.dev/v1alpha1",
        "kind": "TolariaIncident",
        "metadata": {
            "name": name,
            "uid": f"uid-{name}",
            "labels": {"app.kubernetes.io/managed-by": "tolaria-operator"},
        },
        "spec": {
            "level": "critical",
            "sourceRun": {"namespace": ns, "name": source},
            "scope": "run",
        },
        "status": status,
    }


async def put(kube: FakeKube, resource: Any, body: dict[str, Any]) -> None:
    await kube.create(resource, body["metadata"].get("namespace"), body)


# -- when ---------------------------------------------------------------------------------


def test_a_run_expires_its_ttl_after_its_completion_time() -> None:
    assert run_expiry(finished_run("r", ttl=60, ago_s=0)) == b.at(60)
    assert run_expiry(finished_run("r", ttl=0, ago_s=5, phase="Halted")) == b.at(-5)


def test_a_run_without_a_ttl_or_still_running_never_expires() -> None:
    assert run_expiry(finished_run("r", ttl=None, ago_s=DAY)) is None
    running = finished_run("r", ttl=60, ago_s=DAY)
    running["status"]["phase"] = "Running"
    assert run_expiry(running) is None
    unreadable = finished_run("r", ttl=60, ago_s=DAY)
    unreadable["status"]["completionTime"] = "yesterday"
    assert run_expiry(unreadable) is None


def test_an_incident_expires_the_ttl_after_its_resolution_and_never_while_open() -> None:
    assert incident_expiry(incident("i", "Resolved", resolved_ago_s=10), DAY) == b.at(DAY - 10)
    assert incident_expiry(incident("i", "Open"), DAY) is None


# -- the sweep ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_only_finished_runs_past_their_ttl_are_deleted() -> None:
    kube = FakeKube()
    await put(kube, RUNS, finished_run("old", ttl=60, ago_s=61))
    await put(kube, RUNS, finished_run("young", ttl=60, ago_s=59))
    await put(kube, RUNS, finished_run("kept", ttl=None, ago_s=DAY))
    assert await expire_runs(context(kube), b.at(0)) == ["ns/old"]
    assert {name for (plural, _, name) in kube.objects if plural == "tolariaruns"} == {
        "young",
        "kept",
    }


@pytest.mark.asyncio
async def test_a_run_made_again_under_the_name_is_not_deleted_for_the_old_ones_ttl() -> None:
    """The deletion names the UID the sweep saw: a newer object with the name survives."""
    kube = FakeKube()
    ctx = context(kube)
    old = finished_run("r", ttl=0, ago_s=1)
    await put(kube, RUNS, old)

    async def list_then_replace(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        seen = await FakeKube.list(kube, *args, **kwargs)
        kube.objects[("tolariaruns", "ns", "r")] = b.run_body("r", namespace="ns", uid="new")
        return seen

    kube.list = list_then_replace  # type: ignore[method-assign]
    assert await expire_runs(ctx, b.at(0)) == []
    assert kube.objects[("tolariaruns", "ns", "r")]["metadata"]["uid"] == "new"


@pytest.mark.asyncio
async def test_only_the_watched_namespaces_runs_are_swept() -> None:
    kube = FakeKube()
    await put(kube, RUNS, finished_run("mine", ttl=0, ago_s=1, namespace="team-a"))
    await put(kube, RUNS, finished_run("theirs", ttl=0, ago_s=1, namespace="team-z"))
    assert await expire_runs(context(kube, watch=("team-a",)), b.at(0)) == ["team-a/mine"]


@pytest.mark.asyncio
async def test_resolved_incidents_go_after_the_ttl_and_open_ones_stay() -> None:
    kube = FakeKube()
    await put(kube, RUNS, b.run_body("src", namespace="ns"))
    await put(kube, INCIDENTS, incident("expired", "Resolved", resolved_ago_s=DAY + 1))
    await put(kube, INCIDENTS, incident("recent", "Resolved", resolved_ago_s=DAY - 1))
    await put(kube, INCIDENTS, incident("open", "Open"))
    assert await expire_incidents(context(kube), b.at(0)) == ["expired"]
    assert {n for (p, _, n) in kube.objects if p == "tolariaincidents"} == {"recent", "open"}


@pytest.mark.asyncio
async def test_an_open_incident_whose_source_run_is_gone_is_resolved() -> None:
    """Its run was deleted while no operator ran (nobody else would ever resolve it)."""
    kube = FakeKube()
    await put(kube, INCIDENTS, incident("orphan", "Open", source="deleted"))
    await expire_incidents(context(kube), b.at(0))
    status = kube.objects[("tolariaincidents", None, "orphan")]["status"]
    assert status["phase"] == "Resolved"
    assert status["resolution"]["reason"] == "source run ns/deleted no longer exists"


@pytest.mark.asyncio
async def test_another_operators_incidents_are_left_alone() -> None:
    kube = FakeKube()
    await put(kube, INCIDENTS, incident("theirs", "Resolved", resolved_ago_s=2 * DAY, ns="z"))
    assert await expire_incidents(context(kube, watch=("ns",)), b.at(0)) == []


# -- finalizer ----------------------------------------------------------------------------


def test_only_an_active_runs_daemon_and_timers_need_kopfs_finalizer() -> None:
    """The delete handler is optional, and every daemon and timer stops matching once the run
    is final: kopf then removes its finalizer, and a finished run goes without the operator."""
    registry = kopf.get_default_registry()
    assert [h.id for h in registry._changing.get_all_handlers() if h.requires_finalizer] == []
    for handler in registry._spawning.get_all_handlers():
        assert handler.when is not None, handler.id
        for phase in ("Succeeded", "Failed", "Halted"):
            assert not handler.when(status={"phase": phase}), (handler.id, phase)
    assert lifecycle.run_is_active(status={"phase": "Running"})


# -- the whole operator -------------------------------------------------------------------

LONG_START = {"failurePolicy": {"podStartTimeoutSeconds": 86_400}}


async def run_to_success(cluster: Cluster, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Create the run, let its trainer finish, return its final status."""
    await cluster.create_run(b.run_body(name, spec={**LONG_START, **spec}))
    pod_name = f"{name}-a1"
    pod = await cluster.eventually(pod_name, lambda: cluster.get("pods", "default", pod_name))
    await cluster.eventually(
        "podName recorded", lambda: cluster.run_status(name).get("podName") == pod_name
    )
    done = b.finished(copy.deepcopy(pod), "Succeeded", "all epochs done")
    await cluster.kubelet(pod_name, done["status"])
    return await cluster.eventually(  # type: ignore[no-any-return]
        "Succeeded",
        lambda: cluster.run_status(name).get("phase") == "Succeeded" and cluster.run_status(name),
    )


def finalizers(cluster: Cluster, name: str) -> list[str]:
    run = cluster.get("tolariaruns", "default", name) or {}
    return list((run.get("metadata") or {}).get("finalizers") or [])


@pytest.mark.slow
@pytest.mark.req("R10.5")
@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_finished_run_is_deleted_at_once_even_with_no_operator_running(
    cluster: Cluster,
) -> None:
    await cluster.start_operator()
    await cluster.create_run(b.run_body("r0", spec=LONG_START))
    await cluster.eventually("finalizer on the active run", lambda: finalizers(cluster, "r0"))
    await run_to_success(cluster, "r1", {})
    await cluster.eventually("no finalizer once finished", lambda: not finalizers(cluster, "r1"))
    await cluster.stop_operator()
    await cluster.delete_run("r1")
    assert cluster.get("tolariaruns", "default", "r1") is None
    await cluster.close()


@pytest.mark.slow
@pytest.mark.req("R10.5")
@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_finished_run_is_deleted_its_ttl_after_it_finished(cluster: Cluster) -> None:
    cluster.settings = replace(
        cluster.settings, retention=RetentionSettings(sweep_interval_seconds=5.0)
    )
    await cluster.start_operator()
    final = await run_to_success(cluster, "r1", {"ttlSecondsAfterFinished": 60})
    finished = parse_time(final["completionTime"])
    assert finished is not None
    await cluster.eventually(
        "deleted", lambda: cluster.get("tolariaruns", "default", "r1") is None, step_s=1.0
    )
    assert finished + timedelta(seconds=60) <= cluster.clock.now()
    assert cluster.clock.now() <= finished + timedelta(seconds=60 + 5 + 2)
    await cluster.close()


@pytest.mark.slow
@pytest.mark.req("R10.4")
@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_resolved_incident_is_deleted_the_ttl_after_its_resolution(
    cluster: Cluster,
) -> None:
    cluster.settings = replace(
        cluster.settings,
        retention=RetentionSettings(resolved_incident_ttl_seconds=600, sweep_interval_seconds=30),
    )
    await cluster.start_operator()
    body = incident("inc-1", "Resolved", source="gone", ns="default")
    body["metadata"].pop("uid")
    body["status"]["resolution"]["time"] = format_time(cluster.clock.now())
    resolved_at = cluster.clock.now()
    await cluster.request("POST", "/apis/tolaria.dev/v1alpha1/tolariaincidents", body)
    await cluster.eventually(
        "incident deleted",
        lambda: cluster.get("tolariaincidents", None, "inc-1") is None,
        step_s=5.0,
    )
    assert resolved_at + timedelta(seconds=600) <= cluster.clock.now()
    assert cluster.clock.now() <= resolved_at + timedelta(seconds=600 + 30 + 10)
    await cluster.close()


@pytest.mark.slow
@pytest.mark.req("R10.4")
@pytest.mark.asyncio
@pytest.mark.looptime
async def test_deleting_an_active_run_still_resolves_its_incident(cluster: Cluster) -> None:
    """The delete handler is optional, but an active run holds kopf's finalizer, so the
    operator sees its deletion and resolves the incident it raised."""
    await cluster.start_operator()
    await cluster.create_run(b.run_body("r1", spec=LONG_START))
    await cluster.eventually("pod", lambda: cluster.run_status("r1").get("podName"))
    body = incident("inc-1", "Open", source="r1", ns="default")
    body["metadata"].pop("uid")
    await cluster.request("POST", "/apis/tolaria.dev/v1alpha1/tolariaincidents", body)
    ref = {"name": "inc-1", "level": "critical", "role": "source"}
    await cluster.request(
        "PATCH",
        "/apis/tolaria.dev/v1alpha1/namespaces/default/tolariaruns/r1/status",
        {"status": {"incident": ref}},
        "application/merge-patch+json",
    )
    await cluster.delete_run("r1")
    resolution = await cluster.eventually(
        "resolved",
        lambda: ((cluster.get("tolariaincidents", None, "inc-1") or {}).get("status") or {}).get(
            "resolution"
        ),
    )
    assert resolution["reason"] == "source run default/r1 deleted"
    await cluster.close()
