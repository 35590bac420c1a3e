"""`Informer`: a list+watch cache of one resource, selected by labels on the server.

Why not kopf's pod watch: kopf filters handler labels on the client, so it watched every pod
of every watched namespace (in a shared cluster, every pod in the cluster) to find the few the
operator made. This sends the selector to the API server, which then streams only the
operator's pods, and keeps them in memory so a periodic resync can check a run without a read.

The cache is only ever a hint. `synced` is false until the first list of every namespace
arrived and again from a broken watch until the next list: readers then read the API
instead. The reconciler acts only on fresh reads (see `reconciler.sync_run`), so a stale
entry can cost a read, never a wrong action. Each change is handed to `on_event` in its own
task (a slow reconcile of one run does not hold back the stream); after a broken watch the
re-list hands over what changed meanwhile, a vanished object as DELETED with its last state.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from tolaria_operator.errors import KubeApiError, WatchExpired
from tolaria_operator.kube import KubeApi, matches
from tolaria_operator.resources import Resource

logger = logging.getLogger(__name__)

ObjectKey = tuple[str, str]
OnEvent = Callable[[str, dict[str, Any]], Awaitable[None]]

ADDED, MODIFIED, DELETED, BOOKMARK = "ADDED", "MODIFIED", "DELETED", "BOOKMARK"
GONE_KEPT = 4096
"""Deleted objects whose last state is kept (see `Informer.last_state`)."""


def _key(obj: Mapping[str, Any]) -> ObjectKey:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _version(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


class Informer:
    """See the module docstring. `namespaces` empty: the whole cluster in one watch."""

    def __init__(
        self,
        kube: KubeApi,
        resource: Resource,
        *,
        namespaces: Sequence[str],
        labels: Mapping[str, str],
        on_event: OnEvent | None = None,
        watch_timeout_s: int = 300,
        retry_min_s: float = 0.5,
        retry_max_s: float = 30.0,
    ) -> None:
        self._kube = kube
        self._resource = resource
        self._scopes: list[str | None] = list(namespaces) or [None]
        self._labels = dict(labels)
        self.on_event = on_event
        self._watch_timeout_s = watch_timeout_s
        self._retry = (retry_min_s, retry_max_s)
        self._objects: dict[str | None, dict[ObjectKey, dict[str, Any]]] = {}
        self._synced: set[str | None] = set()
        self._gone: collections.OrderedDict[ObjectKey, dict[str, Any]] = collections.OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self.lists = 0
        """Lists made (the first per namespace and one after each broken watch)."""

    # -- reading -------------------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """Every namespace listed and its watch unbroken since: the cache can be trusted."""
        return len(self._synced) == len(self._scopes)

    def select(self, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        """The cached objects of `namespace` carrying `labels`."""
        scope = namespace if namespace in self._objects else None
        return [
            obj
            for (ns, _), obj in (self._objects.get(scope) or {}).items()
            if ns == namespace and matches(obj, labels)
        ]

    def last_state(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The newest state seen of an object, also of one deleted lately (the last
        `GONE_KEPT`): a reconcile that reads a pod gone before its DELETED event was handled
        still learns how it ended (stopped by Kueue, evicted) instead of counting a loss."""
        key = (namespace, name)
        for objects in self._objects.values():
            if key in objects:
                return objects[key]
        return self._gone.get(key)

    def _forget(self, obj: dict[str, Any]) -> None:
        key = _key(obj)
        self._gone[key] = obj
        self._gone.move_to_end(key)
        while len(self._gone) > GONE_KEPT:
            self._gone.popitem(last=False)

    # -- following -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Follow every namespace until cancelled."""
        try:
            await asyncio.gather(*(self._follow(scope) for scope in self._scopes))
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _follow(self, scope: str | None) -> None:
        delay = self._retry[0]
        where = scope or "all namespaces"
        while True:
            try:
                items, version = await self._kube.list_with_version(
                    self._resource, scope, self._labels
                )
                self.lists += 1
                self._replace(scope, items)
                self._synced.add(scope)
                delay = self._retry[0]
                while True:  # a stream that ends normally (its timeout) resumes where it was
                    async for kind, obj in self._kube.watch(
                        self._resource,
                        scope,
                        labels=self._labels,
                        resource_version=version,
                        timeout_s=self._watch_timeout_s,
                    ):
                        version = _version(obj) or version
                        if kind != BOOKMARK:
                            self._apply(scope, kind, obj)
            except WatchExpired:
                logger.info("%s watch in %s expired; listing again", self._resource.plural, where)
                self._synced.discard(scope)
            except KubeApiError as err:
                self._synced.discard(scope)
                logger.warning(
                    "%s watch in %s broke (%s); listing again in %.1f s",
                    self._resource.plural,
                    where,
                    err,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry[1])

    def _replace(self, scope: str | None, items: list[dict[str, Any]]) -> None:
        """A fresh list: hand over what changed since the last one (nothing the first time)."""
        before = self._objects.get(scope)
        now = {_key(obj): obj for obj in items}
        self._objects[scope] = now
        if before is None:
            return
        for key, obj in now.items():
            old = before.get(key)
            if old is None or _version(old) != _version(obj):
                self._dispatch(ADDED if old is None else MODIFIED, obj)
        for key, old in before.items():
            if key not in now:
                self._forget(old)
                self._dispatch(DELETED, old)

    def _apply(self, scope: str | None, kind: str, obj: dict[str, Any]) -> None:
        if not matches(obj, self._labels):  # a server that ignores the selector
            return
        objects = self._objects.setdefault(scope, {})
        if kind == DELETED:
            objects.pop(_key(obj), None)
            self._forget(obj)
        else:
            objects[_key(obj)] = obj
        self._dispatch(kind, obj)

    def _dispatch(self, kind: str, obj: dict[str, Any]) -> None:
        if self.on_event is None:
            return
        task = asyncio.create_task(self._deliver(kind, obj))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, kind: str, obj: dict[str, Any]) -> None:
        if self.on_event is None:
            return
        with contextlib.suppress(asyncio.CancelledError):
            try:
                await self.on_event(kind, obj)
            except Exception as err:  # a handler's failure must not end the stream
                namespace, name = _key(obj)
                logger.warning("%s event for %s/%s not handled: %s", kind, namespace, name, err)
