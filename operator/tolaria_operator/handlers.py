"""The operator's kopf registrations, and nothing else: each handler calls plain functions in
`reconciler.py`, `watcher.py` and `escalation.py` (decisions in `pods.py`, `status.py`,
`incidents.py`, `deadline.py`).

Loaded by kopf (`kopf run -m tolaria_operator.handlers`, which `tolaria-operator` does) into
the default registry. The timers' and the daemon's intervals are the defaults of
`config.StatusSettings`, fixed when this module is imported. No handler returns a value:
kopf would store it in `status`, which the CRD would prune.

Pods are not watched through kopf (it filters labels on the client, so it would stream every
pod of the cluster): `informer.Informer` watches the operator's pods with a server-side
selector and hands their changes to `reconciler.on_pod_event` (started by `lifecycle`).
The resync timer and the sidecar daemon get kopf's copy of the run (`body`), so a resync of a
run with nothing to do reads and writes nothing.
"""

from __future__ import annotations

from typing import Any

import kopf

from leyline.spec import API_GROUP, API_VERSION
from tolaria_operator import deadline, lifecycle, reconciler, watcher
from tolaria_operator.config import StatusSettings

RUNS = (API_GROUP, API_VERSION, "tolariaruns")
_TIMING = StatusSettings()


@kopf.on.startup()
async def start_operator(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    await lifecycle.startup(settings, memo)


@kopf.on.cleanup()
async def stop_operator(memo: kopf.Memo, **_: Any) -> None:
    await lifecycle.cleanup(memo)


@kopf.on.resume(*RUNS)
@kopf.on.create(*RUNS)
@kopf.on.update(*RUNS, field="spec")
async def reconcile_run(name: str, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    ctx = lifecycle.context(memo)
    await lifecycle.handle(ctx, "reconcile", reconciler.sync_run(ctx, namespace or "", name))


@kopf.on.delete(*RUNS, optional=True)  # no finalizer for it: the garbage collector cleans up
async def delete_run(
    name: str, namespace: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any
) -> None:
    ctx = lifecycle.context(memo)
    await lifecycle.handle(ctx, "delete", reconciler.delete_run(ctx, namespace or "", name, body))


@kopf.timer(
    *RUNS,
    interval=_TIMING.deadline_check_interval_seconds,
    when=lifecycle.rollback_pending,
)
async def enforce_rollback_deadline(
    name: str, namespace: str | None, status: kopf.Status, memo: kopf.Memo, **_: Any
) -> None:
    ctx = lifecycle.context(memo)
    if deadline.missed_in_body(status, ctx.clock.now()):
        await lifecycle.handle(ctx, "deadline", reconciler.sync_run(ctx, namespace or "", name))


@kopf.timer(*RUNS, interval=_TIMING.resync_interval_seconds, when=lifecycle.run_is_active)
async def resync_run(
    name: str, namespace: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any
) -> None:
    ctx = lifecycle.context(memo)
    work = reconciler.sync_run(ctx, namespace or "", name, cached=body)
    await lifecycle.handle(ctx, "resync", work)


@kopf.daemon(
    *RUNS,
    when=lifecycle.run_is_active,
    cancellation_timeout=_TIMING.daemon_cancellation_timeout_seconds,
)
async def follow_sidecar(
    name: str,
    namespace: str | None,
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    ctx = lifecycle.context(memo)
    work = watcher.follow(ctx, namespace or "", name, stopped, live=body)
    await lifecycle.handle(ctx, "sidecar", work)
