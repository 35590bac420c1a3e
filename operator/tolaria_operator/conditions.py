"""`status.conditions` by Kubernetes conventions: one entry per type, always present,
`lastTransitionTime` moved only when `status` flips, `observedGeneration` stamped.

Called by `status.plan_run`: `wanted` derives every condition from the planned phase, the
rollback, the heartbeat, the attempt's pod and the sidecar view; `merge` stamps the times.
Pure. The list is the contract (`kubectl wait --for=condition=Succeeded`), the phase is for
people; nothing relies on the list's order (trainer#1711, kblaunch#14).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from leyline import RollbackTier, RunPhase
from leyline.spec import Condition
from leyline.spec.status import RollbackStatus
from tolaria_operator import deadline
from tolaria_operator.clock import parse_time
from tolaria_operator.observation import START_FAILURE_REASONS, PodView
from tolaria_operator.resources import enum_name
from tolaria_operator.view import SidecarView

READY = "Ready"
PROGRESSING = "Progressing"
SUCCEEDED = RunPhase.Name(RunPhase.Succeeded)
FAILED = RunPhase.Name(RunPhase.Failed)
SUSPENDED = RunPhase.Name(RunPhase.Suspended)
ROLLING_BACK = RunPhase.Name(RunPhase.RollingBack)
DEGRADED = "Degraded"
HALTED = RunPhase.Name(RunPhase.Halted)
ADMITTED = "Admitted"
"""False (reason `Queued`) while the attempt's pod is held by a scheduling gate (Kueue's
admission gate); its `lastTransitionTime` to True is when the pod start timeout starts."""
QUEUED = "Queued"
NOT_QUEUED = "NotQueued"
TYPES = (
    READY,
    PROGRESSING,
    SUCCEEDED,
    FAILED,
    SUSPENDED,
    ROLLING_BACK,
    DEGRADED,
    HALTED,
    ADMITTED,
)
"""Every condition type a run carries, in the order they are written."""

MESSAGE_LIMIT = 4096


@dataclass(frozen=True)
class Wanted:
    """A condition as the reconciler wants it now."""

    type: str
    status: bool
    reason: str
    message: str = ""


def _status(value: bool) -> Literal["True", "False"]:
    return "True" if value else "False"


def merge(
    previous: Sequence[Condition], wanted: Sequence[Wanted], now: str, generation: int
) -> list[Condition]:
    """The new condition list: `lastTransitionTime` is kept from `previous` when the status is
    unchanged (a new reason or message alone is not a transition)."""
    before = {c.type: c for c in previous}
    merged: list[Condition] = []
    for want in wanted:
        status = _status(want.status)
        old = before.get(want.type)
        moved = old is None or old.status != status or not old.last_transition_time
        merged.append(
            Condition(
                type=want.type,
                status=status,
                reason=want.reason or ("Yes" if want.status else "No"),
                message=want.message[:MESSAGE_LIMIT],
                last_transition_time=now if moved or old is None else old.last_transition_time,
                observed_generation=generation,
            )
        )
    return merged


def find(conditions: Sequence[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


NAME_CONFLICT = "NameConflict"


def name_conflict_message(objects: Sequence[str]) -> str:
    """What the run's status and Ready condition say about `objects` that block it."""
    return (
        f"{', '.join(objects)}: exists without an ownerReference to this run, so the operator "
        "leaves it alone and does not start the run; delete or rename it, or rename the run"
    )


def name_conflict(
    conditions: Sequence[Condition], objects: Sequence[str], now: str, generation: int
) -> list[Condition]:
    """The conditions with `Ready=False, reason=NameConflict` naming `objects`: objects the run
    needs exist under its names without its ownerReference, so the operator neither uses nor
    changes them and the run waits until they are gone or renamed (the others unchanged)."""
    message = name_conflict_message(objects)
    (ready,) = merge(conditions, [Wanted(READY, False, NAME_CONFLICT, message)], now, generation)
    if find(conditions, READY) is None:
        return [ready, *conditions]
    return [ready if c.type == READY else c for c in conditions]


FINAL = (RunPhase.Succeeded, RunPhase.Failed, RunPhase.Halted)


@dataclass(frozen=True)
class RunFacts:
    """What the conditions are derived from (the planned status and the spec)."""

    phase: int
    reason: str
    message: str
    attempt: int
    rollback: RollbackStatus | None
    suspend_requested: bool
    stall_seconds: float
    heartbeat: str
    previous: Sequence[Condition]


def wanted(
    facts: RunFacts, pod: PodView | None, view: SidecarView | None, now: datetime
) -> list[Wanted]:
    """Every condition type, True or False, with a CamelCase reason."""
    phase = facts.phase
    reason = facts.reason or enum_name(RunPhase, phase)

    def only(when: int) -> str:
        return facts.message if phase == when else ""

    return [
        Wanted(
            READY,
            phase == RunPhase.Running,
            enum_name(RunPhase, phase) if phase == RunPhase.Running else reason,
            "" if phase == RunPhase.Running else facts.message,
        ),
        _progressing(facts, reason, now),
        Wanted(SUCCEEDED, phase == RunPhase.Succeeded, reason, only(RunPhase.Succeeded)),
        Wanted(FAILED, phase == RunPhase.Failed, reason, only(RunPhase.Failed)),
        Wanted(
            SUSPENDED,
            phase == RunPhase.Suspended,
            "Suspending" if facts.suspend_requested and phase != RunPhase.Suspended else reason,
            only(RunPhase.Suspended),
        ),
        _rolling_back(facts.rollback),
        _degraded(facts, pod, view),
        Wanted(HALTED, phase == RunPhase.Halted, reason, only(RunPhase.Halted)),
        _admitted(pod, facts.previous),
    ]


def _admitted(pod: PodView | None, previous: Sequence[Condition]) -> Wanted:
    """Queued while the attempt's pod is gated; `Admitted` once a queued pod is let through
    (its `lastTransitionTime` is when the start timeout starts, and the reason stays for later
    attempts, whose own creation then comes later); `NotQueued` for a run that never met a
    queue (also between attempts)."""
    if pod is not None and pod.gated:
        return Wanted(ADMITTED, False, QUEUED, f"pod {pod.name} is {pod.gated}")
    old = find(previous, ADMITTED)
    if old is not None and (old.status == "False" or old.reason == ADMITTED):
        return Wanted(ADMITTED, True, ADMITTED)
    return Wanted(ADMITTED, True, NOT_QUEUED)


def _progressing(facts: RunFacts, reason: str, now: datetime) -> Wanted:
    phase = facts.phase
    if phase in FINAL or phase == RunPhase.Suspended:
        return Wanted(PROGRESSING, False, reason, facts.message)
    beat = parse_time(facts.heartbeat)
    running = phase in (RunPhase.Running, RunPhase.RollingBack)
    if running and beat is not None and (now - beat).total_seconds() > facts.stall_seconds:
        message = f"no progress heartbeat for over {facts.stall_seconds:g} s"
        return Wanted(PROGRESSING, False, "NoHeartbeat", message)
    return Wanted(PROGRESSING, True, reason, facts.message)


def _rolling_back(rollback: RollbackStatus | None) -> Wanted:
    if rollback is not None and deadline.is_enforced(rollback):
        message = f"rollback {rollback.id}, deadline {rollback.deadline}"
        return Wanted(ROLLING_BACK, True, "FullRollback", message)
    if rollback is not None and rollback.state == deadline.IN_PROGRESS:
        tier = enum_name(RollbackTier, rollback.tier) if rollback.tier else "rollback"
        return Wanted(ROLLING_BACK, True, "Rollback", f"{tier} {rollback.id}")
    return Wanted(ROLLING_BACK, False, rollback.state if rollback is not None else "NoRollback")


def _degraded(facts: RunFacts, pod: PodView | None, view: SidecarView | None) -> Wanted:
    """A pod that cannot start, then what the sidecar reports; without a view of this attempt
    the previous value stands (an operator restart does not flap it)."""
    if pod is not None and pod.trainer_waiting in START_FAILURE_REASONS:
        return Wanted(DEGRADED, True, pod.trainer_waiting, pod.trainer_waiting_message)
    if pod is not None and pod.unschedulable and not pod.trainer_started:
        return Wanted(DEGRADED, True, "Unschedulable", pod.unschedulable)
    if facts.phase in FINAL or facts.phase == RunPhase.Suspended:
        return Wanted(DEGRADED, False, enum_name(RunPhase, facts.phase))
    if view is None or view.attempt != facts.attempt:
        old = find(facts.previous, DEGRADED)
        if old is not None:
            return Wanted(DEGRADED, old.status == "True", old.reason, old.message)
        return Wanted(DEGRADED, False, "AsExpected")
    text = view.degradation
    if text.startswith("SidecarUnreachable") and not (pod is not None and pod.trainer_running):
        text = ""  # nothing to reach yet
    if not text:
        return Wanted(DEGRADED, False, "AsExpected")
    reason, _, message = text.partition(": ")
    return Wanted(DEGRADED, True, reason, message)
