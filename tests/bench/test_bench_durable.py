"""`bench/durable_commit.py` runs at a tiny size, so the durable-commit bench cannot rot."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "durable_commit", ROOT / "bench" / "durable_commit.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.req("R6.3")
def test_durable_commit_bench_reports_candidates_baselines_and_ratios(tmp_path: Path) -> None:
    argv = ["--mb", "4", "--runs", "2", "--appends", "20", "--dir", str(tmp_path), "--json"]
    results = load_bench().main(argv)
    assert set(results) == {
        "memcpy",
        "commit",
        "write_call",
        "raw_write_fsync",
        "raw_write_fsync_reuse",
        "wal_append",
        "raw_dsync_append_4k",
        "load_latest_cold",
        "raw_cold_read",
        "raw_cold_read_xxh3",
        "ratios",
    }
    assert results["commit"]["n"] == results["write_call"]["n"] == 2
    assert results["raw_write_fsync"]["n"] == results["raw_write_fsync_reuse"]["n"] == 2
    assert results["load_latest_cold"]["n"] == results["raw_cold_read"]["n"] == 2
    assert results["commit"]["median_s"] <= results["write_call"]["median_s"]
    assert results["wal_append"]["n"] == results["raw_dsync_append_4k"]["n"] == 20
    assert all(
        r["p50_us"] <= r["p99_us"] <= r["max_us"] for k, r in results.items() if "append" in k
    )
    assert all(v > 0 for v in results["ratios"].values())
    assert list(tmp_path.iterdir()) == []
