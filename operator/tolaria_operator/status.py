"""The run's next status and the actions that lead there: `plan_run` (R10.1, R10.2, R10.3).

The reconciler calls `plan_run` with the run as last read, its pods, the pod a watch event
reported deleted, the sidecar view and the time; it executes the returned `Plan` (delete,
then create, then patch) and nothing else. Pure and level-based: the same inputs give the
same plan, so a missed event or an operator restart changes nothing.

The decisions, in the order they are taken:
1. a final phase (Succeeded, Failed, Halted) never changes again;
2. a full rollback past its deadline (read from status) is missed: recreate or fail;
3. `spec.suspend`: checkpoint-then-stop, then Suspended; unsuspended: a new attempt;
4. no attempt yet: attempt 1;
5. the attempt's pod is gone or dead: a new attempt once it is gone (never two pods of one
   run), counted unless a disruption (preemption, eviction, drain, node shutdown);
6. counted restarts past `spec.restarts.limit`: Failed, naming the first failure;
7. the trainer's final word (termination message) ends the run;
8. a pod held by a scheduling gate (Kueue's admission gate) is Queued: no timeout runs;
   once admitted, a pod that never starts past `spec.failurePolicy.podStartTimeoutSeconds`
   (counted from its admission) is Failed;
9. otherwise Pending, Running, RollingBack or Restarting from the trainer's state.

A pod the operator cannot make (`refused`: it could not be built, or the API server refused
it as invalid) fails the run at once with reason `PodSpecInvalid` instead of being created:
`spec.pod` is immutable, so retrying could never succeed, and a retry loop would hide the
reason. A pod the API server turned away for now (`blocked`: a quota, a missing PriorityClass
or ServiceAccount, an admission webhook) is retried, with reason `PodRefused` and the server's
word in the status meanwhile. A spec the model cannot read at all gets `Ready=False`
(`spec_refused`) once per generation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from leyline import RunPhase
from leyline.spec.status import FailureStatus, RollbackStatus, TolariaRunStatus
from leyline.v1.cluster_pb2 import DeadlinePolicy
from tolaria_operator import conditions as cond
from tolaria_operator import deadline
from tolaria_operator.clock import format_time, parse_time
from tolaria_operator.config import TolariaSettings
from tolaria_operator.observation import START_FAILURE_REASONS, Loss, PodView, classify_loss
from tolaria_operator.resources import (
    TRAINER,
    RunObject,
    enum_name,
    parse_status,
    pod_name,
    service_name,
)
from tolaria_operator.view import SidecarView

FINAL = frozenset({RunPhase.Succeeded, RunPhase.Failed, RunPhase.Halted})
ACTIVE_PHASE_NAMES = frozenset(
    enum_name(RunPhase, p)
    for p in (
        RunPhase.Pending,
        RunPhase.Running,
        RunPhase.Restarting,
        RunPhase.RollingBack,
        RunPhase.Suspended,
    )
)


@dataclass(frozen=True)
class PodCreate:
    """Create the pod of `attempt` with the run's counters before it."""

    attempt: int
    restarts_before: int
    counted_before: int


@dataclass(frozen=True)
class Note:
    """A Kubernetes Event to post on the run."""

    type: str
    reason: str
    message: str


@dataclass
class Plan:
    """What one reconcile does: delete, (wait until gone,) create, patch the status, post."""

    status: TolariaRunStatus
    delete_pods: list[str] = field(default_factory=list)
    create: PodCreate | None = None
    checkpoint_then_stop: bool = False
    deadline_missed: RollbackStatus | None = None
    notes: list[Note] = field(default_factory=list)
    restarts_added: int = 0
    counted_added: int = 0
    refused: str = ""
    """Why the attempt's pod cannot be made (the run failed instead); the reconciler counts it
    as a reconcile error."""


POD_REFUSED = "PodRefused"
"""Reason of a run whose pod the API server turned away for now (retried)."""
POD_SPEC_INVALID = "PodSpecInvalid"
"""Reason of a run whose pod cannot be made from its spec (the operator could not build it, or
the API server refused it)."""
SPEC_INVALID = "SpecInvalid"
"""Reason of a run whose spec this operator cannot read (a CRD older or newer than it)."""

OPERATOR_STOPS = frozenset({"RestartLimitExceeded", "PodStartTimeout", "RollbackDeadlineMissed"})
"""Final reasons for which the operator stops the pod itself (it would otherwise keep
crash-looping, pulling or hanging); a pod that ended on its own is kept as evidence."""


def is_active(status: Mapping[str, Any] | None) -> bool:
    """Whether a run (its raw status) still needs its daemons: not in a final phase."""
    phase = (status or {}).get("phase")
    return phase is None or phase in ACTIVE_PHASE_NAMES


def merge_view(status: TolariaRunStatus, view: SidecarView | None) -> TolariaRunStatus:
    """The stored status with what the sidecar reported since. The operator's own verdict on a
    rollback (DeadlineMissed) and a finished rollback are never reopened by a replay."""
    if view is None:
        return status
    updates: dict[str, Any] = {}
    if view.latest_checkpoint is not None:
        updates["latest_checkpoint"] = view.latest_checkpoint
    if view.attempt != status.attempt:
        return status.model_copy(update=updates)
    if view.progress is not None:
        updates["progress"] = view.progress
    if view.latest_snapshot is not None:
        updates["latest_snapshot"] = view.latest_snapshot
    seen, stored = view.rollback, status.rollback
    if seen is not None:
        same = stored is not None and stored.id == seen.id
        reopened = same and stored is not None and stored.state != deadline.IN_PROGRESS
        if not reopened and not sidecar_missed(stored, view):
            updates["rollback"] = seen
    return status.model_copy(update=updates)


def sidecar_missed(stored: RollbackStatus | None, view: SidecarView | None) -> bool:
    """The sidecar itself reported the stored full rollback DEADLINE_MISSED: the operator takes
    over exactly as if its own timer had seen the deadline pass (R6.5)."""
    seen = view.rollback if view is not None else None
    return (
        seen is not None
        and stored is not None
        and deadline.is_enforced(stored)
        and seen.id == stored.id
        and seen.state == deadline.DEADLINE_MISSED
    )


class _Draft:
    """The status being planned, as mutable fields."""

    def __init__(self, prev: TolariaRunStatus) -> None:
        self.prev = prev
        self.phase: int = prev.phase or RunPhase.Pending
        self.reason = prev.reason
        self.message = prev.message
        self.attempt = prev.attempt
        self.restarts = prev.restarts
        self.counted = prev.restarts_counted
        self.pod_name = prev.pod_name
        self.first_failure = prev.first_failure
        self.rollback = prev.rollback
        self.start_time = prev.start_time
        self.completion_time = prev.completion_time

    def set(self, phase: int, reason: str, message: str = "") -> None:
        self.phase, self.reason, self.message = phase, reason, message


def _failure(
    container: str,
    reason: str,
    message: str,
    pod: PodView | None,
    attempt: int,
    now: datetime,
    exit_code: int = 0,
) -> FailureStatus:
    return FailureStatus(
        container=container,
        exit_code=exit_code,
        reason=reason,
        message=message[:4096],
        node=pod.node if pod else "",
        time=format_time(now),
        attempt=attempt,
    )


def describe(failure: FailureStatus | None) -> str:
    """One line naming a failure, for messages (jobset#461)."""
    if failure is None:
        return "none recorded"
    where = f" on {failure.node}" if failure.node else ""
    what = failure.container or "pod"
    code = f" exit {failure.exit_code}" if failure.exit_code else ""
    return f"{what} {failure.reason}{code} in attempt {failure.attempt}{where} at {failure.time}"


def plan_run(
    run: RunObject,
    pods: Sequence[PodView],
    gone: PodView | None,
    view: SidecarView | None,
    now: datetime,
    settings: TolariaSettings,
    *,
    refused: str = "",
    blocked: str = "",
    conflict: str = "",
) -> Plan:
    """The next status of `run` and the actions to reach it; see the module docstring.

    `refused`: why the pod this plan would create cannot be made; the run fails instead.
    `blocked`: why the API server did not take that pod this time; it is retried, and the
    status says why meanwhile.
    `conflict`: why that pod is not created (objects under the run's names it does not own);
    the status says so instead of "Created".
    """
    prev = merge_view(run.status, view)
    d = _Draft(prev)
    plan = Plan(status=prev)
    _decide(run, d, plan, pods, gone, view, now, settings)
    if refused and plan.create is not None:
        _refuse(d, plan, refused, now)
    elif blocked and plan.create is not None:
        message = f"the pod of attempt {plan.create.attempt} was refused (retrying): {blocked}"
        d.reason, d.message = POD_REFUSED, message
    elif conflict and plan.create is not None:  # nothing is created: no reason may say so
        d.reason, d.message = cond.NAME_CONFLICT, conflict
    elif d.reason == cond.NAME_CONFLICT and plan.create is not None:  # checked again after this
        d.reason = "Created"
        d.message = f"attempt {plan.create.attempt}: created once the name conflict cleared"
    plan.restarts_added = max(0, d.restarts - run.status.restarts)
    plan.counted_added = max(0, d.counted - run.status.restarts_counted)
    if d.phase != (run.status.phase or 0) or d.reason != run.status.reason:
        final_bad = d.phase in (RunPhase.Failed, RunPhase.Halted) or d.reason == cond.NAME_CONFLICT
        plan.notes.append(
            Note(
                "Warning" if final_bad or d.phase == RunPhase.Restarting else "Normal",
                d.reason or enum_name(RunPhase, d.phase),
                d.message or f"phase {enum_name(RunPhase, d.phase)}",
            )
        )
    current = next((p for p in pods if p.name == pod_name(run.name, d.attempt)), None)
    plan.status = prev.model_copy(
        update={
            "phase": d.phase,
            "reason": d.reason,
            "message": d.message[:4096],
            "observed_generation": run.generation,
            "attempt": d.attempt,
            "restarts": d.restarts,
            "restarts_counted": d.counted,
            "pod_name": d.pod_name,
            "sidecar_service": service_name(run.name),
            "first_failure": d.first_failure,
            "rollback": d.rollback,
            "start_time": d.start_time,
            "completion_time": d.completion_time,
            "conditions": cond.merge(
                prev.conditions,
                cond.wanted(
                    cond.RunFacts(
                        phase=d.phase,
                        reason=d.reason,
                        message=d.message,
                        attempt=d.attempt,
                        rollback=d.rollback,
                        suspend_requested=run.run.spec.suspend,
                        stall_seconds=run.run.spec.detection.stall_seconds,
                        heartbeat=prev.progress.heartbeat if prev.progress else "",
                        previous=prev.conditions,
                    ),
                    current,
                    view,
                    now,
                ),
                format_time(now),
                run.generation,
            ),
        }
    )
    return plan


def _decide(
    run: RunObject,
    d: _Draft,
    plan: Plan,
    pods: Sequence[PodView],
    gone: PodView | None,
    view: SidecarView | None,
    now: datetime,
    settings: TolariaSettings,
) -> None:
    spec = run.run.spec
    current_name = pod_name(run.name, d.attempt) if d.attempt else ""
    current = next((p for p in pods if p.name == current_name), None)
    others = [p for p in pods if p.name != current_name]
    if d.phase in FINAL:
        if d.reason in OPERATOR_STOPS:
            _delete(plan, pods)  # a deletion that failed before is retried
        return
    missed = deadline.is_missed(d.rollback, now) or sidecar_missed(d.rollback, view)
    if missed and d.rollback is not None:
        _deadline_missed(run, d, plan, current, others, now)
        return
    if spec.suspend:
        _suspend(d, plan, current, others)
        return
    if d.phase == RunPhase.Suspended:
        _new_attempt(d, plan, others, "Resumed", "resumed from the last durable checkpoint")
        return
    if d.attempt == 0:
        d.start_time = d.start_time or format_time(now)
        _new_attempt(d, plan, others, "Created", "first attempt")
        return
    if current is None:
        if d.pod_name != current_name:
            _create(d, plan, others, d.attempt)  # recorded, never created (operator stopped)
        else:
            _next_attempt(run, d, plan, None, others, classify_loss(_gone(gone, current_name)), now)
        return
    d.pod_name = current.name  # also when recording it after the creation failed
    _fold_restarts(d, current, now)
    _delete(plan, others)
    limit = spec.restarts.limit
    if d.counted > limit:
        _restart_limit(d, plan, current, limit, now)
        return
    if current.deleting or current.phase == "Failed" or current.disruption:
        _next_attempt(run, d, plan, current, others, classify_loss(current), now)
        return
    if current.outcome is not None:
        _outcome(run, d, plan, current, others, now, settings)
        return
    if not current.trainer_started:
        _not_started(run, d, plan, current, now)
        return
    if current.trainer_running:
        rolling = deadline.is_enforced(d.rollback)
        d.set(
            RunPhase.RollingBack if rolling else RunPhase.Running,
            "FullRollback" if rolling else enum_name(RunPhase, RunPhase.Running),
        )
        return
    last = current.trainer_terminated or current.trainer_last_terminated
    detail = f": {last.reason or 'Error'} (exit {last.exit_code})" if last else ""
    d.set(
        RunPhase.Restarting,
        "TrainerRestarting",
        f"trainer restart {current.trainer_restarts} in place{detail}",
    )


def _refuse(d: _Draft, plan: Plan, message: str, now: datetime) -> None:
    """The attempt's pod cannot be made: no pod, no attempt counted, Failed with the reason
    (`spec.pod` is immutable, so no retry could succeed)."""
    if plan.create is None:  # pragma: no cover - checked by the caller
        return
    attempt = plan.create.attempt
    plan.create = None
    plan.refused = message
    d.attempt, d.pod_name = attempt - 1, ""
    if d.first_failure is None:
        d.first_failure = _failure("", POD_SPEC_INVALID, message, None, attempt, now)
    _fail(d, POD_SPEC_INVALID, f"the pod of attempt {attempt} cannot be made: {message}", now)


def spec_refused(
    raw: Mapping[str, Any], generation: int, message: str, now: datetime
) -> TolariaRunStatus | None:
    """The status of a run whose spec this operator's model refuses (the CRD it was admitted
    under is older or newer than the operator): Ready and Progressing False with reason
    `SpecInvalid`, the phase left as it stands (a pod may still be running; only the operator
    cannot act on it). None when that is already recorded for this generation, so the resync
    timer neither rewrites nor counts it again."""
    status = parse_status(raw)
    text = message[: cond.MESSAGE_LIMIT]
    ready = cond.find(status.conditions, cond.READY)
    if (
        ready is not None
        and ready.reason == SPEC_INVALID
        and ready.message == text
        and ready.observed_generation == generation
    ):
        return None
    touched = {cond.READY, cond.PROGRESSING}
    kept = [
        cond.Wanted(c.type, c.status == "True", c.reason, c.message)
        for c in status.conditions
        if c.type not in touched
    ]
    wanted = [
        cond.Wanted(cond.READY, False, SPEC_INVALID, text),
        cond.Wanted(cond.PROGRESSING, False, SPEC_INVALID, text),
        *kept,
    ]
    return status.model_copy(
        update={
            "phase": status.phase or RunPhase.Pending,
            "reason": SPEC_INVALID,
            "message": text,
            "observed_generation": generation,
            "conditions": cond.merge(status.conditions, wanted, format_time(now), generation),
        }
    )


def _gone(gone: PodView | None, name: str) -> PodView | None:
    return gone if gone is not None and gone.name == name else None


def _delete(plan: Plan, pods: Sequence[PodView]) -> None:
    for pod in pods:
        if not pod.deleting and pod.name not in plan.delete_pods:
            plan.delete_pods.append(pod.name)


def _create(d: _Draft, plan: Plan, others: Sequence[PodView], attempt: int) -> None:
    _delete(plan, others)
    d.pod_name = ""
    plan.create = PodCreate(attempt, d.restarts, d.counted)


def _new_attempt(
    d: _Draft, plan: Plan, others: Sequence[PodView], reason: str, message: str
) -> None:
    """A new attempt that is no restart: the first one, or a resume."""
    d.attempt += 1
    d.set(RunPhase.Pending, reason, f"attempt {d.attempt}: {message}")
    _create(d, plan, others, d.attempt)


def _fail(d: _Draft, reason: str, message: str, now: datetime) -> None:
    d.set(RunPhase.Failed, reason, message)
    d.completion_time = d.completion_time or format_time(now)


def _fold_restarts(d: _Draft, pod: PodView, now: datetime) -> None:
    """In-place trainer restarts count (the pod's bases plus its restartCount)."""
    d.restarts = max(d.restarts, pod.restarts_before + pod.trainer_restarts)
    d.counted = max(d.counted, pod.counted_before + pod.trainer_restarts)
    crash = pod.trainer_last_terminated if pod.trainer_restarts > 0 else None
    if crash is not None and d.first_failure is None:
        d.first_failure = _failure(
            TRAINER, crash.reason or "Error", crash.message, pod, d.attempt, now, crash.exit_code
        )


def _next_attempt(
    run: RunObject,
    d: _Draft,
    plan: Plan,
    current: PodView | None,
    others: Sequence[PodView],
    loss: Loss,
    now: datetime,
) -> None:
    """The attempt's pod is lost (or must go): count it, then attempt n+1 once it is gone."""
    d.restarts += 1
    if loss.counted:
        d.counted += 1
        if d.first_failure is None:
            d.first_failure = _failure("", loss.reason, loss.message, current, d.attempt, now)
    _delete(plan, [p for p in (current,) if p is not None])
    limit = run.run.spec.restarts.limit
    if d.counted > limit:
        _restart_limit(d, plan, current, limit, now)
        _delete(plan, others)
        return
    d.attempt += 1
    d.set(RunPhase.Restarting, loss.reason, f"attempt {d.attempt}: {loss.message}")
    _create(d, plan, others, d.attempt)


def _restart_limit(
    d: _Draft, plan: Plan, current: PodView | None, limit: int, now: datetime
) -> None:
    message = (
        f"{d.counted} counted restarts exceed spec.restarts.limit {limit}; "
        f"first failure: {describe(d.first_failure)}"
    )
    _fail(d, "RestartLimitExceeded", message, now)
    if current is not None:
        _delete(plan, [current])  # a crash-looping trainer would be restarted forever


def _deadline_missed(
    run: RunObject,
    d: _Draft,
    plan: Plan,
    current: PodView | None,
    others: Sequence[PodView],
    now: datetime,
) -> None:
    rollback = d.rollback
    if rollback is None:  # pragma: no cover - checked by the caller
        return
    d.rollback = plan.deadline_missed = deadline.missed(rollback, now)
    spec = run.run.spec
    message = (
        f"full rollback {rollback.id or '?'} started {rollback.started_at} missed its deadline "
        f"{rollback.deadline} ({spec.rollback.full_deadline_seconds:g} s)"
    )
    if current is not None:
        _fold_restarts(d, current, now)
    if spec.failure_policy.on_deadline_miss == DeadlinePolicy.fail:
        if d.first_failure is None:
            d.first_failure = _failure(
                TRAINER, "RollbackDeadlineMissed", message, current, d.attempt, now
            )
        _fail(d, "RollbackDeadlineMissed", message, now)
        _delete(plan, [p for p in (current, *others) if p is not None])
        return
    loss = Loss("RollbackDeadlineMissed", True, f"{message}; recreating from the last checkpoint")
    _next_attempt(run, d, plan, current, others, loss, now)


def _suspend(d: _Draft, plan: Plan, current: PodView | None, others: Sequence[PodView]) -> None:
    """Checkpoint-then-stop: ask the sidecar for a durable checkpoint, stop the pod, and be
    Suspended once no pod is left."""
    _delete(plan, others)
    if current is not None and not current.deleting:
        plan.checkpoint_then_stop = current.trainer_running
        _delete(plan, [current])
    if current is None and not others:
        d.pod_name = ""
        checkpoint = d.prev.latest_checkpoint
        where = f"; resumes from checkpoint {checkpoint.id}" if checkpoint else ""
        suspended = f"suspended after attempt {d.attempt}{where}"
        d.set(RunPhase.Suspended, enum_name(RunPhase, RunPhase.Suspended), suspended)
    elif d.phase != RunPhase.Suspended:
        d.reason, d.message = "Suspending", "checkpoint, then stop the pod"


def _outcome(
    run: RunObject,
    d: _Draft,
    plan: Plan,
    pod: PodView,
    others: Sequence[PodView],
    now: datetime,
    settings: TolariaSettings,
) -> None:
    outcome = pod.outcome
    if outcome is None:  # pragma: no cover - checked by the caller
        return
    if outcome.phase in (RunPhase.Suspended, RunPhase.Stopped):  # SIGTERM, no spec.suspend
        loss = Loss("TrainerStopped", False, f"trainer stopped: {outcome.reason or 'stopped'}")
        _next_attempt(run, d, plan, pod, others, loss, now)
        return
    if outcome.phase == RunPhase.Succeeded:
        d.set(RunPhase.Succeeded, enum_name(RunPhase, RunPhase.Succeeded), outcome.reason)
    else:
        reason = "TrainingFailed" if outcome.phase == RunPhase.Failed else "EmergencyHalt"
        d.set(outcome.phase, reason, outcome.reason)
        if d.first_failure is None:
            d.first_failure = _failure(
                TRAINER, reason, outcome.reason, pod, d.attempt, now, outcome.exit_code
            )
    d.completion_time = d.completion_time or format_time(now)
    if not settings.pods.native_sidecar:
        _delete(plan, [pod])  # a plain sidecar container would keep the pod running


def _not_started(run: RunObject, d: _Draft, plan: Plan, pod: PodView, now: datetime) -> None:
    """A pod whose trainer never ran: Pending, until the start timeout fails it (trainer#2001).
    A gated pod waits in a queue (Kueue): Queued, with no timeout; the timeout counts from its
    admission, so time spent queued never fails a run."""
    phase = RunPhase.Restarting if d.phase == RunPhase.Restarting else RunPhase.Pending
    if pod.gated:
        d.set(phase, cond.QUEUED, f"pod {pod.name} is {pod.gated}")
        return
    if pod.trainer_waiting:
        reason, detail = pod.trainer_waiting, pod.trainer_waiting_message
    elif pod.unschedulable:
        reason, detail = "Unschedulable", pod.unschedulable
    else:
        reason, detail = "PodPending", f"pod {pod.name} is {pod.phase}"
    timeout = run.run.spec.failure_policy.pod_start_timeout_seconds
    since = _start_clock(d, pod, now)
    if since is not None and (now - since).total_seconds() > timeout:
        message = f"pod {pod.name} did not start within {timeout} s: {reason}: {detail}"
        if d.first_failure is None:
            d.first_failure = _failure(TRAINER, reason, detail, pod, d.attempt, now)
        _fail(d, "PodStartTimeout", message, now)
        _delete(plan, [pod])
        return
    keep = (
        phase == RunPhase.Restarting
        and d.reason not in START_FAILURE_REASONS
        and d.reason != cond.QUEUED
    )
    if not keep:
        d.set(phase, reason, detail)


def _start_clock(d: _Draft, pod: PodView, now: datetime) -> datetime | None:
    """When the pod start timeout starts: the pod's creation, or its admission if a queue held
    it: the stored `Admitted` condition is False (admitted in this very reconcile: now) or
    turned True with reason `Admitted` (its `lastTransitionTime`). A run that never met a
    queue, or whose status predates the condition, counts from the pod's creation."""
    admitted = cond.find(d.prev.conditions, cond.ADMITTED)
    since: datetime | None = None
    if admitted is not None and admitted.status != "True":
        since = now
    elif admitted is not None and admitted.reason == cond.ADMITTED:
        since = parse_time(admitted.last_transition_time)
    if since is None or pod.created_at is None:
        return pod.created_at if since is None else since
    return max(since, pod.created_at)
