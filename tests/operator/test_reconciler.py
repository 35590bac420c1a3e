"""The reconcile loop's actions against an in-memory API: blocking recreate (never two pods of
one run), owned objects created once, the token reused (R10.1, R10.2, R10.5)."""

from __future__ import annotations

import asyncio
import base64
from datetime import datetime
from typing import Any

import pytest

from leyline.spec.status import ProgressStatus
from tests.operator import builders as b
from tests.operator.fake_kube import FakeKube
from tolaria_operator.clock import SystemClock
from tolaria_operator.config import TolariaSettings
from tolaria_operator.context import OperatorContext, build_context
from tolaria_operator.errors import PodNotGone
from tolaria_operator.reconciler import sync_run
from tolaria_operator.resources import INCIDENTS, PODS, RUNS
from tolaria_operator.watcher import Flusher


class FixedClock(SystemClock):
    def now(self) -> datetime:
        return b.at(10)


def context(kube: FakeKube) -> OperatorContext:
    return build_context(TolariaSettings(), kube=kube, clock=FixedClock(), token_key=b"k" * 32)


async def put(kube: FakeKube, body: dict[str, Any]) -> None:
    kube.objects[("tolariaruns", "default", body["metadata"]["name"])] = body


@pytest.mark.req("R10.1")
@pytest.mark.asyncio
async def test_the_first_reconcile_creates_the_owned_objects_then_the_pod() -> None:
    kube = FakeKube()
    await put(kube, b.run_body("r1"))
    await sync_run(context(kube), "default", "r1")
    created = [(plural, name) for verb, plural, name in kube.calls if verb == "create"]
    assert created[:3] == [
        ("configmaps", "r1-manifest"),
        ("services", "r1-sidecar"),
        ("networkpolicies", "r1-sidecar"),
    ]
    assert created[3][0] == "secrets" and created[3][1].startswith("r1-a1-token-")
    assert created[4:] == [("pods", "r1-a1")]
    status = (await kube.get(RUNS, "default", "r1"))["status"]
    assert (status["attempt"], status["podName"], status["phase"]) == (1, "r1-a1", "Pending")


def mounted_token(kube: FakeKube, pod: str) -> tuple[str, str]:
    """The token Secret a pod mounts, and the token in it."""
    volumes = {v["name"]: v for v in kube.objects[("pods", "default", pod)]["spec"]["volumes"]}
    name = volumes["token"]["secret"]["secretName"]
    secret = kube.objects[("secrets", "default", name)]
    return name, base64.b64decode(secret["data"]["token"]).decode()


@pytest.mark.req("R10.5")
@pytest.mark.asyncio
async def test_each_attempt_mounts_a_new_secret_with_the_runs_one_token() -> None:
    kube = FakeKube()
    await put(kube, b.run_body("r1"))
    ctx = context(kube)
    await sync_run(ctx, "default", "r1")
    first_secret, token = mounted_token(kube, "r1-a1")
    b.evicted(kube.objects[("pods", "default", "r1-a1")])
    await sync_run(ctx, "default", "r1")
    second_secret, again = mounted_token(kube, "r1-a2")
    assert second_secret != first_secret and second_secret.startswith("r1-a2-token-")
    assert again == token == await ctx.tokens.token("default", "r1", b.uid_of("r1"))


@pytest.mark.req("R10.2")
@pytest.mark.asyncio
@pytest.mark.looptime
async def test_the_next_attempt_waits_until_the_old_pod_is_gone() -> None:
    kube = FakeKube()
    await put(kube, b.run_body("r1"))
    ctx = context(kube)
    await sync_run(ctx, "default", "r1")
    b.evicted(kube.objects[("pods", "default", "r1-a1")])
    kube.terminating.add("r1-a1")  # a long grace period: the pod lingers after deletion

    with pytest.raises(PodNotGone):
        await sync_run(ctx, "default", "r1")
    assert ("pods", "default", "r1-a2") not in kube.objects
    status = (await kube.get(RUNS, "default", "r1"))["status"]
    assert (
        status["attempt"],
        status["podName"],
        status["restarts"],
        status["restartsCounted"],
    ) == (2, "", 1, 0)

    del kube.objects[("pods", "default", "r1-a1")]  # the kubelet is done with it
    await sync_run(ctx, "default", "r1")
    assert ("pods", "default", "r1-a2") in kube.objects
    status = (await kube.get(RUNS, "default", "r1"))["status"]
    assert (
        status["attempt"],
        status["podName"],
        status["restarts"],
        status["restartsCounted"],
    ) == (2, "r1-a2", 1, 0)
    annotations = kube.objects[("pods", "default", "r1-a2")]["metadata"]["annotations"]
    assert annotations["tolaria.dev/restarts-before"] == "1"


@pytest.mark.req("R10.1")
@pytest.mark.asyncio
async def test_a_run_that_is_gone_or_being_deleted_is_left_alone() -> None:
    kube = FakeKube()
    await sync_run(context(kube), "default", "missing")
    body = b.run_body("r1")
    body["metadata"]["deletionTimestamp"] = "2026-11-25T12:00:00Z"
    await put(kube, body)
    await sync_run(context(kube), "default", "r1")
    assert [c for c in kube.calls if c[0] not in ("get", "list")] == []
    assert await kube.list(PODS, "default") == []


@pytest.mark.req("R10.1")
@pytest.mark.asyncio
@pytest.mark.looptime
async def test_progress_is_written_at_most_once_per_interval() -> None:
    kube = FakeKube()
    await put(kube, b.run_body("r1"))
    ctx = context(kube)
    view = ctx.view(("default", "r1"))
    view.attempt = 1
    flusher = Flusher(ctx, ("default", "r1"))
    task = asyncio.create_task(flusher.run())
    for step in range(20):  # a sidecar streaming ten steps a second for two seconds
        view.progress = ProgressStatus(epoch=1, step=step)
        flusher.mark()
        await asyncio.sleep(0.1)
    await asyncio.sleep(3)
    task.cancel()
    patches = [c for c in kube.calls if c[0] == "patch"]
    assert len(patches) == 2  # at once, then once the 2 s window has passed
    status = (await kube.get(RUNS, "default", "r1"))["status"]
    assert status["progress"]["step"] == 19


@pytest.mark.req("R10.4")
@pytest.mark.asyncio
async def test_an_incident_resolves_when_its_source_run_ends() -> None:
    kube = FakeKube()
    await put(kube, b.run_body("r1"))
    ctx = context(kube)
    await sync_run(ctx, "default", "r1")
    ref = {"name": "inc-1", "level": "critical", "role": "source"}
    await kube.patch(RUNS, "default", "r1", {"status": {"incident": ref}}, subresource="status")
    kube.objects[("tolariaincidents", None, "inc-1")] = {
        "metadata": {"name": "inc-1"},
        "spec": {
            "level": "critical",
            "sourceRun": {"namespace": "default", "name": "r1"},
            "scope": "run",
        },
        "status": {"phase": "Open", "runs": []},
    }
    b.finished(kube.objects[("pods", "default", "r1-a1")], "Halted", "CRITICAL unresolved")
    await sync_run(ctx, "default", "r1")
    run_status = (await kube.get(RUNS, "default", "r1"))["status"]
    assert run_status["phase"] == "Halted"
    assert "incident" not in run_status
    incident = (await kube.get(INCIDENTS, None, "inc-1"))["status"]
    assert incident["phase"] == "Resolved"
    assert incident["resolution"]["reason"].startswith("source run default/r1 ended Halted")
