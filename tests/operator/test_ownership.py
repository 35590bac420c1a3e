"""Ownership on a shared cluster (R10.5): an object is a run's only when it names the run's
UID among its ownerReferences. Anything else under a name the run would use is a name
conflict: the run waits with `Ready=False, reason=NameConflict` naming it, and the object is
never used, mounted, patched or deleted. Deleting a run deletes nothing by name (the garbage
collector removes what the run owns). Against the in-memory API, which records every call."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from tests.operator import builders as b
from tests.operator.fake_kube import FakeKube
from tests.operator.harness import RecordingEvents
from tolaria_operator.clock import SystemClock
from tolaria_operator.config import TolariaSettings
from tolaria_operator.context import OperatorContext, build_context
from tolaria_operator.reconciler import delete_run, sync_run
from tolaria_operator.resources import CONFIGMAPS, PODS, RUNS, SECRETS

pytestmark = pytest.mark.req("R10.5")


class FixedClock(SystemClock):
    def now(self) -> datetime:
        return b.at(10)


def context(kube: FakeKube, events: RecordingEvents | None = None) -> OperatorContext:
    return build_context(
        TolariaSettings(),
        kube=kube,
        clock=FixedClock(),
        events=events or RecordingEvents(),
        token_key=b"k" * 32,
    )


def foreign(kind: str, name: str, owner_uid: str = "") -> dict[str, Any]:
    """An object someone else made under a name a run would use (with `owner_uid`: made for
    another object, e.g. an earlier run of the same name)."""
    meta: dict[str, Any] = {"name": name, "namespace": "default", "labels": {"app": "other"}}
    if owner_uid:
        meta["ownerReferences"] = [
            {"apiVersion": "tolaria.dev/v1alpha1", "kind": "TolariaRun", "name": "r1"}
            | {"uid": owner_uid, "controller": True}
        ]
    body: dict[str, Any] = {"apiVersion": "v1", "kind": kind, "metadata": meta}
    if kind == "Secret":
        body["data"] = {"token": "c2Vuc2l0aXZl"}  # "sensitive"
    if kind == "ConfigMap":
        body["data"] = {"run.yaml": "not yours"}
    return body


async def given(kube: FakeKube, resource: Any, body: dict[str, Any]) -> None:
    await kube.create(resource, "default", body)
    kube.calls.clear()


def touched(kube: FakeKube, plural: str, name: str) -> list[tuple[str, str, str]]:
    """Every call but a read that named the object."""
    return [c for c in kube.calls if c[1:] == (plural, name) and c[0] != "get"]


def ready(kube: FakeKube, run: str = "r1") -> dict[str, Any]:
    status = kube.objects[("tolariaruns", "default", run)]["status"]
    return {c["type"]: c for c in status["conditions"]}["Ready"]


def mounted_secret(kube: FakeKube, pod: str) -> str:
    volumes = {v["name"]: v for v in kube.objects[("pods", "default", pod)]["spec"]["volumes"]}
    return str(volumes["token"]["secret"]["secretName"])


@pytest.mark.asyncio
async def test_a_secret_named_like_the_old_run_token_is_never_mounted_or_touched() -> None:
    """The confused deputy: `<run>-token` may be anybody's Secret; the sidecar's image is the
    user's choice. The pod mounts a Secret the operator has just created under a random name."""
    kube = FakeKube()
    await given(kube, SECRETS, foreign("Secret", "r1-token"))
    before = dict(kube.objects[("secrets", "default", "r1-token")])
    await kube.create(RUNS, "default", b.run_body("r1"))
    await sync_run(context(kube), "default", "r1")
    assert mounted_secret(kube, "r1-a1").startswith("r1-a1-token-")
    assert kube.objects[("secrets", "default", "r1-token")] == before
    assert touched(kube, "secrets", "r1-token") == []
    assert [c for c in kube.calls if c[:2] == ("get", "secrets")] == [], "no Secret is read"


@pytest.mark.asyncio
async def test_a_config_map_with_the_runs_name_it_does_not_own_is_a_name_conflict() -> None:
    kube, events = FakeKube(), RecordingEvents()
    await given(kube, CONFIGMAPS, foreign("ConfigMap", "r1-manifest"))
    before = dict(kube.objects[("configmaps", "default", "r1-manifest")])
    await kube.create(RUNS, "default", b.run_body("r1"))
    await sync_run(context(kube, events), "default", "r1")
    condition = ready(kube)
    assert (condition["status"], condition["reason"]) == ("False", "NameConflict")
    assert "ConfigMap default/r1-manifest" in condition["message"]
    status = (await kube.get(RUNS, "default", "r1"))["status"]
    assert status["reason"] == "NameConflict", "no reason may claim a pod was created"
    assert "ConfigMap default/r1-manifest" in status["message"]
    assert kube.objects[("configmaps", "default", "r1-manifest")] == before
    assert touched(kube, "configmaps", "r1-manifest") == []
    assert await kube.list(PODS, "default") == [], "nothing starts: the pod would mount it"
    assert not [c for c in kube.calls if c[:2] == ("create", "secrets")]
    assert events.reasons("r1").count("NameConflict") == 1


@pytest.mark.asyncio
async def test_the_conflict_is_reported_once_and_the_status_does_not_flap() -> None:
    kube, events = FakeKube(), RecordingEvents()
    await given(kube, CONFIGMAPS, foreign("ConfigMap", "r1-manifest"))
    await kube.create(RUNS, "default", b.run_body("r1"))
    ctx = context(kube, events)
    await sync_run(ctx, "default", "r1")
    kube.calls.clear()
    await sync_run(ctx, "default", "r1")  # a resync: still in conflict
    assert [c for c in kube.calls if c[0] != "get" and c[0] != "list"] == []
    assert events.reasons("r1").count("NameConflict") == 1


@pytest.mark.asyncio
async def test_an_object_left_by_an_earlier_run_of_the_same_name_is_not_this_runs() -> None:
    kube = FakeKube()
    await given(kube, CONFIGMAPS, foreign("ConfigMap", "r1-manifest", owner_uid="0ld-uid"))
    await kube.create(RUNS, "default", b.run_body("r1"))
    await sync_run(context(kube), "default", "r1")
    assert ready(kube)["reason"] == "NameConflict"
    assert touched(kube, "configmaps", "r1-manifest") == []


@pytest.mark.asyncio
async def test_a_pod_with_the_attempts_name_it_does_not_own_is_a_name_conflict() -> None:
    kube = FakeKube()
    pod = foreign("Pod", "r1-a1")
    pod["metadata"]["labels"] = {"tolaria.dev/run": "r1"}  # labels are anybody's to copy
    await given(kube, PODS, pod)
    await kube.create(RUNS, "default", b.run_body("r1"))
    await sync_run(context(kube), "default", "r1")
    condition = ready(kube)
    assert condition["reason"] == "NameConflict" and "Pod default/r1-a1" in condition["message"]
    assert touched(kube, "pods", "r1-a1") == []


@pytest.mark.asyncio
async def test_once_the_clashing_object_is_gone_the_run_starts() -> None:
    kube = FakeKube()
    await given(kube, CONFIGMAPS, foreign("ConfigMap", "r1-manifest"))
    await kube.create(RUNS, "default", b.run_body("r1"))
    ctx = context(kube)
    await sync_run(ctx, "default", "r1")
    await kube.delete(CONFIGMAPS, "default", "r1-manifest")  # its owner cleans up
    await sync_run(ctx, "default", "r1")
    assert ("pods", "default", "r1-a1") in kube.objects
    manifest = kube.objects[("configmaps", "default", "r1-manifest")]
    assert manifest["metadata"]["ownerReferences"][0]["uid"] == b.uid_of("r1")
    assert ready(kube)["reason"] != "NameConflict"


@pytest.mark.asyncio
async def test_objects_the_run_owns_are_kept_as_they_are_after_an_operator_restart() -> None:
    kube = FakeKube()
    await kube.create(RUNS, "default", b.run_body("r1"))
    await sync_run(context(kube), "default", "r1")
    b.evicted(kube.objects[("pods", "default", "r1-a1")])
    kube.calls.clear()
    await sync_run(context(kube), "default", "r1")  # a new operator process
    assert ("pods", "default", "r1-a2") in kube.objects
    assert ready(kube)["reason"] != "NameConflict"
    assert [c for c in kube.calls if c[0] == "patch" and c[1] != "tolariaruns"] == []


@pytest.mark.asyncio
async def test_a_pod_with_the_runs_label_but_not_its_uid_is_neither_counted_nor_deleted() -> None:
    kube = FakeKube()
    await kube.create(RUNS, "default", b.run_body("r1"))
    ctx = context(kube)
    await sync_run(ctx, "default", "r1")
    stray = foreign("Pod", "r1-debug")
    stray["metadata"]["labels"] = {"tolaria.dev/run": "r1"}
    await given(kube, PODS, stray)
    b.evicted(kube.objects[("pods", "default", "r1-a1")])
    await sync_run(ctx, "default", "r1")
    assert ("pods", "default", "r1-a2") in kube.objects
    assert touched(kube, "pods", "r1-debug") == []


@pytest.mark.asyncio
async def test_deleting_a_run_deletes_nothing_by_name() -> None:
    """Its objects carry its ownerReference: the garbage collector removes exactly those, so
    a same-named object that is not the run's stays."""
    kube = FakeKube()
    await given(kube, CONFIGMAPS, foreign("ConfigMap", "r1-manifest"))
    body = b.run_body("r1")
    await kube.create(RUNS, "default", body)
    await delete_run(context(kube), "default", "r1", body)
    assert [c for c in kube.calls if c[0] == "delete"] == []
    assert ("configmaps", "default", "r1-manifest") in kube.objects
