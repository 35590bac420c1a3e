"""The event log: ordered sequences that survive restarts, replay, and slow subscribers."""

from __future__ import annotations

import threading
import time

import pytest

from leyline.v1.sidecar_pb2 import ProgressEvent, SidecarEvent
from tests.sidecar.doubles import RUN_ID, wait_for
from tolaria_sidecar.events import EventLog


def progress(step: int) -> ProgressEvent:
    return ProgressEvent(global_step=step)


@pytest.mark.req("R10.1")
def test_sequences_increase_by_one_and_start_at_boot_time_in_microseconds() -> None:
    before = time.time_ns() // 1000
    log = EventLog(RUN_ID, capacity=100)
    sequences = [log.publish("progress", progress(i)) for i in range(5)]
    assert sequences[0] > before
    assert sequences == list(range(sequences[0], sequences[0] + 5))


@pytest.mark.req("R10.1")
def test_a_restarted_log_continues_above_its_predecessor() -> None:
    now = [1_000_000_000_000]
    first = EventLog(RUN_ID, capacity=100, wall_ns=lambda: now[0])
    last = max(first.publish("progress", progress(i)) for i in range(40))
    now[0] += 50_000  # restarted 50 us later, having published fewer than one event per us
    second = EventLog(RUN_ID, capacity=100, wall_ns=lambda: now[0])
    assert second.publish("progress", progress(0)) > last


@pytest.mark.req("R10.1")
def test_events_carry_the_run_and_their_oneof_member() -> None:
    log = EventLog(RUN_ID, capacity=10)
    log.publish("progress", progress(3))
    [event] = log.subscribe(0).next_batch(0.0)
    assert event.run_id == RUN_ID
    assert event.WhichOneof("event") == "progress"
    assert event.progress.global_step == 3
    assert event.at.ToNanoseconds() > 0


@pytest.mark.req("R10.1")
def test_a_subscriber_replays_what_came_after_its_sequence() -> None:
    log = EventLog(RUN_ID, capacity=100)
    sequences = [log.publish("progress", progress(i)) for i in range(10)]
    replay = log.subscribe(sequences[5]).next_batch(0.0)
    assert [e.sequence for e in replay] == sequences[6:]
    assert [e.progress.global_step for e in replay] == list(range(6, 10))


@pytest.mark.req("R10.1")
def test_a_subscriber_follows_live_events_after_the_replay() -> None:
    log = EventLog(RUN_ID, capacity=100)
    log.publish("progress", progress(0))
    subscription = log.subscribe(0)
    assert len(subscription.next_batch(0.0)) == 1
    seen: list[SidecarEvent] = []

    def reader() -> None:
        while not seen:
            seen.extend(subscription.next_batch(0.05))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    log.publish("progress", progress(1))
    wait_for(lambda: seen)
    thread.join(5)
    assert [e.progress.global_step for e in seen] == [1]


@pytest.mark.req("R10.1")
def test_a_slow_subscriber_never_blocks_producers_and_loses_only_the_oldest() -> None:
    drops: list[int] = []
    log = EventLog(RUN_ID, capacity=100, on_drop=drops.append)
    subscription = log.subscribe(log.boot_sequence)
    for i in range(250):  # the subscriber reads nothing meanwhile
        log.publish("progress", progress(i))
    first = subscription.next_batch(0.0)
    assert first[0].progress.global_step == 150
    assert subscription.dropped == 150 == log.dropped
    assert drops == [150]
    rest = subscription.next_batch(0.0)
    steps = [e.progress.global_step for e in first + rest]
    assert steps == list(range(150, 250))


@pytest.mark.req("R10.1")
def test_a_closed_log_wakes_its_subscribers() -> None:
    log = EventLog(RUN_ID, capacity=10)
    subscription = log.subscribe(0)
    done = threading.Event()

    def reader() -> None:
        subscription.next_batch(60.0)
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    log.close()
    assert done.wait(60)  # returns when the reader wakes; the bound is for a loaded machine
    assert subscription.closed
