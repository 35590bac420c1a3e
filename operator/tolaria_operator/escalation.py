"""Cluster-wide escalation (R10.4): raise a TolariaIncident, signal every run in its scope
through its sidecar, record who acknowledged, resolve it when its source resolves.

Called by the sidecar follower (a live emergency at or above the run's threshold, the
source's ack, its resolution), by the reconciler (a missed full-rollback deadline) and by the
delete handler. The decisions are `incidents.py`'s; this module does the I/O around them.
Fan-out is concurrent and bounded, each signal bounded by the target's response budget, so
one dead sidecar never delays the others. Never signals a run twice for one level, never
escalates an emergency the operator delivered itself, never raises for an unreachable run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from pydantic import ValidationError

from leyline import AnomalyKind, EmergencyLevel, EmergencyResolution, EmergencySignal
from leyline.spec import EmergencySpec
from leyline.spec.status import (
    IncidentRef,
    ReachedRun,
    TolariaIncidentSpec,
    TolariaIncidentStatus,
    TolariaRunStatus,
)
from leyline.v1.cluster_pb2 import IncidentAck, IncidentPhase, IncidentScope
from tolaria_operator import incidents
from tolaria_operator.clock import format_time
from tolaria_operator.context import OperatorContext
from tolaria_operator.errors import (
    AckTimeout,
    KubeApiError,
    ObjectExists,
    SidecarCallFailed,
    SidecarUnavailable,
)
from tolaria_operator.incidents import RunSummary, SignalOutcome
from tolaria_operator.resources import (
    ATTEMPT_LABEL,
    INCIDENTS,
    MANAGED_BY_LABEL,
    MANAGER,
    PODS,
    RUNS,
    RunObject,
    parse_run,
)

logger = logging.getLogger(__name__)

OPERATOR = incidents.OPERATOR


def _now(ctx: OperatorContext) -> str:
    return format_time(ctx.clock.now())


async def _fresh(ctx: OperatorContext, run: RunObject) -> RunObject | None:
    body = await ctx.kube.get(RUNS, run.namespace, run.name)
    return parse_run(body) if body is not None else None


async def _node_of(ctx: OperatorContext, run: RunObject) -> str:
    if not run.status.pod_name:
        return ""
    pod = await ctx.kube.get(PODS, run.namespace, run.status.pod_name)
    return str(((pod or {}).get("spec") or {}).get("nodeName") or "")


async def on_emergency(
    ctx: OperatorContext, run: RunObject, attempt: int, signal: EmergencySignal
) -> None:
    """A live emergency from `run`'s sidecar: escalate when it is at or above the run's
    threshold (a new incident, or the open one raised to a higher level)."""
    fresh = await _fresh(ctx, run)
    if fresh is None or not incidents.should_escalate(signal, fresh.run.spec.escalation):
        return
    ref = fresh.status.incident
    if ref is not None and ref.role == "source" and ref.name:
        body = await ctx.kube.get(INCIDENTS, None, ref.name)
        status = incidents.parse_incident_status((body or {}).get("status"))
        if body is not None and status.phase == IncidentPhase.Open:
            if signal.level > (ref.level or 0):
                await _escalate_open(ctx, fresh, ref.name, body, signal)
            return
    name = incidents.incident_name(fresh.name, fresh.uid, attempt, signal.generation)
    spec = incidents.incident_spec(
        fresh,
        signal.level,
        signal.kind or None,
        signal.reason,
        await _node_of(ctx, fresh),
        ctx.settings.escalation,
    )
    await raise_incident(ctx, fresh, name, spec, attempt=attempt, generation=signal.generation)


async def raise_incident(
    ctx: OperatorContext,
    source: RunObject,
    name: str,
    spec: TolariaIncidentSpec,
    *,
    attempt: int,
    generation: int,
    include_source: bool = True,
) -> IncidentRef:
    """Create (or find) incident `name`, mark the source, signal every run in scope, record
    the answers and post Events. Idempotent: a run already answered is not signalled again.
    The operator's escalation policy bounds `spec` here, whoever built it."""
    spec = incidents.bounded(spec, ctx.settings.escalation)
    level_name = incidents.level_name(spec.level).lower()
    body = incidents.incident_body(name, spec, source, attempt, generation)
    try:
        await ctx.kube.create(INCIDENTS, None, body)
        status = incidents.opened(spec, _now(ctx), generation)
        logger.critical(
            "incident %s raised: %s from %s/%s, scope %s: %s",
            name,
            level_name,
            source.namespace,
            source.name,
            IncidentScope.Name(spec.scope),  # type: ignore[arg-type]
            spec.reason,
        )
    except ObjectExists:
        existing = await ctx.kube.get(INCIDENTS, None, name)
        status = incidents.parse_incident_status((existing or {}).get("status"))
        if status.phase == IncidentPhase.Resolved:
            return incidents.run_ref(name, spec.level, "source")
        if status.phase is None:
            status = incidents.opened(spec, _now(ctx), generation)
    await _patch_incident(ctx, name, status)
    ctx.metrics.incident_opened(name, level_name)
    ref = incidents.run_ref(name, spec.level, "source")
    await _set_run_incident(ctx, source.namespace, source.name, ref)
    ctx.events.post(
        source.reference(),
        "Warning",
        "IncidentRaised",
        f"{level_name} incident {name} ({IncidentScope.Name(spec.scope)}): {spec.reason}",  # type: ignore[arg-type]
    )
    if spec.requested_scope:
        ctx.events.post(
            source.reference(), "Warning", "EscalationNarrowed", incidents.narrowing(spec)
        )
    answered = {(r.namespace, r.name) for r in status.runs if r.ack != IncidentAck.Awaiting}
    targets = [t for t in await _targets(ctx, spec) if t.key not in answered]
    entries: list[ReachedRun] = []
    if include_source and (source.namespace, source.name) not in answered:
        src = [t for t in targets if t.key == (source.namespace, source.name)]
        if src:
            entries.append(
                incidents.reached_entry(src[0], SignalOutcome(IncidentAck.Awaiting, 0.0, "source"))
            )
    others = [t for t in targets if t.key != (source.namespace, source.name)]
    entries += await fan_out(ctx, name, spec, others)
    status = incidents.record_signals(
        status, entries, _now(ctx), ctx.settings.escalation.per_run_timeline_limit
    )
    await _patch_incident(ctx, name, status)
    reached = incidents.run_ref(name, spec.level, "reached")
    for entry in entries:
        if (entry.namespace, entry.name) == source.key:
            continue
        ctx.metrics.signals.labels(IncidentAck.Name(entry.ack)).inc()  # type: ignore[arg-type]
        ref_body = _reference(entry.namespace, entry.name)
        if entry.ack in (IncidentAck.Acknowledged, IncidentAck.NoAck):
            await _set_run_incident(ctx, entry.namespace, entry.name, reached)
            ctx.events.post(
                ref_body,
                "Warning",
                "IncidentReached",
                f"{level_name} incident {name} from {source.namespace}/{source.name}: "
                f"{IncidentAck.Name(entry.ack)}",  # type: ignore[arg-type]
            )
        else:
            logger.error(
                "incident %s: %s/%s unreachable: %s",
                name,
                entry.namespace,
                entry.name,
                entry.message,
            )
    return ref


def _reference(namespace: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{RUNS.group}/{RUNS.version}",
        "kind": "TolariaRun",
        "metadata": {"name": name, "namespace": namespace},
    }


async def _escalate_open(
    ctx: OperatorContext, run: RunObject, name: str, body: dict[str, Any], signal: EmergencySignal
) -> None:
    """The source emergency escalated: raise the incident's level and signal the runs again."""
    spec = TolariaIncidentSpec.model_validate(body.get("spec") or {}, strict=False)
    spec = spec.model_copy(
        update={"level": signal.level, "reason": signal.reason[:4096] or spec.reason}
    )
    await ctx.kube.patch(
        INCIDENTS,
        None,
        name,
        {"spec": spec.model_dump(mode="json", by_alias=True, exclude_none=True)},
    )
    status = incidents.parse_incident_status(body.get("status"))
    status = incidents.escalated(status, signal.level, signal.reason, _now(ctx))
    status = status.model_copy(
        update={"runs": [r for r in status.runs if (r.namespace, r.name) == run.key]}
    )
    await _patch_incident(ctx, name, status)
    logger.critical("incident %s escalated to %s", name, incidents.level_name(signal.level))
    await raise_incident(
        ctx, run, name, spec, attempt=run.status.attempt, generation=signal.generation
    )


async def _targets(ctx: OperatorContext, spec: TolariaIncidentSpec) -> list[RunSummary]:
    """The runs in the incident's scope (listing only what the scope needs: the source's
    namespace alone unless the policy lets it reach across namespaces)."""
    spec = incidents.bounded(spec, ctx.settings.escalation)
    src = spec.source_run
    scope = spec.scope
    namespaces: list[str | None]
    if scope in (IncidentScope.run, IncidentScope.namespace) or not spec.cross_namespace:
        namespaces = [src.namespace]
    else:
        watched = ctx.settings.escalation.watch_namespaces
        namespaces = list(watched) if watched else [None]
    runs: list[dict[str, Any]] = []
    pods: list[dict[str, Any]] = []
    for ns in namespaces:
        if scope == IncidentScope.run:
            body = await ctx.kube.get(RUNS, src.namespace, src.name)
            runs += [body] if body else []
            continue
        labels = {spec.group_label: spec.group_value} if scope == IncidentScope.group else None
        if scope == IncidentScope.group and not spec.group_value:
            labels = None
        runs += await ctx.kube.list(RUNS, ns, labels)
        if scope == IncidentScope.node:
            pods += await ctx.kube.list(PODS, ns, {MANAGED_BY_LABEL: MANAGER})
    summaries = [incidents.summarize(r, pods) for r in runs]
    if scope == IncidentScope.group and not spec.group_value:
        summaries = [s for s in summaries if s.key == (src.namespace, src.name)]
    return incidents.select_targets(spec, summaries)


async def fan_out(
    ctx: OperatorContext, name: str, spec: TolariaIncidentSpec, targets: list[RunSummary]
) -> list[ReachedRun]:
    """Signal every target concurrently (at most `fanout_concurrency` at once)."""
    gate = asyncio.Semaphore(ctx.settings.escalation.fanout_concurrency)

    async def one(target: RunSummary) -> ReachedRun:
        async with gate:
            outcome = await signal_run(ctx, name, spec, target)
        return incidents.reached_entry(target, outcome)

    return list(await asyncio.gather(*(one(t) for t in targets)))


async def _budget(ctx: OperatorContext, target: RunSummary, level: int) -> float:
    body = await ctx.kube.get(RUNS, target.namespace, target.name)
    raw = ((body or {}).get("spec") or {}).get("emergency") or {}
    try:
        emergency = EmergencySpec.model_validate(raw, strict=False)
    except ValidationError:
        emergency = EmergencySpec()
    return incidents.budget_seconds(level, emergency)


async def signal_run(
    ctx: OperatorContext, name: str, spec: TolariaIncidentSpec, target: RunSummary
) -> SignalOutcome:
    """Signal one run: Acknowledged (with the round-trip latency), NoAck (no acknowledgement
    within its budget) or Unreachable (no pod, no token, refused, or no answer to connect)."""
    if not target.has_pod:
        return SignalOutcome(IncidentAck.Unreachable, 0.0, f"no pod (phase {target.phase or '?'})")
    try:
        budget = await _budget(ctx, target, spec.level)
        client = await ctx.sidecars.open(target.namespace, target.name)
    except (SidecarUnavailable, KubeApiError) as err:
        return SignalOutcome(IncidentAck.Unreachable, 0.0, str(err))
    async with client:
        try:
            await client.get_status()
        except SidecarUnavailable as err:
            return SignalOutcome(IncidentAck.Unreachable, 0.0, err.detail)
        except SidecarCallFailed as err:
            return SignalOutcome(IncidentAck.Unreachable, 0.0, str(err))
        signal = incidents.signal_for(name, spec, target, _now(ctx))
        started = time.perf_counter_ns()
        try:
            await client.signal_emergency(signal, budget)
        except AckTimeout as err:
            return SignalOutcome(
                IncidentAck.NoAck, (time.perf_counter_ns() - started) / 1e6, err.detail
            )
        except SidecarUnavailable as err:
            return SignalOutcome(IncidentAck.Unreachable, 0.0, err.detail)
        except SidecarCallFailed as err:
            return SignalOutcome(IncidentAck.NoAck, 0.0, f"{err.code}: {err.detail}")
    latency = (time.perf_counter_ns() - started) / 1e6
    return SignalOutcome(IncidentAck.Acknowledged, latency, "")


async def _patch_incident(ctx: OperatorContext, name: str, status: TolariaIncidentStatus) -> None:
    await ctx.kube.patch(
        INCIDENTS,
        None,
        name,
        {"status": incidents.incident_status_wire(status)},
        subresource="status",
    )
    if status.phase == IncidentPhase.Open:  # the answers alerts wait on (R10.4)
        acks = [IncidentAck.Name(r.ack) for r in status.runs]  # type: ignore[arg-type]
        ctx.metrics.incident_answers(name, acks)


async def _set_run_incident(
    ctx: OperatorContext, namespace: str, name: str, ref: IncidentRef | None, *, only: str = ""
) -> None:
    """Set (or clear, with None) `status.incident` of a run; with `only`, clear it only when it
    still names that incident."""
    if only:
        body = await ctx.kube.get(RUNS, namespace, name)
        current = ((body or {}).get("status") or {}).get("incident") or {}
        if current.get("name") != only:
            return
    wire = ref.model_dump(mode="json", by_alias=True, exclude_none=True) if ref else None
    await ctx.kube.patch(
        RUNS, namespace, name, {"status": {"incident": wire}}, subresource="status"
    )


async def on_source_ack(ctx: OperatorContext, run: RunObject, latency_ms: float) -> None:
    """The source run's trainer acknowledged its emergency: record it in the open incident."""
    fresh = await _fresh(ctx, run)
    ref = fresh.status.incident if fresh else None
    if fresh is None or ref is None or ref.role != "source" or not ref.name:
        return
    body = await ctx.kube.get(INCIDENTS, None, ref.name)
    if body is None:
        return
    status = incidents.parse_incident_status(body.get("status"))
    updated = incidents.source_acknowledged(status, fresh.key, latency_ms, _now(ctx))
    if updated is not status:
        await _patch_incident(ctx, ref.name, updated)


async def on_resolution(
    ctx: OperatorContext, run: RunObject, attempt: int, resolution: EmergencyResolution
) -> None:
    """The source's sidecar resolved an emergency: resolve the incident it raised (not an older
    one's resolution replayed)."""
    fresh = await _fresh(ctx, run)
    ref = fresh.status.incident if fresh else None
    if fresh is None or ref is None or ref.role != "source" or not ref.name:
        return
    body = await ctx.kube.get(INCIDENTS, None, ref.name)
    labels = ((body or {}).get("metadata") or {}).get("labels") or {}
    try:
        raised_in = int(labels.get(ATTEMPT_LABEL, "0"))
        generation = int(labels.get(incidents.GENERATION_LABEL, "0"))
    except ValueError:
        raised_in, generation = 0, 0
    if raised_in == attempt and resolution.generation and resolution.generation < generation:
        return
    by = resolution.resolved_by or f"sidecar of {fresh.namespace}/{fresh.name}"
    await resolve_incident(
        ctx, ref.name, by=by, reason=resolution.reason or "resolved at the source"
    )


async def resolve_stale(ctx: OperatorContext, run: RunObject, attempt: int) -> None:
    """A new attempt's sidecar answered: an incident raised by an earlier attempt of this run is
    over (its emergency ended with that pod; a missed deadline was recovered by recreating)."""
    ref = run.status.incident
    if ref is None or ref.role != "source" or not ref.name:
        return
    body = await ctx.kube.get(INCIDENTS, None, ref.name)
    labels = ((body or {}).get("metadata") or {}).get("labels") or {}
    try:
        raised_in = int(labels.get(ATTEMPT_LABEL, "0"))
    except ValueError:
        raised_in = 0
    if body is not None and 0 < raised_in < attempt:
        await resolve_incident(
            ctx,
            ref.name,
            by=OPERATOR,
            reason=f"attempt {raised_in} ended; attempt {attempt} is running",
        )


async def resolve_incident(ctx: OperatorContext, name: str, *, by: str, reason: str) -> None:
    """Resolve incident `name`: `ResolveEmergency` on every run it reached, clear their
    `status.incident`, mark it Resolved. Idempotent."""
    body = await ctx.kube.get(INCIDENTS, None, name)
    if body is None:
        return
    status = incidents.parse_incident_status(body.get("status"))
    spec = TolariaIncidentSpec.model_validate(body.get("spec") or {}, strict=False)
    source = (spec.source_run.namespace, spec.source_run.name)
    if status.phase != IncidentPhase.Resolved:
        for entry in incidents.delivered(status, source):
            await _resolve_on_sidecar(ctx, name, entry, reason)
        status = incidents.resolved(status, by, reason, _now(ctx))
        await _patch_incident(ctx, name, status)
        logger.warning("incident %s resolved by %s: %s", name, by, reason)
    ctx.metrics.incident_closed(name)
    for namespace, run_name in [source, *((r.namespace, r.name) for r in status.runs)]:
        await _set_run_incident(ctx, namespace, run_name, None, only=name)
        ctx.events.post(
            _reference(namespace, run_name), "Normal", "IncidentResolved", f"{name}: {reason}"
        )


async def _resolve_on_sidecar(
    ctx: OperatorContext, name: str, entry: ReachedRun, reason: str
) -> None:
    try:
        client = await ctx.sidecars.open(entry.namespace, entry.name)
    except SidecarUnavailable as err:
        logger.warning(
            "incident %s: cannot resolve on %s/%s: %s", name, entry.namespace, entry.name, err
        )
        return
    async with client:
        try:
            status = await client.get_status()
            active = status.active_emergency
            if active.generation and active.incident_id == name:
                await client.resolve_emergency(
                    EmergencyResolution(
                        version=1,
                        generation=active.generation,
                        resolved_by=OPERATOR,
                        reason=f"incident {name} resolved: {reason}"[:1024],
                        run_id=entry.name,
                        incident_id=name,
                    )
                )
        except (SidecarUnavailable, SidecarCallFailed) as err:
            logger.warning(
                "incident %s: cannot resolve on %s/%s: %s", name, entry.namespace, entry.name, err
            )


async def raise_deadline_incident(
    ctx: OperatorContext, run: RunObject, status: TolariaRunStatus
) -> IncidentRef | None:
    """The CRITICAL incident of a missed full-rollback deadline (R10.3), signalled to the runs in
    the source's scope (not to the source, whose pod is being replaced or stopped). With
    `onDeadlineMiss: fail` it is resolved at once, nothing being left to recover, and None
    is returned (the run's `status.incident` stays clear)."""
    attempt = run.status.attempt
    name = incidents.deadline_incident_name(run.name, run.uid, attempt)
    rollback = status.rollback
    reason = (
        f"full rollback {rollback.id if rollback else '?'} missed its deadline "
        f"{rollback.deadline if rollback else '?'}; {status.reason}: {status.message}"
    )
    spec = incidents.incident_spec(
        run,
        EmergencyLevel.EMERGENCY_LEVEL_CRITICAL,
        AnomalyKind.ANOMALY_KIND_ROLLBACK_DEADLINE_MISSED,
        reason,
        await _node_of(ctx, run),
        ctx.settings.escalation,
    )
    try:
        ref = await raise_incident(
            ctx, run, name, spec, attempt=attempt, generation=0, include_source=False
        )
    except KubeApiError as err:
        logger.error(
            "%s/%s: cannot raise the deadline incident %s: %s", run.namespace, run.name, name, err
        )
        return incidents.run_ref(name, EmergencyLevel.EMERGENCY_LEVEL_CRITICAL, "source")
    if status.completion_time:
        await resolve_incident(ctx, name, by=OPERATOR, reason=f"run failed: {status.message}")
        return None
    return ref
