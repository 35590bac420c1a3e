"""What the operator deletes on its own: finished runs past `spec.ttlSecondsAfterFinished`,
and TolariaIncidents resolved longer than `retention.resolved_incident_ttl_seconds` ago.

Why a periodic sweep and not kopf timers: a kopf timer (or daemon) keeps kopf's finalizer on
every object it matches, so a finished run or a resolved incident could then not be deleted
while the operator is down. The sweep lists the runs of the watched namespaces and the
incidents every `retention.sweep_interval_seconds` (the precision of both TTLs) and deletes
with the object's UID as a precondition, so an object made again under the same name in the
meantime is never deleted. Deleting a run deletes what it owns through the garbage collector
(ownerReferences), as `kubectl delete` would.

It also resolves an Open incident whose source run no longer exists (deleted while the
operator was away): the delete handler that would have resolved it never ran, and an Open
incident is never collected. Started by `lifecycle.startup`, stopped by `lifecycle.cleanup`;
one failed sweep is logged and the next one tries again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from leyline import RunPhase
from leyline.v1.cluster_pb2 import IncidentPhase
from tolaria_operator import escalation
from tolaria_operator.clock import parse_time
from tolaria_operator.context import OperatorContext
from tolaria_operator.errors import KubeApiError, OperatorError
from tolaria_operator.resources import INCIDENTS, MANAGED_BY_LABEL, MANAGER, RUNS, enum_name
from tolaria_operator.status import FINAL

logger = logging.getLogger(__name__)

FINAL_PHASES = frozenset(enum_name(RunPhase, p) for p in FINAL)
RESOLVED = IncidentPhase.Name(IncidentPhase.Resolved)
OPEN = IncidentPhase.Name(IncidentPhase.Open)


def _meta(body: Mapping[str, Any]) -> Mapping[str, Any]:
    return body.get("metadata") or {}


def run_expiry(body: Mapping[str, Any]) -> datetime | None:
    """When a run is to be deleted: its `status.completionTime` plus
    `spec.ttlSecondsAfterFinished`, once it is in a final phase; None while it runs, without
    a TTL, or without a readable completion time."""
    ttl = (body.get("spec") or {}).get("ttlSecondsAfterFinished")
    status = body.get("status") or {}
    if not isinstance(ttl, int) or ttl < 0 or status.get("phase") not in FINAL_PHASES:
        return None
    finished = parse_time(str(status.get("completionTime") or ""))
    return finished + timedelta(seconds=ttl) if finished is not None else None


def incident_expiry(body: Mapping[str, Any], ttl_seconds: float) -> datetime | None:
    """When a resolved incident is to be deleted: its resolution time plus the TTL; None while
    it is open or without a readable resolution time."""
    status = body.get("status") or {}
    if status.get("phase") != RESOLVED:
        return None
    resolved = parse_time(str((status.get("resolution") or {}).get("time") or ""))
    return resolved + timedelta(seconds=ttl_seconds) if resolved is not None else None


def _watched(ctx: OperatorContext, namespace: str) -> bool:
    watched = ctx.settings.escalation.watch_namespaces
    return not watched or namespace in watched


async def expire_runs(ctx: OperatorContext, now: datetime) -> list[str]:
    """Delete the finished runs whose TTL has passed; returns `namespace/name` of each."""
    watched: list[str | None] = list(ctx.settings.escalation.watch_namespaces)
    deleted = []
    for namespace in watched or [None]:
        for body in await ctx.kube.list(RUNS, namespace):
            expiry = run_expiry(body)
            if expiry is None or expiry > now:
                continue
            meta = _meta(body)
            ns, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
            if await ctx.kube.delete(RUNS, ns, name, uid=str(meta.get("uid") or "")):
                logger.info("%s/%s: deleted %s after it finished (TTL)", ns, name, expiry)
                deleted.append(f"{ns}/{name}")
    return deleted


async def expire_incidents(ctx: OperatorContext, now: datetime) -> list[str]:
    """Delete the operator's incidents resolved longer than the TTL ago and resolve the open
    ones whose source run is gone; returns the names deleted."""
    ttl = ctx.settings.retention.resolved_incident_ttl_seconds
    deleted = []
    for body in await ctx.kube.list(INCIDENTS, None, {MANAGED_BY_LABEL: MANAGER}):
        meta = _meta(body)
        name = str(meta.get("name") or "")
        source = (body.get("spec") or {}).get("sourceRun") or {}
        namespace, run = str(source.get("namespace") or ""), str(source.get("name") or "")
        if not _watched(ctx, namespace):
            continue  # another operator's (one per namespace set shares the incidents)
        phase = (body.get("status") or {}).get("phase")
        if phase == OPEN and run and await ctx.kube.get(RUNS, namespace, run) is None:
            await escalation.resolve_incident(
                ctx,
                name,
                by=escalation.OPERATOR,
                reason=f"source run {namespace}/{run} no longer exists",
            )
            continue
        expiry = incident_expiry(body, ttl)
        if expiry is None or expiry > now:
            continue
        if await ctx.kube.delete(INCIDENTS, None, name, uid=str(meta.get("uid") or "")):
            logger.info("incident %s deleted: resolved before %s", name, expiry)
            deleted.append(name)
    return deleted


async def sweep(ctx: OperatorContext) -> None:
    """One sweep: expired runs, then incidents."""
    now = ctx.clock.now()
    await expire_runs(ctx, now)
    await expire_incidents(ctx, now)


async def sweep_forever(ctx: OperatorContext) -> None:
    """`sweep` every `retention.sweep_interval_seconds` (0: never), until cancelled."""
    interval = ctx.settings.retention.sweep_interval_seconds
    if interval <= 0:
        return
    while True:
        await asyncio.sleep(interval)
        try:
            await sweep(ctx)
        except KubeApiError as err:
            logger.warning("retention sweep failed, retried in %g s: %s", interval, err)
        except OperatorError as err:
            logger.error("retention sweep failed, retried in %g s: %s", interval, err)
