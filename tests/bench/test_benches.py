"""Every bench's `main(argv)` runs at a tiny size, so the benches cannot rot."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hook_latency_bench_reports_both_hooks() -> None:
    results = load("hook_latency").main(["--epochs", "4", "--steps", "1", "--json"])
    assert set(results) == {"hook", "empty hook"}
    assert all(r["p50"] <= r["p99"] <= r["max"] for r in results.values())


def test_operator_scale_bench_counts_the_steady_state_and_the_operators_memory() -> None:
    result = load("operator_scale").main(
        ["--runs", "3", "--window", "3", "--warmup", "1", "--settle-timeout", "120", "--json"]
    )
    assert result["all_pods_s"] is not None and result["all_running_s"] is not None
    assert result["requests_in_window"] == sum(result["by_kind"].values())
    assert result["operator_rss_mib"]["peak"] >= result["operator_rss_mib"]["before"] > 0
