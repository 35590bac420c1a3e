"""The reconcile loop's actions against an in-memory API: blocking recreate (never two pods of
one run), owned objects created once, the token reused (R10.1, R10.2, R10.5)."""

from __future__ import annotations

import asyncio
import base64
import copy
from datetime import datetime
from typing import Any, cast

import kopf
import pytest

from leyline.spec.status import ProgressStatus
from tests.operator import builders as b
from tests.operator.fake_kube import FakeKube
from tolaria_operator import lifecycle
from tolaria_operator.clock import SystemClock
from tolaria_operator.config import TolariaSettings
from tolaria_operator.context import OperatorContext, build_context
from tolaria_operator.errors import KubeApiError, PodNotGone
from tolaria_operator.informer import Informer
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


def test_the_progress_window_widens_so_all_runs_together_stay_within_the_budget() -> None:
    ctx = context(FakeKube())
    flusher = Flusher(ctx, ("default", "r0"))
    budget = ctx.settings.status.progress_patches_per_second
    assert flusher.interval() == ctx.settings.status.progress_patch_interval_seconds
    for i in range(1000):
        ctx.view(("default", f"r{i}"))
    assert flusher.interval() == pytest.approx(1000 / budget)
    assert 1000 / flusher.interval() <= budget


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


def reconcile_errors(ctx: OperatorContext) -> float:
    value = ctx.metrics.registry.get_sample_value(
        "tolaria_operator_reconcile_errors_total", {"handler": "reconcile"}
    )
    return value or 0.0


@pytest.mark.req("R10.1")
@pytest.mark.asyncio
async def test_a_pod_the_api_server_refuses_fails_the_run_in_one_reconcile_and_is_counted() -> None:
    """Whatever the CRD and the model let through, the API server has the last word on a pod
    (a validating admission policy, annotations past 256 KiB): its 422 is the run's reason,
    once, never a retry every minute behind a Pending phase."""
    kube = FakeKube()
    kube.refuse["pods"] = KubeApiError(
        "POST", "/api/v1/namespaces/default/pods", 422, "Invalid", 'Pod "r1-a1" is invalid: x'
    )
    await put(kube, b.run_body("r1"))
    ctx = context(kube)
    with pytest.raises(kopf.PermanentError, match="the API server refused it"):
        await lifecycle.handle(ctx, "reconcile", sync_run(ctx, "default", "r1"))
    status = (await kube.get(RUNS, "default", "r1"))["status"]
    assert (status["phase"], status["reason"], status["attempt"]) == ("Failed", "PodSpecInvalid", 0)
    assert 'Pod "r1-a1" is invalid: x' in status["message"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "PodSpecInvalid")
    assert reconcile_errors(ctx) == 1
    await lifecycle.handle(ctx, "reconcile", sync_run(ctx, "default", "r1"))  # final: no retry
    assert [c for c in kube.calls if c[:2] == ("create", "pods")] == [("create", "pods", "r1-a1")]
    assert reconcile_errors(ctx) == 1


@pytest.mark.req("R10.1")
@pytest.mark.asyncio
async def test_a_pod_turned_away_for_now_is_retried_with_the_servers_reason_in_the_status() -> None:
    """A quota, or a PriorityClass not created yet (403): nothing in the spec is wrong, so the
    pod is retried, but the run says why it waits, and each refusal is counted."""
    kube = FakeKube()
    kube.refuse["pods"] = KubeApiError(
        "POST", "/api/v1/namespaces/default/pods", 403, "Forbidden", "exceeded quota: gpus"
    )
    await put(kube, b.run_body("r1"))
    ctx = context(kube)
    with pytest.raises(kopf.TemporaryError):
        await lifecycle.handle(ctx, "reconcile", sync_run(ctx, "default", "r1"))
    status = (await kube.get(RUNS, "default", "r1"))["status"]
    assert (status["phase"], status["reason"], status["attempt"]) == ("Pending", "PodRefused", 1)
    assert "exceeded quota: gpus" in status["message"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "PodRefused")
    assert reconcile_errors(ctx) == 1

    del kube.refuse["pods"]  # the quota was raised
    await lifecycle.handle(ctx, "resync", sync_run(ctx, "default", "r1"))
    assert ("pods", "default", "r1-a1") in kube.objects  # the same attempt, not a new one
    assert (await kube.get(RUNS, "default", "r1"))["status"]["podName"] == "r1-a1"


@pytest.mark.req("R10.1")
@pytest.mark.asyncio
async def test_a_pod_the_operator_cannot_build_fails_the_run_in_one_reconcile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pod builder's `ValueError` (a quantity it cannot read...) used to escape the handler
    and be retried forever with the run Pending and nothing counted."""

    def broken(*_: object, **__: object) -> dict[str, object]:
        raise ValueError("'100m' is not a byte quantity (milli is for CPU)")

    monkeypatch.setattr("tolaria_operator.reconciler.attempt_pod", broken)
    kube = FakeKube()
    await put(kube, b.run_body("r1"))
    ctx = context(kube)
    with pytest.raises(kopf.PermanentError, match="milli is for CPU"):
        await lifecycle.handle(ctx, "reconcile", sync_run(ctx, "default", "r1"))
    status = (await kube.get(RUNS, "default", "r1"))["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "PodSpecInvalid")
    assert "cannot build it: '100m' is not a byte quantity" in status["message"]
    assert await kube.list(PODS, "default") == []
    assert reconcile_errors(ctx) == 1


@pytest.mark.req("R10.1")
@pytest.mark.asyncio
async def test_a_spec_an_older_crd_admitted_is_ready_false_in_one_reconcile_and_counted_once() -> (
    None
):
    """`shmSizeLimit: 100m` passed the CRD's old quantity pattern; this operator's model refuses
    it. One reconcile says so in Ready (naming the field), counts one error, creates nothing;
    the resync timer's reconciles neither write nor count it again."""
    kube = FakeKube()
    await put(kube, b.run_body("r1", spec={"pod": {"shmSizeLimit": "100m"}}))
    ctx = context(kube)
    with pytest.raises(kopf.PermanentError, match=r"spec\.pod\.shmSizeLimit"):
        await lifecycle.handle(ctx, "reconcile", sync_run(ctx, "default", "r1"))
    status = (await kube.get(RUNS, "default", "r1"))["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "SpecInvalid")
    assert "spec.pod.shmSizeLimit" in ready["message"]
    assert reconcile_errors(ctx) == 1

    def writes() -> list[tuple[str, str, str]]:
        return [c for c in kube.calls if c[0] not in ("get", "list")]

    written = writes()
    for _ in range(3):
        await lifecycle.handle(ctx, "resync", sync_run(ctx, "default", "r1"))
    assert writes() == written  # nothing written again
    assert await kube.list(PODS, "default") == []
    assert reconcile_errors(ctx) == 1


class WatchedPods:
    """The pod watch's memory, as the reconciler reads it."""

    def __init__(self, last: dict[str, Any]) -> None:
        self.last = last
        self.synced = True

    def last_state(self, namespace: str, name: str) -> dict[str, Any] | None:
        meta = self.last["metadata"]
        return self.last if (meta["namespace"], meta["name"]) == (namespace, name) else None


@pytest.mark.req("R10.2")
@pytest.mark.asyncio
async def test_a_pod_read_gone_before_its_deleted_event_is_judged_by_its_last_watched_state() -> (
    None
):
    """Kueue marked the pod and deleted it; a resync reads it gone before the DELETED event is
    handled. Its last state from the pod watch says StoppedByKueue: not a counted loss (with
    `restarts.limit: 0` a counted one would fail the run)."""
    kube = FakeKube()
    await put(kube, b.run_body("r1", spec={"restarts": {"limit": 0}}))
    ctx = context(kube)
    await sync_run(ctx, "default", "r1")
    last = b.stopped_by_kueue(copy.deepcopy(kube.objects[("pods", "default", "r1-a1")]))
    del kube.objects[("pods", "default", "r1-a1")]
    ctx.pods = cast(Informer, WatchedPods(last))
    await sync_run(ctx, "default", "r1")
    status = (await kube.get(RUNS, "default", "r1"))["status"]
    assert (status["phase"], status["reason"]) == ("Restarting", "StoppedByKueue")
    assert (status["restarts"], status["restartsCounted"]) == (1, 0)


@pytest.mark.req("R10.1")
@pytest.mark.asyncio
async def test_a_reconcile_leaves_progress_alone_to_the_rate_limited_writer() -> None:
    """Progress is written within the operator-wide budget by the follower's flusher; a
    reconcile with nothing else to change must not add a write per resync."""
    kube = FakeKube()
    await put(kube, b.run_body("r1"))
    ctx = context(kube)
    view = ctx.view(("default", "r1"))
    view.attempt = 1
    await sync_run(ctx, "default", "r1")
    await sync_run(ctx, "default", "r1")  # settled: nothing left to write
    view.progress = ProgressStatus(epoch=3, step=300)
    writes = len([c for c in kube.calls if c[0] == "patch"])
    await sync_run(ctx, "default", "r1")
    assert len([c for c in kube.calls if c[0] == "patch"]) == writes
