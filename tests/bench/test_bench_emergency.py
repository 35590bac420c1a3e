"""The M7 emergency-ack bench runs at a tiny size, so it cannot rot (benches run from tests)."""

from __future__ import annotations

import pytest

from tests.bench.test_benches import load


@pytest.mark.req("R7.3")
def test_emergency_ack_bench_reports_critical_and_every_baseline() -> None:
    results = load("emergency_ack").main(
        ["--n", "12", "--subscribers", "2", "--file-mb", "4", "--json"]
    )
    assert set(results) == {
        "spin_pingpong",
        "pipe_roundtrip",
        "sleep_poll_idle",
        "sleep_poll_busy",
        "critical_idle",
        "critical_busy",
        "critical_idle_acks_written",
        "critical_busy_acks_written",
    }
    for summary in results.values():
        assert summary["n"] == 12
        assert 0 <= summary["p50"] <= summary["p99"] <= summary["max"]
