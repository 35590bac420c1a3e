"""What the supervisor adds to the report: the stop, lost drills, the checkpoint list (R13.5)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from leyline import (
    CheckpointRecord,
    DrillRecord,
    EpochRecord,
    ResumeRecord,
    RollbackTier,
    RunPhase,
    RunReport,
    SnapshotManifest,
)
from leyline.checksum import xxh3
from leyline.durable import encode_header, file_name
from tolaria_trainer.drills import parse_drill
from tolaria_trainer.reconcile import (
    Death,
    check_checkpoints,
    order_drills,
    record_stop,
    record_trainer_drills,
)


def report_at(step: int, epochs_completed: int, status: int = RunPhase.Stopped) -> RunReport:
    report = RunReport(
        run_id="r",
        status=status,
        global_step=step,
        epochs_completed=epochs_completed,
        epochs_planned=10,
    )
    report.epochs.extend(
        EpochRecord(epoch=e, global_step=16 * (e + 1)) for e in range(epochs_completed)
    )
    return report


@pytest.mark.req("R13.5")
def test_a_sigint_to_tolaria_run_makes_the_report_stopped_with_exit_130() -> None:
    report = report_at(57, 3)
    report.reason = "stopped by SIGTERM at step 57 (3 of 10 epochs completed)"
    record_stop(report, [signal.SIGINT], from_trainer=True, trainer_killed=False, epochs=10)
    assert (report.status, report.exit_code) == (RunPhase.Stopped, 130)
    assert report.reason == "stopped by SIGINT at step 57 (3 of 10 epochs completed)"


@pytest.mark.req("R13.5")
def test_a_run_that_finished_before_the_signal_keeps_its_outcome() -> None:
    report = report_at(160, 10, RunPhase.Succeeded)
    record_stop(report, [signal.SIGTERM], from_trainer=True, trainer_killed=False, epochs=10)
    assert (report.status, report.exit_code) == (RunPhase.Succeeded, 0)


@pytest.mark.req("R13.5")
def test_a_killed_trainer_is_named_in_the_stop_reason_and_the_trainers_cause_is_kept() -> None:
    report = report_at(20, 1)
    report.reason = "stopped by SIGTERM at step 20 (1 of 10 epochs completed); the cause"
    record_stop(
        report,
        [signal.SIGTERM, signal.SIGTERM, signal.SIGTERM],
        from_trainer=True,
        trainer_killed=True,
        epochs=10,
    )
    assert report.exit_code == 143
    assert "; the cause; the trainer was killed after a second SIGTERM" in report.reason


@pytest.mark.req("R13.5")
def test_the_crash_drill_is_marked_fired_with_the_attempt_that_resumed() -> None:
    report = report_at(160, 10, RunPhase.Succeeded)
    report.resumes.append(
        ResumeRecord(source=RollbackTier.ROLLBACK_TIER_CRASH_RESUME, step=32, epoch=2, attempt=2)
    )
    crash, spike = parse_drill("crash@step=40"), parse_drill("loss-spike@step=10")
    record_trainer_drills(report, [spike, crash], [Death(1, -signal.SIGKILL)])
    records = {r.spec: r for r in report.drills}
    assert records["crash@step=40"].fired and records["crash@step=40"].step == 40
    assert records["crash@step=40"].epoch == 2
    assert "attempt 2 resumed from shared memory at step 32" in records["crash@step=40"].observed
    assert not records["loss-spike@step=10"].fired
    assert "not known" in records["loss-spike@step=10"].observed


@pytest.mark.req("R13.5")
def test_a_crash_drill_that_never_killed_the_trainer_is_not_marked_fired() -> None:
    report = report_at(160, 10, RunPhase.Failed)
    record_trainer_drills(report, [parse_drill("crash@step=40")], [Death(1, 1)])
    (record,) = report.drills
    assert not record.fired and "exited with code 1" in record.observed


def test_drill_records_follow_the_inject_order() -> None:
    report = RunReport()
    report.drills.extend([DrillRecord(spec="b@step=1"), DrillRecord(spec="crash@step=3")])
    drills = [parse_drill("crash@step=3"), parse_drill("nan@step=1")]
    report.drills.append(DrillRecord(spec="nan@step=1"))
    order_drills(report, drills)
    assert [r.spec for r in report.drills] == ["crash@step=3", "nan@step=1", "b@step=1"]


def write_checkpoint(directory: Path, sequence: int, epoch: int, instance: str) -> str:
    manifest = SnapshotManifest(instance_id=instance, lineage_id=instance).SerializeToString()
    data = b"x" * 64
    header = encode_header(
        manifest=manifest,
        data_length=len(data),
        data_xxh3=xxh3(data),
        sequence=sequence,
        transaction_id=b"t" * 16,
        epoch=epoch,
        global_step=16 * epoch,
        snapshot_generation=sequence,
    )
    name = file_name(sequence, epoch)
    (directory / name).write_bytes(header + manifest + data)
    return name


@pytest.mark.req("R13.5")
def test_the_checkpoint_list_names_exactly_this_instances_files_on_disk(tmp_path: Path) -> None:
    gone = CheckpointRecord(sequence=1, epoch=1, file_name=file_name(1, 1))
    kept_name = write_checkpoint(tmp_path, 3, 2, "me")
    late_name = write_checkpoint(tmp_path, 5, 3, "me")
    write_checkpoint(tmp_path, 7, 4, "someone-else")  # an earlier instance's: not ours
    report = RunReport(run_id="r")
    report.checkpoints.extend([gone, CheckpointRecord(sequence=3, epoch=2, file_name=kept_name)])
    changes = check_checkpoints(report, tmp_path, "me")
    assert [c.file_name for c in report.checkpoints] == [kept_name, late_name]
    assert report.checkpoints[1].recovered_from_file and report.checkpoints[1].epoch == 3
    assert len(changes) == 2
