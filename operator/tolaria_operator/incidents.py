"""TolariaIncident bookkeeping: when an emergency escalates, its name, which runs it reaches,
and its status from Raised to Resolved (R10.4).

Called by `escalation.py`, which does the I/O (create, signal, patch) around these pure
functions. An incident is cluster-scoped and has no owner, so it outlives its runs; one
source emergency makes one incident, an escalation of it updates that incident, and an
emergency the operator itself fanned out (it carries `incident_id`) is never escalated again
(no echo loops between runs of one group). Nothing here reads the clock or the API.

Tenant boundary: a run's author chooses its `spec.escalation.scope`, but only the operator's
settings (`escalation.max_scope`, `escalation.cluster_scope_namespaces`) decide how far that
scope may reach. `bounded` narrows every incident to its source's reach before a single run
is selected, so by default no run ever freezes (and then halts) a run of another namespace.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from leyline import (
    AnomalyKind,
    EmergencyAction,
    EmergencyLevel,
    EmergencySignal,
    Participant,
    RunPhase,
)
from leyline.spec import EmergencySpec, EscalationSpec
from leyline.spec.status import (
    IncidentRef,
    IncidentResolution,
    ReachedRun,
    RunRef,
    TimelineEntry,
    TolariaIncidentSpec,
    TolariaIncidentStatus,
)
from leyline.v1.cluster_pb2 import IncidentAck, IncidentPhase, IncidentScope
from tolaria_operator.clock import format_time
from tolaria_operator.config import EscalationSettings
from tolaria_operator.resources import (
    ATTEMPT_LABEL,
    INCIDENT_KIND,
    MANAGED_BY_LABEL,
    MANAGER,
    RUN_API_VERSION,
    RUN_LABEL,
    RUN_NAMESPACE_LABEL,
    RunObject,
    spell,
)

GENERATION_LABEL = "tolaria.dev/generation"
LEVEL_PREFIX = "EMERGENCY_LEVEL_"
TIMELINE_LIMIT = 256
INCIDENT_SUFFIX_DEADLINE = "deadline"
OPERATOR = "tolaria-operator"


@dataclass(frozen=True)
class RunSummary:
    """A run as scope selection needs it."""

    namespace: str
    name: str
    labels: Mapping[str, str]
    node: str
    phase: str
    has_pod: bool

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


FINAL_PHASE_NAMES = frozenset(
    RunPhase.Name(p) for p in (RunPhase.Succeeded, RunPhase.Failed, RunPhase.Halted)
)


def summarize(run: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> RunSummary:
    """A run body plus the pods of its namespace (its current pod gives the node)."""
    meta = run.get("metadata") or {}
    status = run.get("status") or {}
    current = status.get("podName") or ""
    node = ""
    for pod in pods:
        if (pod.get("metadata") or {}).get("name") == current and current:
            node = str((pod.get("spec") or {}).get("nodeName") or "")
    return RunSummary(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        labels={str(k): str(v) for k, v in (meta.get("labels") or {}).items()},
        node=node,
        phase=str(status.get("phase") or ""),
        has_pod=bool(current),
    )


def _uid_part(uid: str) -> str:
    return (uid.replace("-", "")[:8] or "x").lower()


def incident_name(run: str, uid: str, attempt: int, generation: int) -> str:
    """One name per source emergency: `<run>-<uid8>-a<attempt>-g<generation>`; deterministic,
    so a replayed or retried escalation finds its incident instead of making a second one."""
    return f"{run}-{_uid_part(uid)}-a{attempt}-g{generation}"


def deadline_incident_name(run: str, uid: str, attempt: int) -> str:
    """The incident of a missed full-rollback deadline in one attempt."""
    return f"{run}-{_uid_part(uid)}-a{attempt}-{INCIDENT_SUFFIX_DEADLINE}"


def is_echo(signal: EmergencySignal) -> bool:
    """An emergency the operator delivered itself (fan-out), or a cluster incident."""
    return (
        bool(signal.incident_id)
        or signal.source == Participant.PARTICIPANT_OPERATOR
        or signal.kind == AnomalyKind.ANOMALY_KIND_CLUSTER_INCIDENT
    )


def should_escalate(signal: EmergencySignal, escalation: EscalationSpec) -> bool:
    """At or above `spec.escalation.threshold`, and not an echo of an incident."""
    return signal.level >= escalation.threshold and not is_echo(signal)


def reach(namespace: str, policy: EscalationSettings) -> int:
    """The widest scope an incident raised in `namespace` may have: `cluster` for a namespace
    the administrator granted it, else the operator's `max_scope`."""
    if namespace in policy.cluster_scope_namespaces:
        return IncidentScope.cluster
    return int(IncidentScope.Value(policy.max_scope))


def bounded(spec: TolariaIncidentSpec, policy: EscalationSettings) -> TolariaIncidentSpec:
    """`spec` narrowed to what its source's namespace may reach under `policy`.

    Scopes widen in their proto order (run, node, group, namespace, cluster) once every scope
    below `cluster` is confined to the source's namespace; a requested scope past the reach
    becomes the reach, and `requestedScope` keeps what was asked. Idempotent, and it always
    starts from the requested scope, so the policy in force decides, never an earlier one (or
    a hand-edited incident).
    """
    requested = spec.requested_scope or spec.scope
    cap = reach(spec.source_run.namespace, policy)
    scope = min(requested, cap)
    across = cap == IncidentScope.cluster and scope in (
        IncidentScope.node,
        IncidentScope.group,
        IncidentScope.cluster,
    )
    return spec.model_copy(
        update={
            "scope": scope,
            "requested_scope": requested if scope != requested else None,
            "cross_namespace": across,
        }
    )


def narrowing(spec: TolariaIncidentSpec) -> str:
    """Why the incident reaches less than its source asked for; empty when it does not."""
    if not spec.requested_scope:
        return ""
    asked = spell(IncidentScope, spec.requested_scope)
    return (
        f"scope {asked} narrowed to {spell(IncidentScope, spec.scope)}: namespace "
        f"{spec.source_run.namespace} is not granted cluster reach "
        "(operator settings escalation.max_scope, escalation.cluster_scope_namespaces)"
    )


def incident_spec(
    source: RunObject,
    level: int,
    kind: int | None,
    reason: str,
    node: str,
    policy: EscalationSettings,
) -> TolariaIncidentSpec:
    """The incident's spec from the source run's `spec.escalation` and its labels, bounded by
    the operator's escalation `policy`."""
    esc = source.run.spec.escalation
    group_value = source.labels.get(esc.group_label, "") if esc.group_label else ""
    grouped = esc.scope == IncidentScope.group
    spec = TolariaIncidentSpec.model_validate(
        {
            "level": spell(EmergencyLevel, level, LEVEL_PREFIX),
            "kind": spell(AnomalyKind, kind) if kind else None,
            "source_run": RunRef(namespace=source.namespace, name=source.name),
            "scope": spell(IncidentScope, esc.scope),
            "group_label": esc.group_label if grouped else "",
            "group_value": group_value if grouped else "",
            "node": node,
            "reason": reason[:4096],
        }
    )
    return bounded(spec, policy)


def incident_body(
    name: str, spec: TolariaIncidentSpec, source: RunObject, attempt: int, generation: int
) -> dict[str, Any]:
    """The TolariaIncident to create (its status is patched separately: a status subresource
    ignores `status` on create)."""
    return {
        "apiVersion": RUN_API_VERSION,
        "kind": INCIDENT_KIND,
        "metadata": {
            "name": name,
            "labels": {
                MANAGED_BY_LABEL: MANAGER,
                RUN_LABEL: source.name,
                RUN_NAMESPACE_LABEL: source.namespace,
                ATTEMPT_LABEL: str(attempt),
                GENERATION_LABEL: str(generation),
            },
        },
        "spec": spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }


def select_targets(spec: TolariaIncidentSpec, runs: Sequence[RunSummary]) -> list[RunSummary]:
    """Every run the incident reaches: the source first, then the runs in scope that are not
    in a final phase, ordered by namespace and name.

    run: the source; node: runs with a pod on the source's node; group: runs whose
    `groupLabel` has the source's value; namespace: the source's namespace; cluster: all.
    Unless `crossNamespace` says the policy allowed more, only runs of the source's namespace.
    """
    src = (spec.source_run.namespace, spec.source_run.name)
    source = [r for r in runs if r.key == src]

    def in_scope(r: RunSummary) -> bool:
        if r.key == src or r.phase in FINAL_PHASE_NAMES:
            return False
        if r.namespace != spec.source_run.namespace and not spec.cross_namespace:
            return False
        if spec.scope == IncidentScope.node:
            return bool(spec.node) and r.node == spec.node
        if spec.scope == IncidentScope.group:
            return bool(spec.group_value) and r.labels.get(spec.group_label) == spec.group_value
        if spec.scope == IncidentScope.namespace:
            return r.namespace == spec.source_run.namespace
        return spec.scope == IncidentScope.cluster

    others = sorted((r for r in runs if in_scope(r)), key=lambda r: r.key)
    return source + others


@dataclass(frozen=True)
class SignalOutcome:
    """How one run answered the signal."""

    ack: int
    latency_ms: float
    message: str


def reached_entry(target: RunSummary, outcome: SignalOutcome) -> ReachedRun:
    return ReachedRun.model_validate(
        {
            "namespace": target.namespace,
            "name": target.name,
            "ack": spell(IncidentAck, outcome.ack),
            "latency_ms": round(outcome.latency_ms, 3),
            "message": outcome.message[:1024],
        }
    )


def level_name(level: int) -> str:
    return spell(EmergencyLevel, level, LEVEL_PREFIX).upper()


def _append(status: TolariaIncidentStatus, entries: Sequence[TimelineEntry]) -> list[TimelineEntry]:
    timeline = [*status.timeline, *entries]
    if len(timeline) > TIMELINE_LIMIT:  # keep how it began and the latest
        timeline = [timeline[0], *timeline[-(TIMELINE_LIMIT - 1) :]]
    return timeline


def opened(spec: TolariaIncidentSpec, now: str, generation: int) -> TolariaIncidentStatus:
    src = f"{spec.source_run.namespace}/{spec.source_run.name}"
    narrowed = f" ({narrowing(spec)})" if spec.requested_scope else ""
    text = f"{level_name(spec.level)} from {src} (generation {generation}){narrowed}: {spec.reason}"
    raised = TimelineEntry(time=now, event="Raised", message=text[:4096])
    return TolariaIncidentStatus.model_validate(
        {
            "phase": spell(IncidentPhase, IncidentPhase.Open),
            "timeline": [raised],
            "observed_generation": 1,
        }
    )


def escalated(
    status: TolariaIncidentStatus, level: int, reason: str, now: str
) -> TolariaIncidentStatus:
    entry = TimelineEntry(time=now, event="Escalated", message=f"to {level_name(level)}: {reason}")
    return status.model_copy(update={"timeline": _append(status, [entry])})


def record_signals(
    status: TolariaIncidentStatus, entries: Sequence[ReachedRun], now: str, per_run_limit: int
) -> TolariaIncidentStatus:
    """The runs' answers merged into `status.runs` (by run) and summarised in the timeline."""
    by_key = {(r.namespace, r.name): r for r in status.runs}
    for entry in entries:
        by_key[(entry.namespace, entry.name)] = entry
    signalled = [e for e in entries if e.ack != IncidentAck.Awaiting]
    lines = [TimelineEntry(time=now, event="Signalled", message=f"{len(signalled)} run(s)")]
    if len(signalled) <= per_run_limit:
        lines += [
            TimelineEntry(
                time=now,
                event=IncidentAck.Name(e.ack),  # type: ignore[arg-type]
                message=f"{e.namespace}/{e.name}"
                + (f" in {e.latency_ms:.1f} ms" if e.ack == IncidentAck.Acknowledged else "")
                + (f": {e.message}" if e.message else ""),
            )
            for e in signalled
        ]
    else:
        for ack in (IncidentAck.Acknowledged, IncidentAck.NoAck, IncidentAck.Unreachable):
            count = sum(1 for e in signalled if e.ack == ack)
            if count:
                lines.append(
                    TimelineEntry(time=now, event=IncidentAck.Name(ack), message=f"{count} run(s)")
                )
    return status.model_copy(
        update={"runs": list(by_key.values()), "timeline": _append(status, lines)}
    )


def source_acknowledged(
    status: TolariaIncidentStatus, source: tuple[str, str], latency_ms: float, now: str
) -> TolariaIncidentStatus:
    """The source run's trainer acknowledged its own emergency."""
    runs = [
        r.model_copy(update={"ack": IncidentAck.Acknowledged, "latency_ms": round(latency_ms, 3)})
        if (r.namespace, r.name) == source and r.ack == IncidentAck.Awaiting
        else r
        for r in status.runs
    ]
    if runs == status.runs:
        return status
    entry = TimelineEntry(
        time=now,
        event=IncidentAck.Name(IncidentAck.Acknowledged),
        message=f"{source[0]}/{source[1]} (source) in {latency_ms:.1f} ms",
    )
    return status.model_copy(update={"runs": runs, "timeline": _append(status, [entry])})


def resolved(
    status: TolariaIncidentStatus, by: str, reason: str, now: str
) -> TolariaIncidentStatus:
    entry = TimelineEntry(
        time=now,
        event=IncidentPhase.Name(IncidentPhase.Resolved),
        message=f"by {by}: {reason}"[:4096],
    )
    return status.model_copy(
        update={
            "phase": IncidentPhase.Resolved,
            "resolution": IncidentResolution(time=now, by=by, reason=reason[:4096]),
            "timeline": _append(status, [entry]),
        }
    )


def delivered(status: TolariaIncidentStatus, source: tuple[str, str]) -> list[ReachedRun]:
    """Runs besides the source that got the signal (acknowledged or not): the ones to resolve."""
    return [
        r
        for r in status.runs
        if (r.namespace, r.name) != source
        and r.ack in (IncidentAck.Acknowledged, IncidentAck.NoAck)
    ]


def run_ref(name: str, level: int, role: str) -> IncidentRef:
    return IncidentRef.model_validate(
        {"name": name, "level": spell(EmergencyLevel, level, LEVEL_PREFIX), "role": role}
    )


def signal_for(
    incident: str, spec: TolariaIncidentSpec, target: RunSummary, now: str
) -> EmergencySignal:
    """The EmergencySignal the operator sends a reached run's sidecar."""
    signal = EmergencySignal(
        version=1,
        level=spec.level,  # type: ignore[arg-type]
        reason=f"incident {incident} from {spec.source_run.namespace}/{spec.source_run.name}: "
        f"{spec.reason}"[:1024],
        origin=OPERATOR,
        run_id=target.name,
        kind=AnomalyKind.ANOMALY_KIND_CLUSTER_INCIDENT,
        action=(
            EmergencyAction.EMERGENCY_ACTION_FREEZE
            if spec.level == EmergencyLevel.EMERGENCY_LEVEL_CRITICAL
            else EmergencyAction.EMERGENCY_ACTION_LOG
        ),
        incident_id=incident,
        source=Participant.PARTICIPANT_OPERATOR,
    )
    signal.triggered_at.FromJsonString(now)
    return signal


def budget_seconds(level: int, emergency: EmergencySpec) -> float:
    """The response budget of `level` in the target run's `spec.emergency` (R7.1)."""
    budgets: dict[int, float] = {
        EmergencyLevel.EMERGENCY_LEVEL_MINOR: emergency.minor_ms,
        EmergencyLevel.EMERGENCY_LEVEL_MAJOR: emergency.major_ms,
        EmergencyLevel.EMERGENCY_LEVEL_SEVERE: emergency.severe_ms,
        EmergencyLevel.EMERGENCY_LEVEL_CRITICAL: emergency.critical_ms,
    }
    return budgets.get(level, emergency.critical_ms) / 1000.0


def incident_status_wire(status: TolariaIncidentStatus) -> dict[str, Any]:
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)


def parse_incident_status(raw: Mapping[str, Any] | None) -> TolariaIncidentStatus:
    return TolariaIncidentStatus.model_validate(dict(raw or {}), strict=False)


def now_text(moment: Any) -> str:
    return format_time(moment)
