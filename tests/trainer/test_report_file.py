"""`report.json` on a full disk: reserved at the start, written in place, smaller if it must
be (R13.5). Real tmpfs file systems, filled for real."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from leyline import EpochRecord, RunPhase, RunReport
from tests.disks import fill_disk
from tolaria_trainer import report_file
from tolaria_trainer.report import read_report, write_report


def final_report(epochs: int) -> RunReport:
    report = RunReport(version=1, run_id="r", status=RunPhase.Succeeded, epochs_completed=epochs)
    report.epochs.extend(
        EpochRecord(epoch=e, global_step=16 * (e + 1), training_loss=1.0) for e in range(epochs)
    )
    return report


@pytest.mark.req("R13.5")
def test_the_placeholder_is_a_running_report_of_the_reserved_size(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    assert report_file.reserve(path, report_file.placeholder("r", "i1"), 64 << 10) == ""
    assert path.stat().st_size == 64 << 10
    held = read_report(path)
    assert held.status == RunPhase.Running and report_file.is_placeholder(held)


@pytest.mark.req("R13.5")
def test_a_final_report_fits_in_its_reservation_on_a_full_disk(
    small_tmpfs: Callable[[str, str], Path],
) -> None:
    disk = small_tmpfs("disk", "1m")
    path = disk / "report.json"
    assert (
        report_file.reserve(path, report_file.placeholder("r"), report_file.reserve_bytes(20)) == ""
    )
    fill_disk(disk)
    write_report(final_report(20), path)
    written = read_report(path)
    assert written.status == RunPhase.Succeeded and len(written.epochs) == 20
    assert any("disk full" in w for w in written.warnings)
    again = final_report(20)  # the supervisor rewrites it: the reservation is still there
    again.restarts = 1
    write_report(again, path)
    assert read_report(path).restarts == 1


@pytest.mark.req("R13.5")
def test_a_report_too_big_for_its_reservation_drops_per_epoch_detail_and_says_so(
    small_tmpfs: Callable[[str, str], Path],
) -> None:
    disk = small_tmpfs("disk", "1m")
    path = disk / "report.json"
    assert report_file.reserve(path, report_file.placeholder("r"), 8 << 10) == ""
    fill_disk(disk)
    write_report(final_report(200), path)
    written = read_report(path)
    assert written.status == RunPhase.Succeeded and written.epochs_completed == 200
    assert not written.epochs
    assert any("200 epoch records" in w for w in written.warnings)
    json.loads(path.read_text())  # one valid JSON document, nothing left of a longer attempt


@pytest.mark.req("R13.5")
def test_without_a_reservation_a_full_disk_raises_report_not_written(
    small_tmpfs: Callable[[str, str], Path],
) -> None:
    disk = small_tmpfs("disk", "1m")
    fill_disk(disk)
    with pytest.raises(report_file.ReportNotWritten, match="report not written"):
        write_report(final_report(3), disk / "report.json")


@pytest.mark.req("R13.5")
def test_reserving_on_a_full_disk_says_why_and_keeps_the_earlier_file(
    small_tmpfs: Callable[[str, str], Path],
) -> None:
    disk = small_tmpfs("disk", "1m")
    path = disk / "report.json"
    assert report_file.reserve(path, report_file.placeholder("r"), 16 << 10) == ""
    fill_disk(disk)
    why = report_file.reserve(path, report_file.placeholder("r"), 512 << 10)
    assert "no space reserved" in why
    assert path.stat().st_size == 16 << 10 and not (disk / "report.json.reserve").exists()
