"""Telemetry priorities (R8.1) and health semantics (R8.2)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from leyline import HealthStatus, MessagePriority, TelemetryLevel, TelemetryPacket
from leyline.spec import ConservativeSpec, TelemetrySpec
from tests.fakes import ListSink
from tolaria_trainer.telemetry import HealthInputs, JsonLinesSink, TelemetryHub, assess_health

LOW = MessagePriority.MESSAGE_PRIORITY_LOW
NORMAL = MessagePriority.MESSAGE_PRIORITY_NORMAL
HIGH = MessagePriority.MESSAGE_PRIORITY_HIGH
CRITICAL = MessagePriority.MESSAGE_PRIORITY_CRITICAL
INFO = TelemetryLevel.TELEMETRY_LEVEL_INFO


def hub(
    sink: ListSink, capacity: int = 100, conservative: bool = False, thread: bool = False
) -> TelemetryHub:
    return TelemetryHub(
        TelemetrySpec(queue_capacity=capacity),
        ConservativeSpec(telemetry_sample_every=3),
        "r",
        [sink],
        is_conservative=lambda: conservative,
        start_thread=thread,
    )


def emitted(h: TelemetryHub) -> dict[int, tuple[int, int]]:
    return {c.priority: (c.emitted, c.dropped) for c in h.counts()}


@pytest.mark.req("R8.1")
def test_critical_is_delivered_before_anything_queued() -> None:
    sink = ListSink()
    h = hub(sink)
    h.event("queued", INFO, NORMAL)
    h.event("urgent", TelemetryLevel.TELEMETRY_LEVEL_CRITICAL, CRITICAL)
    assert [p.events[0].event_id for p in sink.packets] == ["urgent"]
    h.flush()
    assert [p.events[0].event_id for p in sink.packets] == ["urgent", "queued"]


@pytest.mark.req("R8.1")
def test_queued_packets_drain_in_priority_order() -> None:
    sink = ListSink()
    h = hub(sink)
    for name, prio in (("low", LOW), ("normal", NORMAL), ("high", HIGH)):
        h.event(name, INFO, prio)
    h.flush()
    assert [p.events[0].event_id for p in sink.packets] == ["high", "normal", "low"]


@pytest.mark.req("R8.1")
def test_a_full_queue_drops_low_first_and_counts_it() -> None:
    sink = ListSink()
    h = hub(sink, capacity=2)
    h.event("low", INFO, LOW)
    h.event("normal", INFO, NORMAL)
    h.event("high", INFO, HIGH)
    h.flush()
    assert [p.events[0].event_id for p in sink.packets] == ["high", "normal"]
    assert emitted(h)[LOW] == (0, 1)


@pytest.mark.req("R8.1")
def test_a_queue_full_of_high_refuses_low_and_normal() -> None:
    sink = ListSink()
    h = hub(sink, capacity=1)
    h.event("high", INFO, HIGH)
    h.event("low", INFO, LOW)
    h.event("normal", INFO, NORMAL)
    assert emitted(h)[LOW] == (0, 1) and emitted(h)[NORMAL] == (0, 1) and emitted(h)[HIGH] == (1, 0)


@pytest.mark.req("R8.1")
def test_critical_is_never_dropped_even_when_the_queue_is_full() -> None:
    sink = ListSink()
    h = hub(sink, capacity=1)
    h.event("high", INFO, HIGH)
    h.event("c1", INFO, CRITICAL)
    h.event("c2", INFO, CRITICAL)
    assert emitted(h)[CRITICAL] == (2, 0)


@pytest.mark.req("R2.2")
def test_conservative_mode_samples_low_and_normal_telemetry() -> None:
    sink = ListSink()
    h = hub(sink, conservative=True)
    for i in range(6):
        h.event(f"n{i}", INFO, NORMAL)
    h.event("h", INFO, HIGH)
    assert emitted(h)[NORMAL] == (2, 4) and emitted(h)[HIGH] == (1, 0)


def test_every_packet_gets_its_priority_and_health() -> None:
    sink = ListSink()
    h = hub(sink)
    h.metrics({"tolaria.training.loss": 0.5}, HIGH)
    h.flush()
    pkt = sink.packets[0]
    assert pkt.priority == HIGH and pkt.system_health.status == HealthStatus.HEALTH_STATUS_HEALTHY
    assert pkt.metrics[0].name == "tolaria.training.loss" and pkt.source_subsystem == "tolaria"


def test_the_drain_thread_delivers_without_an_explicit_flush() -> None:
    sink = ListSink()
    h = hub(sink, thread=True)
    done = threading.Event()

    class Signal:
        def deliver(self, packet: TelemetryPacket) -> None:
            done.set()

    h._sinks.append(Signal())
    h.event("x", INFO, NORMAL)
    assert done.wait(60)  # returns on delivery; the bound is for a loaded machine
    h.close()


def test_a_failing_sink_does_not_stop_delivery() -> None:
    sink = ListSink()

    class Broken:
        def deliver(self, packet: TelemetryPacket) -> None:
            raise OSError("disk full")

    h = TelemetryHub(TelemetrySpec(), ConservativeSpec(), "r", [Broken(), sink], start_thread=False)
    h.event("x", INFO, CRITICAL)
    assert len(sink.packets) == 1


@pytest.mark.req("R8.2")
@pytest.mark.parametrize(
    ("inputs", "status"),
    [
        (HealthInputs(), HealthStatus.HEALTH_STATUS_HEALTHY),
        (HealthInputs(budget_breaches_this_epoch=1), HealthStatus.HEALTH_STATUS_DEGRADED),
        (HealthInputs(conservative=True), HealthStatus.HEALTH_STATUS_DEGRADED),
        (HealthInputs(open_breakers=["BREAKER_TAMIYO"]), HealthStatus.HEALTH_STATUS_UNHEALTHY),
        (HealthInputs(rollback_in_progress=True), HealthStatus.HEALTH_STATUS_UNHEALTHY),
        (HealthInputs(frozen=True), HealthStatus.HEALTH_STATUS_CRITICAL),
        (HealthInputs(halted=True, conservative=True), HealthStatus.HEALTH_STATUS_CRITICAL),
    ],
)
def test_health_follows_the_worst_condition(inputs: HealthInputs, status: int) -> None:
    assert assess_health(inputs).status == status


@pytest.mark.req("R8.2")
def test_an_unreachable_sidecar_is_degraded_with_the_reason_and_outranked_by_failures() -> None:
    away = assess_health(HealthInputs(sidecar_unreachable="CommitSnapshot: UNAVAILABLE"))
    assert away.status == HealthStatus.HEALTH_STATUS_DEGRADED
    assert "sidecar unreachable" in away.summary and "UNAVAILABLE" in away.summary
    both = assess_health(HealthInputs(sidecar_unreachable="x", rollback_in_progress=True))
    assert both.status == HealthStatus.HEALTH_STATUS_UNHEALTHY
    assert both.summary == "rollback in progress; sidecar unreachable (x)"


def test_health_summary_names_the_open_breaker() -> None:
    assert "BREAKER_TAMIYO" in assess_health(HealthInputs(open_breakers=["BREAKER_TAMIYO"])).summary


def test_json_lines_sink_writes_one_parseable_packet_per_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    sink = JsonLinesSink(path)
    h = TelemetryHub(TelemetrySpec(), ConservativeSpec(), "r", [sink], start_thread=False)
    h.event("a", INFO, CRITICAL)
    h.event("b", INFO, NORMAL)
    h.flush()
    sink.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["events"][0]["eventId"] for x in lines] == ["a", "b"]
    assert lines[0]["priority"] == "MESSAGE_PRIORITY_CRITICAL"


@pytest.mark.req("R13.5")
def test_json_lines_sink_keeps_every_line_up_to_a_full_disk_then_counts_what_it_lost(
    small_tmpfs: Callable[[str, str], Path],
) -> None:
    disk = small_tmpfs("disk", "64k")
    sink = JsonLinesSink(disk / "telemetry.jsonl")
    h = TelemetryHub(TelemetrySpec(), ConservativeSpec(), "r", [sink], start_thread=False)
    for i in range(5):
        h.event(f"before-{i}", INFO, CRITICAL)
    with (disk / "filler").open("wb") as filler:  # the rest of the disk, minus a few bytes
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        filler.write(b"\0" * (free - 100))
    for i in range(20):  # no exception reaches the run, whatever the sink hits
        h.event(f"after-{i}", INFO, CRITICAL)
    sink.close()
    lines = [json.loads(x) for x in (disk / "telemetry.jsonl").read_text().splitlines()]
    assert [x["events"][0]["eventId"] for x in lines[:5]] == [f"before-{i}" for i in range(5)]
    assert sink.written == len(lines) and sink.written + sink.unwritten == 25
    assert sink.unwritten >= 1 and "No space left" in sink.failure
