"""The M1-M3 snapshot/restore bench runs at a tiny size, so it cannot rot (benches run from tests).

The numbers at this size mean nothing (fixed costs dominate a 3 MB state); what is checked is
that every section runs against the real slots, writer and restorer, reports every candidate
and baseline with positive ratios, and leaves no segment behind.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.bench.test_benches import load

TINY = ["--params", "0.2", "--overhead-params", "0.2", "--steps", "4", "--every", "2"]
TINY += ["--trials", "2", "--reattach-trials", "1", "--batch", "8", "--memcpy-mb", "8", "--json"]


def positive(value: object) -> bool:
    return isinstance(value, float | int) and math.isfinite(value) and value > 0


@pytest.mark.req("R6.1")
def test_snapshot_bench_reports_every_metric_against_its_baselines(tmp_path: Path) -> None:
    results = load("snapshot_restore").main([*TINY, "--dir", str(tmp_path)])

    assert set(results) == {"machine", "memcpy_1gb", "memcpy_1gb_end", "sizes", "m3_overhead"}
    assert positive(results["memcpy_1gb"]["gb_per_s"])
    assert positive(results["memcpy_1gb_end"]["gb_per_s"])
    (size,) = results["sizes"].values()
    m1, m2, m3 = size["m1"], size["m2"], size["m3"]

    assert {"restore", "memcpy", "arena_copy", "torch_load", "torch_load_mmap"} <= set(m1["stats"])
    assert set(m1["stats"]) | set(m1["skipped"]) >= {"dcp_load"}
    assert set(m1["phases"]) == {"prepare", "commit", "confirm"}
    assert {"restore_fresh", "raw_remap", "restore_existing", "import_torch"} <= set(m2["stats"])
    assert {"snapshot_blocked", "memcpy", "torch_save_crc", "torch_save_no_crc"} <= set(m3["stats"])
    assert set(m3["stats"]) | set(m3["skipped"]) >= {"dcp_async_save_blocking"}
    for section in (m1, m2, m3):
        assert section["ratios"], section
        assert all(positive(v) for v in section["ratios"].values()), section["ratios"]
        for stats in section["stats"].values():
            assert stats["n"] == (1 if section is m2 else 2)  # one child: ~5 s of imports
            assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["p95_ms"] <= stats["max_ms"]
    assert m1["ratios"]["restore_vs_memcpy"] == pytest.approx(
        m1["stats"]["restore"]["median_ms"] / m1["stats"]["memcpy"]["median_ms"]
    )

    overhead = results["m3_overhead"]
    assert overhead["steps_each"] == 4 and overhead["snapshots"] == 2
    assert positive(overhead["step_ms_with_snapshots"]) and positive(overhead["step_ms_without"])
    assert math.isfinite(overhead["overhead"])
    assert list(tmp_path.iterdir()) == []
