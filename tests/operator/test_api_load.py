"""What the operator asks of the API server, through the whole operator against kmock: only its
own pods, and nothing at all for a run with nothing to do (the load that decides how many runs
one API server can carry)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.operator.builders import run_body
from tests.operator.harness import Cluster

pytestmark = pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning")

LONG_START = {"failurePolicy": {"podStartTimeoutSeconds": 86_400}}
SELECTOR = "app.kubernetes.io/managed-by=tolaria-operator"
SWEEP_LISTS = {
    "/apis/tolaria.dev/v1alpha1/tolariaruns",
    "/apis/tolaria.dev/v1alpha1/tolariaincidents",
}
"""The retention sweep's lists: one each per sweep for the whole operator, not per run."""


def _requests(cluster: Cluster) -> list[Any]:
    return list(cluster.kmock)


def _is_watch(request: Any) -> bool:
    return str(request.params.get("watch", "")).lower() in ("true", "1")


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.looptime
async def test_every_pod_list_and_watch_asks_the_server_for_the_operators_pods_only(
    cluster: Cluster,
) -> None:
    await cluster.sidecar("r1")
    await cluster.start_operator()
    await cluster.create_run(run_body("r1", spec=LONG_START))
    await cluster.attempt_running("r1")
    pod_reads = [
        r
        for r in _requests(cluster)
        if str(r.method).upper().endswith("GET") and r.url.path.endswith("/pods")
    ]
    assert any(_is_watch(r) for r in pod_reads), "the operator watches pods"
    for request in pod_reads:
        assert SELECTOR in str(request.params.get("labelSelector", "")), request.url


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_running_run_with_nothing_new_costs_no_api_call_between_resyncs(
    cluster: Cluster,
) -> None:
    await cluster.sidecar("r1")
    ctx = await cluster.start_operator()
    await cluster.create_run(run_body("r1", spec=LONG_START))
    await cluster.attempt_running("r1")
    await asyncio.sleep(20)  # the follower's first reconcile and any late write settle
    before = len(_requests(cluster))
    resyncs = ctx.metrics.cached_resyncs._value.get()
    await asyncio.sleep(4 * ctx.settings.status.resync_interval_seconds)
    calls = [
        r for r in _requests(cluster)[before:] if not _is_watch(r) and r.url.path not in SWEEP_LISTS
    ]
    assert calls == [], [f"{r.method} {r.url}" for r in calls]
    assert ctx.metrics.cached_resyncs._value.get() - resyncs >= 3, "the resyncs did run"
