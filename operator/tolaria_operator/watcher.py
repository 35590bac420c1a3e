"""The per-run sidecar follower (a kopf daemon's body): `GetStatus`, then `StreamEvents` into
the run's `SidecarView`, status patches and escalations, reconnecting with back-off.

Started by kopf for every active run and cancelled by kopf when the run ends or is deleted.
Progress, snapshot and checkpoint events are written at most once per window (per run
`status.progress_patch_interval_seconds`, widened so that all runs together stay within
`status.progress_patches_per_second`); rollback, emergency and resolution events trigger
a full reconcile at once. A stream that breaks resumes after the last sequence it saw; a
new attempt (a new sidecar) starts a fresh view. Never raises out of the loop for a sidecar
or API error (it backs off and retries), and never writes status of another attempt.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
from collections.abc import Awaitable, Mapping
from typing import Any

from leyline import RollbackTier
from tolaria_operator import escalation, reconciler
from tolaria_operator.context import OperatorContext, RunKey
from tolaria_operator.errors import KubeApiError, OperatorError, SidecarUnavailable
from tolaria_operator.incidents import should_escalate
from tolaria_operator.protocols import StopFlag
from tolaria_operator.resources import RUNS, RunObject, parse_run
from tolaria_operator.status import FINAL
from tolaria_operator.view import Change, SidecarView

logger = logging.getLogger(__name__)


class Flusher:
    """Writes a run's progress fields at most once per interval, in the background."""

    def __init__(self, ctx: OperatorContext, key: RunKey) -> None:
        self._ctx = ctx
        self._key = key
        self._dirty = asyncio.Event()
        self._last = -math.inf

    def mark(self) -> None:
        """Something changed: write it within the rate limit."""
        self._dirty.set()

    def written(self) -> None:
        """A full reconcile has just written everything."""
        self._last = asyncio.get_running_loop().time()

    def interval(self) -> float:
        """This run's window: the per-run floor, or its share of the operator's budget."""
        settings = self._ctx.settings.status
        share = len(self._ctx.views) / settings.progress_patches_per_second
        return max(settings.progress_patch_interval_seconds, share)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._dirty.wait()
            delay = self._last + self.interval() - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self._dirty.clear()
            try:
                await reconciler.patch_progress(self._ctx, self._key)
            except KubeApiError as err:
                logger.warning("%s/%s: progress not written: %s", *self._key, err)
            self._last = loop.time()


async def follow(
    ctx: OperatorContext,
    namespace: str,
    name: str,
    stopped: StopFlag,
    *,
    live: Mapping[str, Any] | None = None,
) -> None:
    """Follow the run's sidecar until the run ends, is deleted, or `stopped` is set. `live`:
    kopf's copy of the run, kept current from its watch, read instead of the API between
    reconnects (a sidecar that stays away costs no reads)."""
    key = (namespace, name)
    view = ctx.view(key)
    flusher = Flusher(ctx, key)
    flushing = asyncio.create_task(flusher.run(), name=f"tolaria-flush-{namespace}/{name}")
    settings = ctx.settings.sidecar
    backoff = settings.reconnect_min_seconds
    try:
        while not stopped.is_set():
            body = copy.deepcopy(dict(live)) if live is not None else None
            if body is None:
                body = await _read(ctx, namespace, name)
            if body is None:
                return
            run = parse_run(body)
            if run.status.phase in FINAL or run.deleting:
                return
            if view.attempt != run.status.attempt:
                view.reset(run.status.attempt)
            if run.status.pod_name:
                try:
                    await _stream(ctx, run, view, flusher, stopped)
                    backoff = settings.reconnect_min_seconds
                except SidecarUnavailable as err:
                    if view.reachable:
                        logger.warning("%s/%s: sidecar lost: %s", namespace, name, err.detail)
                    view.mark_unreachable(err.detail)
            else:
                view.mark_unreachable("no pod yet")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, settings.reconnect_max_seconds)
    finally:
        flushing.cancel()
        await asyncio.gather(flushing, return_exceptions=True)


async def _read(ctx: OperatorContext, namespace: str, name: str) -> dict[str, object] | None:
    while True:
        try:
            return await ctx.kube.get(RUNS, namespace, name)
        except KubeApiError as err:
            logger.warning("%s/%s: cannot read the run: %s", namespace, name, err)
            await asyncio.sleep(ctx.settings.sidecar.reconnect_max_seconds)


async def _stream(
    ctx: OperatorContext, run: RunObject, view: SidecarView, flusher: Flusher, stopped: StopFlag
) -> None:
    client = await ctx.sidecars.open(run.namespace, run.name)
    async with client:
        truth = await client.get_status()
        view.apply_status(truth, run.run.spec.rollback, ctx.clock.now())
        logger.info(
            "%s/%s: following the sidecar of attempt %d at %s",
            run.namespace,
            run.name,
            view.attempt,
            client.address,
        )
        await _guarded(ctx, run, escalation.resolve_stale(ctx, run, view.attempt))
        active = view.active_emergency
        if active is not None and should_escalate(active, run.run.spec.escalation):
            await _guarded(ctx, run, escalation.on_emergency(ctx, run, view.attempt, active))
        await _guarded(ctx, run, reconciler.sync_run(ctx, run.namespace, run.name))
        flusher.written()
        async for event in client.events(view.last_sequence):
            change = view.apply_event(event, run.run.spec.rollback, ctx.clock.now())
            await _act(ctx, run, view, change, flusher)
            if stopped.is_set():
                return


async def _act(
    ctx: OperatorContext, run: RunObject, view: SidecarView, change: Change, flusher: Flusher
) -> None:
    if change.finished is not None:
        report = change.finished
        if report.tier:
            tier = RollbackTier.Name(report.tier)
            ctx.metrics.rollback_duration.labels(tier).observe(report.total_ns / 1e9)
    if change.emergency is not None:
        await _guarded(ctx, run, escalation.on_emergency(ctx, run, view.attempt, change.emergency))
    if change.ack is not None:
        latency_ms = change.ack.latency_ns / 1e6
        await _guarded(ctx, run, escalation.on_source_ack(ctx, run, latency_ms))
    if change.resolution is not None:
        await _guarded(
            ctx, run, escalation.on_resolution(ctx, run, view.attempt, change.resolution)
        )
    if change.urgent:
        await _guarded(ctx, run, reconciler.sync_run(ctx, run.namespace, run.name))
        flusher.written()
    elif change.dirty:
        flusher.mark()


async def _guarded(ctx: OperatorContext, run: RunObject, work: Awaitable[object]) -> None:
    """Run one reaction; an API or operator error is logged and counted, never ends the stream
    (the next event or the resync retries)."""
    try:
        await work
    except OperatorError as err:
        ctx.metrics.reconcile_errors.labels("sidecar").inc()
        logger.error("%s/%s: %s", run.namespace, run.name, err)
