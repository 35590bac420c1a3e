"""The circuit breaker (R2.1): one utility, Leyline states, design defaults."""

from __future__ import annotations

import pytest

from leyline import BreakerId, CircuitBreakerState
from leyline.spec import BreakerSpec
from tests.fakes import FakeClock
from tolaria_trainer.breaker import BreakerTransition, CircuitBreaker

CLOSED = CircuitBreakerState.CIRCUIT_STATE_CLOSED
OPEN = CircuitBreakerState.CIRCUIT_STATE_OPEN
HALF_OPEN = CircuitBreakerState.CIRCUIT_STATE_HALF_OPEN


@pytest.fixture
def transitions() -> list[BreakerTransition]:
    return []


@pytest.fixture
def breaker(clock: FakeClock, transitions: list[BreakerTransition]) -> CircuitBreaker:
    return CircuitBreaker(BreakerId.BREAKER_TAMIYO, BreakerSpec(), clock, transitions.append)


def trip(b: CircuitBreaker) -> None:
    for _ in range(3):
        b.record_failure("boom")


@pytest.mark.req("R2.1")
def test_breaker_starts_closed_and_allows(breaker: CircuitBreaker) -> None:
    assert breaker.state == CLOSED and breaker.allow()


@pytest.mark.req("R2.1")
def test_breaker_opens_after_three_consecutive_failures(breaker: CircuitBreaker) -> None:
    breaker.record_failure("a")
    breaker.record_failure("b")
    assert breaker.state == CLOSED
    breaker.record_failure("c")
    assert breaker.state == OPEN and not breaker.allow()
    assert breaker.trips == 1 and breaker.last_failure == "c"


@pytest.mark.req("R2.1")
def test_a_success_resets_the_consecutive_count(breaker: CircuitBreaker) -> None:
    breaker.record_failure("a")
    breaker.record_failure("b")
    breaker.record_success()
    breaker.record_failure("c")
    breaker.record_failure("d")
    assert breaker.state == CLOSED


@pytest.mark.req("R2.1")
def test_open_breaker_half_opens_after_thirty_second_cooldown(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    trip(breaker)
    clock.advance_s(29.9)
    assert breaker.state == OPEN
    clock.advance_s(0.2)
    assert breaker.state == HALF_OPEN


@pytest.mark.req("R2.1")
def test_half_open_admits_exactly_one_trial(breaker: CircuitBreaker, clock: FakeClock) -> None:
    trip(breaker)
    clock.advance_s(31)
    assert breaker.allow()
    assert not breaker.allow()


@pytest.mark.req("R2.1")
def test_successful_trial_closes_the_breaker(breaker: CircuitBreaker, clock: FakeClock) -> None:
    trip(breaker)
    clock.advance_s(31)
    breaker.allow()
    breaker.record_success()
    assert breaker.state == CLOSED and breaker.allow()


@pytest.mark.req("R2.1")
def test_failure_in_half_open_reopens_at_once(breaker: CircuitBreaker, clock: FakeClock) -> None:
    trip(breaker)
    clock.advance_s(31)
    breaker.allow()
    breaker.record_failure("still broken")
    assert breaker.state == OPEN and breaker.trips == 2


@pytest.mark.req("R2.1")
def test_reopened_breaker_waits_a_full_cooldown_again(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    trip(breaker)
    clock.advance_s(31)
    breaker.record_failure("again")
    clock.advance_s(29)
    assert breaker.state == OPEN


@pytest.mark.req("R2.1")
def test_success_while_open_is_ignored(breaker: CircuitBreaker) -> None:
    trip(breaker)
    breaker.record_success()
    assert breaker.state == OPEN


@pytest.mark.req("R2.1")
def test_outcome_after_cooldown_counts_as_the_trial_without_allow(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    trip(breaker)
    clock.advance_s(31)
    breaker.record_success()  # an always-run operation (hook timing) reports without asking
    assert breaker.state == CLOSED


@pytest.mark.req("R2.1")
def test_transitions_are_reported_with_reasons(
    breaker: CircuitBreaker, clock: FakeClock, transitions: list[BreakerTransition]
) -> None:
    trip(breaker)
    clock.advance_s(31)
    breaker.record_success()
    assert [(t.old, t.new) for t in transitions] == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED),
    ]
    assert transitions[0].reason == "boom"


def test_thresholds_come_from_the_spec(clock: FakeClock) -> None:
    b = CircuitBreaker(
        BreakerId.BREAKER_KASMINA, BreakerSpec(failure_threshold=1, half_open_trials=2), clock
    )
    b.record_failure("x")
    assert b.state == OPEN
    clock.advance_s(31)
    assert b.allow() and b.allow() and not b.allow()
    b.record_success()
    assert b.state == HALF_OPEN
    b.record_success()
    assert b.state == CLOSED


def test_summary_carries_counters(breaker: CircuitBreaker) -> None:
    breaker.record_success()
    trip(breaker)
    s = breaker.summary()
    assert (s.breaker, s.state, s.failures, s.successes, s.trips) == (
        BreakerId.BREAKER_TAMIYO,
        OPEN,
        3,
        1,
        1,
    )
