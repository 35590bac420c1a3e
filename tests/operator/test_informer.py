"""The pod watch's cache: what it hands over after a broken watch, when it may be trusted, and
a server that ignores the selector. A scripted API at the client's seam (list, then watch)
makes the break happen exactly where each test needs it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

import pytest

from tolaria_operator.errors import KubeApiError, WatchExpired
from tolaria_operator.informer import Informer
from tolaria_operator.kube import KubeApi
from tolaria_operator.resources import PODS, Resource

MINE = {"app.kubernetes.io/managed-by": "tolaria-operator"}


def pod(name: str, version: str, labels: Mapping[str, str] = MINE) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "team",
            "resourceVersion": version,
            "labels": dict(labels),
        }
    }


class ScriptedApi:
    """Answers lists from `lists` in turn; each watch plays the next script (events, then
    an error or the end of the stream), then waits forever once the scripts run out."""

    def __init__(self, lists: list[list[dict[str, Any]]], watches: list[list[Any]]) -> None:
        self.lists = lists
        self.watches = watches
        self.selectors: list[Mapping[str, str]] = []

    async def list_with_version(
        self, resource: Resource, namespace: str | None, labels: Mapping[str, str]
    ) -> tuple[list[dict[str, Any]], str]:
        self.selectors.append(dict(labels))
        return self.lists.pop(0), "100"

    async def watch(
        self,
        resource: Resource,
        namespace: str | None,
        *,
        labels: Mapping[str, str],
        resource_version: str,
        timeout_s: int,
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        self.selectors.append(dict(labels))
        if not self.watches:
            await asyncio.Event().wait()
        for step in self.watches.pop(0):
            if isinstance(step, BaseException):
                raise step
            yield step


async def follow(api: ScriptedApi, *, until: int) -> tuple[Informer, list[tuple[str, str]]]:
    seen: list[tuple[str, str]] = []

    async def on_event(kind: str, obj: dict[str, Any]) -> None:
        seen.append((kind, obj["metadata"]["name"]))

    informer = Informer(
        cast(KubeApi, api),
        PODS,
        namespaces=["team"],
        labels=MINE,
        on_event=on_event,
        retry_min_s=0.01,
    )
    task = asyncio.create_task(informer.run())
    for _ in range(500):
        await asyncio.sleep(0.01)
        if len(seen) >= until:
            break
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return informer, seen


@pytest.mark.asyncio
async def test_a_pod_deleted_while_the_watch_was_broken_is_handed_over_as_deleted() -> None:
    broken = KubeApiError("WATCH", "/api/v1/namespaces/team/pods", 0, "ClientError", "reset")
    api = ScriptedApi(
        lists=[[pod("a", "1"), pod("b", "2")], [pod("b", "3")]],
        watches=[[broken]],
    )
    _, seen = await follow(api, until=2)
    assert sorted(seen) == [("DELETED", "a"), ("MODIFIED", "b")]


@pytest.mark.asyncio
async def test_an_expired_watch_lists_again_and_changes_since_are_handed_over() -> None:
    expired = WatchExpired("WATCH", "/api/v1/namespaces/team/pods", 410, "Expired", "too old")
    api = ScriptedApi(
        lists=[[pod("a", "1")], [pod("a", "1"), pod("c", "5")]],
        watches=[[("MODIFIED", pod("a", "1")), expired]],
    )
    informer, seen = await follow(api, until=2)
    assert seen == [("MODIFIED", "a"), ("ADDED", "c")]
    assert informer.lists == 2


@pytest.mark.asyncio
async def test_every_list_and_watch_sends_the_selector_and_a_foreign_pod_is_ignored() -> None:
    api = ScriptedApi(
        lists=[[]],
        watches=[[("ADDED", pod("theirs", "7", {"app": "web"})), ("ADDED", pod("ours", "8"))]],
    )
    informer, seen = await follow(api, until=1)
    assert seen == [("ADDED", "ours")]
    assert api.selectors and all(s == MINE for s in api.selectors)
    assert [p["metadata"]["name"] for p in informer.select("team", MINE)] == ["ours"]


@pytest.mark.asyncio
async def test_the_cache_is_not_trusted_from_a_broken_watch_until_the_next_list() -> None:
    broken = KubeApiError("WATCH", "/api/v1/namespaces/team/pods", 0, "ClientError", "reset")
    gate = asyncio.Event()

    class Slow(ScriptedApi):
        async def list_with_version(
            self, resource: Resource, namespace: str | None, labels: Mapping[str, str]
        ) -> tuple[list[dict[str, Any]], str]:
            if len(self.lists) == 1:  # the list after the break
                await gate.wait()
            return await super().list_with_version(resource, namespace, labels)

    api = Slow(lists=[[pod("a", "1")], [pod("a", "1")]], watches=[[broken]])
    informer = Informer(cast(KubeApi, api), PODS, namespaces=["team"], labels=MINE)
    informer._retry = (0.0, 0.0)
    task = asyncio.create_task(informer.run())
    for _ in range(200):
        await asyncio.sleep(0.01)
        if not api.watches and not informer.synced:
            break
    assert not informer.synced, "a broken watch makes the cache untrusted"
    gate.set()
    for _ in range(200):
        await asyncio.sleep(0.01)
        if informer.synced:
            break
    assert informer.synced, "the next list makes it trusted again"
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
