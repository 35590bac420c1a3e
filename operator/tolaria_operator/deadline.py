"""Full-rollback deadline arithmetic, from status alone (R6.5, R10.3).

`status.rollback` carries `startedAt` and `deadline` as RFC 3339 text. The deadline timer
and the reconciler call `is_missed(status.rollback, now)`; because nothing but the stored
status is consulted, an operator restarted between the rollback start and the deadline
enforces it exactly as the one that saw it start. Pure: no clock reads, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, Final

from leyline import RollbackTier
from leyline.spec import RollbackSpec
from leyline.spec.status import RollbackStatus
from tolaria_operator.clock import format_time, parse_time

IN_PROGRESS: Final = "InProgress"
DEADLINE_MISSED: Final = "DeadlineMissed"


def deadline_for(started: datetime, spec: RollbackSpec) -> datetime:
    """When a full rollback started at `started` must be done (`spec.rollback.fullDeadlineSeconds`
    later, 12 s by default, R12)."""
    return started + timedelta(seconds=spec.full_deadline_seconds)


def is_enforced(rollback: RollbackStatus | None) -> bool:
    """Whether the operator watches this rollback's deadline: a full rollback still in progress
    with a deadline written."""
    return (
        rollback is not None
        and rollback.state == IN_PROGRESS
        and rollback.tier == RollbackTier.ROLLBACK_TIER_FULL
        and bool(rollback.deadline)
    )


def seconds_left(rollback: RollbackStatus | None, now: datetime) -> float | None:
    """Seconds until the deadline (negative once passed); None when nothing is enforced or the
    deadline is unreadable."""
    if rollback is None or not is_enforced(rollback):
        return None
    deadline = parse_time(rollback.deadline)
    if deadline is None:
        return None
    return (deadline - now).total_seconds()


def is_missed(rollback: RollbackStatus | None, now: datetime) -> bool:
    """True once `now` is past the deadline of a full rollback still in progress."""
    left = seconds_left(rollback, now)
    return left is not None and left < 0


def missed(rollback: RollbackStatus, now: datetime) -> RollbackStatus:
    """The rollback marked DeadlineMissed at `now`."""
    return rollback.model_copy(update={"state": DEADLINE_MISSED, "finished_at": format_time(now)})


def pending_in_body(status: Mapping[str, Any] | None) -> bool:
    """Cheap pre-check on a raw status (the timer's `when=` filter): a full rollback is in
    progress. The reconciler re-checks on the freshly read status before acting."""
    rollback = (status or {}).get("rollback") or {}
    return (
        rollback.get("state") == IN_PROGRESS
        and rollback.get("tier") == RollbackTier.Name(RollbackTier.ROLLBACK_TIER_FULL)
        and bool(rollback.get("deadline"))
    )


def missed_in_body(status: Mapping[str, Any] | None, now: datetime) -> bool:
    """`is_missed` on a raw status, without validating the rest of it."""
    if not pending_in_body(status):
        return False
    deadline = parse_time(str(((status or {}).get("rollback") or {}).get("deadline", "")))
    return deadline is not None and now > deadline
