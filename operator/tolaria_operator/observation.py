"""What the operator reads from one pod of a run: `PodView`, and the classification of a lost
pod (`Loss`) into counted failures and disruptions that are not counted (R10.2).

Called by `status.plan_run` on every reconcile; pure. It reads container statuses, never the
pod's Ready condition (a sidecar or a finished trainer must not wedge the run, kuberay#4945),
and it reads the trainer's outcome from its termination message, the exit-code contract
with `tolaria_trainer.worker --pod`: `{"phase", "exitCode", "reason"}` and exit 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from leyline import RunPhase
from leyline.termination import TerminationMessage
from tolaria_operator.clock import parse_time
from tolaria_operator.resources import (
    COUNTED_BEFORE_ANNOTATION,
    CREATED_AT_ANNOTATION,
    KUEUE_ADMISSION_GATE,
    RESTARTS_BEFORE_ANNOTATION,
    SIDECAR,
    TRAINER,
)

DISRUPTION_REASONS = frozenset(
    {
        "PreemptionByScheduler",
        "DeletionByTaintManager",
        "EvictionByEvictionAPI",
        "TerminationByKubelet",
        "Evicted",
        "Preempted",
        "Shutdown",
        "NodeShutdown",
        "Terminated",
        "StoppedByKueue",
        "EvictedByKueue",
    }
)
"""Why a pod may go without it being the run's fault: preemption, API eviction (drain),
taint-based eviction, graceful node shutdown, node-pressure eviction, Kueue taking the quota
back. These start a new attempt without counting against `spec.restarts.limit` (volcano#2560,
jobset#262)."""

DISRUPTION_CONDITIONS = frozenset({"DisruptionTarget", "TerminationTarget"})
"""Pod conditions that announce the pod is going for reasons outside the run: Kubernetes'
`DisruptionTarget`, and `TerminationTarget`, which Kueue's pod integration sets (reason
`StoppedByKueue`) before it deletes a pod it preempts, evicts or deactivates."""

START_FAILURE_REASONS = frozenset(
    {
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
"""Waiting reasons of a container that cannot start; shown in status and Degraded."""

FINAL_PHASES = {
    RunPhase.Name(p): p for p in (RunPhase.Succeeded, RunPhase.Failed, RunPhase.Halted)
} | {RunPhase.Name(p): p for p in (RunPhase.Suspended, RunPhase.Stopped)}
"""Phases a trainer's termination message may carry. `Stopped` (SIGTERM: the pod was deleted,
evicted or preempted) ends the attempt, not the run; it exits 0, so it must not read as
success."""


@dataclass(frozen=True)
class Terminated:
    """A container's `terminated` state."""

    exit_code: int
    reason: str
    message: str
    finished_at: str


@dataclass(frozen=True)
class Outcome:
    """The trainer's final word (termination message, or exit 0 without one)."""

    phase: int
    exit_code: int
    reason: str


@dataclass(frozen=True)
class PodView:
    """One pod of a run, reduced to what the status needs."""

    name: str
    phase: str
    node: str
    deleting: bool
    created_at: datetime | None
    restarts_before: int
    counted_before: int
    trainer_restarts: int
    trainer_started: bool
    trainer_running: bool
    trainer_waiting: str
    trainer_waiting_message: str
    trainer_terminated: Terminated | None
    trainer_last_terminated: Terminated | None
    outcome: Outcome | None
    sidecar_running: bool
    disruption: str
    unschedulable: str
    gated: str
    """Why the pod may not be scheduled yet (its scheduling gates, e.g. Kueue's admission
    gate); "" once it may. A gated pod waits in a queue: it has not failed to start."""
    reason: str
    message: str


def _terminated(state: Mapping[str, Any] | None) -> Terminated | None:
    term = (state or {}).get("terminated")
    if not term:
        return None
    return Terminated(
        exit_code=int(term.get("exitCode", 0)),
        reason=str(term.get("reason", "")),
        message=str(term.get("message", "")),
        finished_at=str(term.get("finishedAt", "")),
    )


def parse_outcome(term: Terminated) -> Outcome | None:
    """The trainer's outcome from its termination message; exit 0 without a message means
    success (an older trainer without `--pod`). None: a crash, which the kubelet restarts."""
    message = TerminationMessage.decode(term.message)
    if message is not None and message.phase in FINAL_PHASES.values():
        return Outcome(phase=message.phase, exit_code=message.exit_code, reason=message.reason)
    if term.exit_code == 0:
        return Outcome(phase=RunPhase.Succeeded, exit_code=0, reason=term.reason or "Completed")
    return None


def _int_annotation(annotations: Mapping[str, Any], key: str) -> int:
    try:
        return max(0, int(str(annotations.get(key, "0"))))
    except ValueError:
        return 0


def _container(statuses: list[Mapping[str, Any]], name: str) -> Mapping[str, Any]:
    return next((s for s in statuses if s.get("name") == name), {})


def _gates(spec: Mapping[str, Any]) -> str:
    """The pod's scheduling gates in words, naming Kueue's admission gate as such."""
    names = [str(g.get("name", "")) for g in spec.get("schedulingGates") or []]
    if not names:
        return ""
    if KUEUE_ADMISSION_GATE in names:
        return f"waiting for Kueue admission (scheduling gates: {', '.join(names)})"
    return f"scheduling gates: {', '.join(names)}"


def view_pod(body: Mapping[str, Any]) -> PodView:
    """Reduce a pod body (from the API or a DELETED watch event) to a `PodView`."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    annotations = meta.get("annotations") or {}
    statuses = list(status.get("containerStatuses") or [])
    init_statuses = list(status.get("initContainerStatuses") or [])
    trainer = _container(statuses, TRAINER)
    sidecar = _container(init_statuses, SIDECAR) or _container(statuses, SIDECAR)
    state = trainer.get("state") or {}
    last = _terminated(trainer.get("lastState"))
    current = _terminated(state)
    restarts = int(trainer.get("restartCount") or 0)
    waiting = state.get("waiting") or {}
    disruption = ""
    unschedulable = ""
    gated = _gates(spec)
    for cond in status.get("conditions") or []:
        kind = cond.get("type")
        if kind in DISRUPTION_CONDITIONS and cond.get("status") == "True":
            disruption = str(cond.get("reason") or kind)
        if kind == "PodScheduled" and cond.get("status") == "False":
            if cond.get("reason") == "Unschedulable":
                unschedulable = str(cond.get("message") or "Unschedulable")
            elif cond.get("reason") == "SchedulingGated" and not gated:
                gated = str(cond.get("message") or "SchedulingGated")
    pod_reason = str(status.get("reason") or "")
    if not disruption and pod_reason in DISRUPTION_REASONS:
        disruption = pod_reason
    created = parse_time(str(annotations.get(CREATED_AT_ANNOTATION, ""))) or parse_time(
        str(meta.get("creationTimestamp", ""))
    )
    return PodView(
        name=str(meta.get("name", "")),
        phase=str(status.get("phase") or "Pending"),
        node=str(spec.get("nodeName") or ""),
        deleting=bool(meta.get("deletionTimestamp")),
        created_at=created,
        restarts_before=_int_annotation(annotations, RESTARTS_BEFORE_ANNOTATION),
        counted_before=_int_annotation(annotations, COUNTED_BEFORE_ANNOTATION),
        trainer_restarts=restarts,
        trainer_started=bool(
            "running" in state or current is not None or last is not None or restarts > 0
        ),
        trainer_running="running" in state,
        trainer_waiting=str(waiting.get("reason") or ""),
        trainer_waiting_message=str(waiting.get("message") or ""),
        trainer_terminated=current,
        trainer_last_terminated=last,
        outcome=parse_outcome(current) if current is not None else None,
        sidecar_running="running" in (sidecar.get("state") or {}),
        disruption=disruption,
        unschedulable=unschedulable,
        gated=gated,
        reason=pod_reason,
        message=str(status.get("message") or ""),
    )


@dataclass(frozen=True)
class Loss:
    """Why an attempt's pod is gone or dead, and whether it counts (R10.2)."""

    reason: str
    counted: bool
    message: str


def classify_loss(pod: PodView | None) -> Loss:
    """Preemption, eviction, drain and node shutdown are disruptions (not counted); a pod that
    failed, was deleted by someone, or vanished while nobody watched is a loss (counted)."""
    if pod is None:
        return Loss("PodLost", True, "the attempt's pod disappeared while the operator was away")
    where = f" on node {pod.node}" if pod.node else ""
    if pod.disruption:
        detail = pod.message or pod.disruption
        return Loss(pod.disruption, False, f"pod {pod.name} disrupted{where}: {detail}")
    if pod.phase == "Failed":
        reason = pod.reason or "PodFailed"
        detail = pod.message or "the pod failed"
        return Loss(reason, True, f"pod {pod.name} failed{where}: {detail}")
    return Loss("PodDeleted", True, f"pod {pod.name} was deleted{where}")
