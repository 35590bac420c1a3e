"""Full-rollback deadline arithmetic, from status alone (R10.3)."""

from __future__ import annotations

from typing import Any

import pytest

from leyline.spec import RollbackSpec
from leyline.spec.status import RollbackStatus
from tests.operator.builders import T0, at
from tolaria_operator import deadline


def rollback(**fields: Any) -> RollbackStatus:
    base = {
        "id": "rb-1",
        "tier": "ROLLBACK_TIER_FULL",
        "state": "InProgress",
        "startedAt": "2026-11-25T12:00:00.000Z",
        "deadline": "2026-11-25T12:00:12.000Z",
    }
    return RollbackStatus.model_validate({**base, **fields})


@pytest.mark.req("R10.3")
def test_the_deadline_is_the_start_plus_the_specs_full_deadline() -> None:
    assert deadline.deadline_for(T0, RollbackSpec()) == at(12)
    assert deadline.deadline_for(T0, RollbackSpec(full_deadline_seconds=30.5)) == at(30.5)


@pytest.mark.req("R10.3")
def test_a_deadline_is_missed_only_strictly_after_it() -> None:
    rb = rollback()
    assert deadline.seconds_left(rb, at(2)) == pytest.approx(10.0)
    assert not deadline.is_missed(rb, at(12))
    assert deadline.is_missed(rb, at(12.001))


@pytest.mark.req("R10.3")
@pytest.mark.parametrize(
    "fields",
    [
        {"state": "Succeeded"},
        {"state": "Failed"},
        {"state": "DeadlineMissed"},
        {"tier": "ROLLBACK_TIER_FAST"},
        {"deadline": ""},
        {"deadline": "not a time"},
    ],
)
def test_nothing_is_enforced_for_finished_fast_or_unreadable_rollbacks(
    fields: dict[str, Any],
) -> None:
    assert not deadline.is_missed(rollback(**fields), at(3600))
    assert not deadline.is_missed(None, at(3600))


@pytest.mark.req("R10.3")
def test_a_missed_rollback_is_marked_with_the_time() -> None:
    marked = deadline.missed(rollback(), at(13))
    assert (marked.state, marked.finished_at, marked.deadline) == (
        "DeadlineMissed",
        "2026-11-25T12:00:13.000Z",
        "2026-11-25T12:00:12.000Z",
    )


@pytest.mark.req("R10.3")
def test_the_timer_prechecks_the_raw_status_without_validating_it() -> None:
    raw = {"rollback": rollback().model_dump(mode="json", by_alias=True), "unknown": object()}
    assert deadline.pending_in_body(raw)
    assert not deadline.missed_in_body(raw, at(11))
    assert deadline.missed_in_body(raw, at(13))
    assert not deadline.pending_in_body({})
    assert not deadline.pending_in_body(None)
    assert not deadline.missed_in_body({"rollback": {"state": "InProgress"}}, at(13))
