"""The gate: breaker failures enter conservative mode; clean epochs leave it (R1.4, R2.2, R2.3)."""

from __future__ import annotations

import pytest

from leyline import BreakerId
from tests.fakes import FakeClock, RecordingEvents
from tolaria_trainer.guards import (
    EVENT_CONSERVATIVE_ENTERED,
    EVENT_CONSERVATIVE_EXITED,
    GUARDED,
    Guards,
)


def clean_epochs(guards: Guards, n: int, start: int = 1) -> list[bool]:
    return [guards.end_epoch(e, e * 10) for e in range(start, start + n)]


def test_every_leyline_breaker_id_is_guarded(guards: Guards) -> None:
    assert set(guards.breakers) == set(GUARDED) and len(GUARDED) == 8


@pytest.mark.req("R1.4")
def test_a_failure_enters_conservative_mode_with_its_reason(
    guards: Guards, events: RecordingEvents
) -> None:
    guards.at(2, 40)
    guards.failure(BreakerId.BREAKER_HOOK_TIMING, "hook took 30 ms")
    assert guards.conservative.active
    interval = guards.conservative.intervals[0]
    assert (interval.entered_epoch, interval.entered_step) == (2, 40)
    assert interval.reason == "BREAKER_HOOK_TIMING: hook took 30 ms"
    assert events.named(EVENT_CONSERVATIVE_ENTERED)[0].attributes["epoch"] == "2"


@pytest.mark.req("R2.3")
def test_conservative_mode_ends_after_three_clean_epochs(
    guards: Guards, events: RecordingEvents
) -> None:
    guards.failure(BreakerId.BREAKER_TAMIYO, "late")
    assert guards.end_epoch(0, 0) is False  # the failing epoch itself is not clean
    assert clean_epochs(guards, 3) == [False, False, True]
    assert not guards.conservative.active
    assert guards.conservative.intervals[0].exited_epoch == 3
    assert len(events.named(EVENT_CONSERVATIVE_EXITED)) == 1


@pytest.mark.req("R2.3")
def test_a_failure_restarts_the_clean_streak(guards: Guards) -> None:
    guards.failure(BreakerId.BREAKER_TAMIYO, "late")
    guards.end_epoch(0, 0)
    clean_epochs(guards, 2)
    guards.failure(BreakerId.BREAKER_TAMIYO, "late again")
    assert guards.end_epoch(3, 30) is False
    assert clean_epochs(guards, 2, start=4) == [False, False]
    assert guards.end_epoch(6, 60) is True


@pytest.mark.req("R2.3")
def test_conservative_mode_waits_for_every_breaker_to_close(
    guards: Guards, clock: FakeClock
) -> None:
    for _ in range(3):
        guards.failure(BreakerId.BREAKER_TAMIYO, "late")
    guards.end_epoch(0, 0)
    assert clean_epochs(guards, 5) == [False] * 5  # breaker still OPEN (30 s cool-down)
    clock.advance_s(31)
    guards.success(BreakerId.BREAKER_TAMIYO)  # the half-open trial succeeds
    assert guards.end_epoch(6, 60) is True


@pytest.mark.req("R2.3")
def test_conservative_epochs_are_not_failures_and_never_halt(guards: Guards) -> None:
    guards.failure(BreakerId.BREAKER_TAMIYO, "late")
    for epoch in range(50):
        guards.end_epoch(epoch, epoch)
    assert not guards.conservative.active and guards.trips() == 0


def test_repeated_failures_do_not_open_a_second_interval(guards: Guards) -> None:
    guards.failure(BreakerId.BREAKER_TAMIYO, "a")
    guards.failure(BreakerId.BREAKER_LR_STEP, "b")
    assert len(guards.conservative.intervals) == 1


def test_open_breakers_are_listed_by_leyline_name(guards: Guards) -> None:
    for _ in range(3):
        guards.failure(BreakerId.BREAKER_KASMINA, "x")
    assert guards.open_breakers() == ["BREAKER_KASMINA"]
