"""What `tolaria run` knows that the trainer's report cannot say: the supervisor's additions to
`report.json` (R13.5).

The supervisor calls these after both children ended, on the report of the last trainer
attempt (or on a stub when no attempt wrote one):

* `record_stop`: a SIGINT/SIGTERM to `tolaria run` stopped the run: status `Stopped`, the
  signal in the reason, exit code 130/143 (the trainer only saw the SIGTERM it was sent).
* `record_trainer_drills`: drills of the first attempt that a killed attempt never reported
  (a restarted trainer gets no drills, so the last report lists none); the crash drill is
  marked fired from what the supervisor saw: the attempt died by SIGKILL and a later one
  resumed (`report.resumes`).
* `record_sidecar_drills`: drills the sidecar ran, fired when the report shows their effect.
* `check_checkpoints`: the trainer fetched the checkpoint list before the sidecar's last
  write and retention; after the sidecar stopped, files that are gone are dropped and
  checkpoint files of this instance that the list missed are added.
* `order_drills`: drill records in the order they were given to `--inject`.

Functions of the report, the supervisor's observations and the checkpoint directory; no
torch, no processes.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from leyline import (
    CheckpointRecord,
    DrillRecord,
    ResumeSource,
    RunPhase,
    RunReport,
)
from leyline.durable import checkpoint_files, read_checkpoint_file
from tolaria_trainer.drills import (
    CHECKPOINT_IO_ERROR,
    CORRUPT_CHECKPOINT,
    CRASH,
    SLOW_CHECKPOINT,
    DrillSpec,
)
from tolaria_trainer.stopping import exit_code_for, signal_name, stop_reason

FINAL_PHASES = frozenset({RunPhase.Succeeded, RunPhase.Failed, RunPhase.Halted, RunPhase.Suspended})
"""A trainer report with one of these ended by itself, whatever signal came after."""


@dataclass(frozen=True)
class Death:
    """A trainer attempt that ended without a final exit code (killed, crashed)."""

    attempt: int
    returncode: int
    """As `Popen.returncode`: -N for a death by signal N."""


def record_stop(
    report: RunReport,
    signals: Sequence[int],
    *,
    from_trainer: bool,
    trainer_killed: bool,
    epochs: int,
) -> None:
    """A signal to `tolaria run` stopped the run, unless the trainer had already finished
    (`from_trainer`: its own final report) — then the report stays as it is."""
    if not signals or (from_trainer and report.status in FINAL_PHASES):
        return
    first = signals[0]
    causes = []
    if from_trainer and report.status == RunPhase.Stopped and "; " in report.reason:
        causes.append(report.reason.split("; ", 1)[1])  # what the trainer saw (stopping.py)
    if trainer_killed:
        causes.append(
            f"the trainer was killed after a second {signal_name(first)} "
            "(its step in progress and its own report abandoned)"
        )
    cause = "; ".join(causes)
    report.status = RunPhase.Stopped
    report.exit_code = exit_code_for(first)
    report.reason = stop_reason(
        first,
        global_step=report.global_step,
        epochs_completed=report.epochs_completed,
        epochs=report.epochs_planned or epochs,
        cause=cause,
    )


def _epoch_of(report: RunReport, step: int) -> int:
    """The epoch `step` belongs to, from the epoch records (their steps are epoch ends)."""
    for record in report.epochs:
        if record.global_step >= step:
            return int(record.epoch)
    return int(report.epochs[-1].epoch) + 1 if report.epochs else 0


def _resumed(report: RunReport, after_attempt: int) -> str:
    for resume in report.resumes:
        if resume.attempt > after_attempt:
            source = (
                f"checkpoint {resume.checkpoint_id}"
                if resume.origin == ResumeSource.RESUME_SOURCE_CHECKPOINT
                else "shared memory"
            )
            return (
                f"attempt {resume.attempt} resumed from {source} at step {resume.step} "
                f"(epoch {resume.epoch}) in {resume.restore_ms:.1f} ms"
            )
    return ""


def record_trainer_drills(
    report: RunReport, drills: Sequence[DrillSpec], deaths: Sequence[Death]
) -> None:
    """Adds a record for every trainer drill the report does not list (see the module
    docstring); drills only the first attempt got."""
    listed = {record.spec for record in report.drills}
    first = next((d for d in deaths if d.attempt == 1), None)
    for drill in drills:
        if drill.raw in listed:
            continue
        record = report.drills.add(spec=drill.raw)
        if first is None:
            record.observed = "did not fire (the first attempt's report does not list it)"
            continue
        how = (
            f"died by {signal_name(-first.returncode)}"
            if first.returncode < 0
            else f"exited with code {first.returncode}"
        )
        if drill.kind.name != CRASH:
            record.observed = (
                f"given to attempt 1, which {how} before writing its report: "
                "whether it fired is not known"
            )
            continue
        if first.returncode != -signal.SIGKILL:
            record.observed = f"did not fire: attempt 1 {how}"
            continue
        record.fired = True
        record.step = drill.at
        record.epoch = _epoch_of(report, drill.at)
        resumed = _resumed(report, 1) or "no later attempt resumed"
        record.observed = f"attempt 1 {how} after step {drill.at}; {resumed}"


def record_sidecar_drills(
    report: RunReport, drills: Sequence[DrillSpec], sidecar_restarts: int
) -> None:
    """Drills the sidecar ran: fired when the report shows their effect."""
    latest = report.checkpoints[-1].checkpoint_id if report.checkpoints else "none"
    for drill in drills:
        record = report.drills.add(spec=drill.raw)
        if drill.kind.name == CHECKPOINT_IO_ERROR:
            failures = [f for f in report.checkpoint_failures if f.epoch == drill.at]
            if not failures:
                record.observed = "did not fire (no checkpoint was written for that epoch)"
                continue
            record.fired = True
            record.epoch = drill.at
            record.step = failures[0].global_step
            record.observed = (
                f"checkpoint of epoch {drill.at} failed ({failures[0].error}); "
                f"training went on, later checkpoints committed; latest {latest}"
            )
        elif drill.kind.name == CORRUPT_CHECKPOINT:
            suffix = f"-e{drill.at}.bin"
            refused = [r for r in report.checkpoint_rejections if r.file_name.endswith(suffix)]
            if not refused:
                record.observed = (
                    "no load rejected it (no full rollback needed that checkpoint, or it was "
                    "never written)"
                )
                continue
            record.fired = True
            record.epoch = drill.at
            record.step = refused[0].global_step
            record.observed = f"{refused[0].file_name} rejected at load: {refused[0].reason}"
        elif drill.kind.name == SLOW_CHECKPOINT:
            late = [c for c in report.checkpoints if c.epoch == drill.at]
            if not late:
                record.observed = "did not fire (no checkpoint of that epoch is on disk)"
                continue
            record.fired = True
            record.epoch = drill.at
            record.step = late[0].global_step
            record.observed = (
                f"checkpoint of epoch {drill.at} ({late[0].file_name}) committed late; "
                "the report's checkpoint list was checked against the directory"
            )
    if sidecar_restarts:
        for record in report.drills:
            if record.spec.startswith("sidecar-crash") and record.fired:
                record.observed += f"; sidecar restarted {sidecar_restarts}x, slots re-attached"


def order_drills(report: RunReport, drills: Sequence[DrillSpec]) -> None:
    """Puts the drill records in `--inject` order (records for other specs last)."""
    by_spec: dict[str, list[DrillRecord]] = {}
    for record in report.drills:
        copy = DrillRecord()
        copy.CopyFrom(record)
        by_spec.setdefault(record.spec, []).append(copy)
    ordered = [by_spec[d.raw].pop(0) for d in drills if by_spec.get(d.raw)]
    ordered += [r for records in by_spec.values() for r in records]
    del report.drills[:]
    report.drills.extend(ordered)


def check_checkpoints(report: RunReport, directory: Path, instance_id: str) -> list[str]:
    """Makes `report.checkpoints` name exactly this instance's checkpoint files on disk.

    Drops records whose file is gone (retention ran after the list was taken), adds files of
    this instance that verify alone but were missing from the list (committed after it was
    taken; marked `recovered_from_file`). Returns one line per change, for the log.
    """
    changes = []
    kept = []
    for record in report.checkpoints:
        if (directory / record.file_name).is_file():
            kept.append(record)
        else:
            changes.append(f"{record.file_name}: listed, no longer on disk: dropped")
    listed = {record.file_name for record in kept}
    for path in sorted(checkpoint_files(directory), key=lambda p: p.name):
        if path.name in listed:
            continue
        found = read_checkpoint_file(path, verify_data=False)
        manifest, header = found.manifest, found.header
        if not found.ok or manifest is None or header is None:
            continue
        if manifest.instance_id != instance_id:
            continue  # an earlier instance's (a --resume source): not written by this run
        kept.append(
            CheckpointRecord(
                version=1,
                checkpoint_id=f"{report.run_id}/{header.sequence:010d}",
                sequence=header.sequence,
                transaction_id=header.transaction_id,
                epoch=header.epoch,
                global_step=header.global_step,
                file_name=path.name,
                payload_bytes=header.data_length,
                snapshot_generation=header.snapshot_generation,
                run_id=report.run_id,
                instance_id=manifest.instance_id,
                lineage_id=manifest.lineage_id,
                recovered_from_file=True,
            )
        )
        changes.append(f"{path.name}: on disk, missing from the list: added")
    kept.sort(key=lambda r: r.sequence)
    del report.checkpoints[:]
    report.checkpoints.extend(kept)
    return changes
