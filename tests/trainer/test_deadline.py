"""A deadline really bounds the caller's wall time (R1.3): late workers are abandoned."""

from __future__ import annotations

import threading
import time

import pytest

from tolaria_trainer.deadline import CallStatus, DeadlineCaller


@pytest.fixture
def caller():
    c = DeadlineCaller("test")
    yield c
    c.close()


def deadline_in(ms: float) -> int:
    return time.perf_counter_ns() + int(ms * 1e6)


@pytest.mark.req("R1.3")
def test_a_sleeping_callee_does_not_hold_the_caller_past_the_deadline(
    caller: DeadlineCaller,
) -> None:
    release = threading.Event()
    start = time.perf_counter()
    outcome = caller.call(lambda: release.wait(5), deadline_ns=deadline_in(12))
    elapsed = time.perf_counter() - start
    release.set()
    assert outcome.status is CallStatus.TIMED_OUT
    assert elapsed < 1.0  # 12 ms deadline; the callee would have taken 5 s


@pytest.mark.req("R1.3")
def test_the_next_call_gets_a_fresh_worker_while_the_late_one_runs(caller: DeadlineCaller) -> None:
    release = threading.Event()
    caller.call(lambda: release.wait(5), deadline_ns=deadline_in(5))
    outcome = caller.call(lambda: 7, deadline_ns=deadline_in(2000))
    release.set()
    assert outcome.ok and outcome.value == 7


@pytest.mark.req("R1.3")
def test_a_late_answer_is_discarded(caller: DeadlineCaller) -> None:
    release = threading.Event()
    caller.call(lambda: (release.wait(5), "late")[1], deadline_ns=deadline_in(5))
    release.set()
    assert caller.call(lambda: "fresh", deadline_ns=deadline_in(2000)).value == "fresh"


def test_an_error_in_the_callee_is_returned_not_raised(caller: DeadlineCaller) -> None:
    outcome = caller.call(lambda: 1 / 0, deadline_ns=deadline_in(2000))
    assert outcome.status is CallStatus.FAILED and isinstance(outcome.error, ZeroDivisionError)


def test_too_many_abandoned_calls_are_refused_at_once() -> None:
    caller = DeadlineCaller("bounded", max_abandoned=1)
    release = threading.Event()
    for _ in range(2):
        caller.call(lambda: release.wait(5), deadline_ns=deadline_in(1))
    assert caller.call(lambda: 1, deadline_ns=deadline_in(2000)).status is CallStatus.REFUSED
    release.set()
    deadline = time.monotonic() + 60  # bounds only a failure: the loop ends when they finish
    while caller.abandoned_running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert caller.call(lambda: 1, deadline_ns=deadline_in(2000)).ok
    caller.close()


def test_a_deadline_already_past_times_out_without_waiting(caller: DeadlineCaller) -> None:
    release = threading.Event()
    outcome = caller.call(lambda: release.wait(5), deadline_ns=time.perf_counter_ns() - 1)
    release.set()
    assert outcome.status is CallStatus.TIMED_OUT
