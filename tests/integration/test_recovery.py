"""Recovery that never lies, through real `tolaria run` processes (R6, R13).

Each test reproduces something that went wrong before recovery was rebuilt: anomalies in the
first steps, runs of the same name side by side, a re-run restoring an older run, endless
rollback loops, corrupt snapshots at crash resume, and resumes that must end exactly where an
uninterrupted run ends.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from leyline.durable import checkpoint_files, read_checkpoint_file
from tests.integration.conftest import ROOT, Finished, small_manifest

TOLARIA = [sys.executable, "-m", "tolaria_trainer.cli"]

Run = Callable[..., Finished]


def _env(shm: Path) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return {**os.environ, "TOLARIA_SHM_DIR": str(shm), "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def _command(manifest: Path, workdir: Path, flags: tuple[str, ...]) -> list[str]:
    return [
        *TOLARIA,
        "run",
        str(manifest),
        "--workdir",
        str(workdir),
        "--log-format",
        "json",
        *flags,
    ]


@pytest.fixture
def shm(tmp_path: Path) -> Path:
    directory = tmp_path / "shm"
    directory.mkdir()
    return directory


@pytest.fixture
def run(tmp_path: Path, shm: Path) -> Run:
    """`tolaria run` in a private shared-memory directory; checks nothing is left in it."""

    def start(doc: dict[str, Any], *flags: str, workdir: Path | None = None) -> Finished:
        name = doc["metadata"]["name"]
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        workdir = workdir or tmp_path / "runs"
        done = subprocess.run(
            _command(path, workdir, flags),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
            env=_env(shm),
            check=False,
        )
        assert list(shm.iterdir()) == [], "the run left shared memory behind"
        return Finished(done.returncode, done.stdout, done.stderr, workdir, name)

    return start


def final_state_digest(done: Finished) -> int:
    """The data digest of the run's last checkpoint (model, optimizer and RNG states)."""
    for path in checkpoint_files(done.workdir / done.name / "checkpoints"):
        checked = read_checkpoint_file(path)
        assert checked.ok, checked.error
        assert checked.header is not None
        return checked.header.data_xxh3
    raise AssertionError("no checkpoint")


def losses(report: dict[str, Any]) -> list[tuple[int, float, float]]:
    return [(e["epoch"], e["training_loss"], e["validation_loss"]) for e in report["epochs"]]


# -- item 1: every anomaly from the first steps on has a target --------------------------------


@pytest.mark.req("R13.4")
@pytest.mark.parametrize("drill", ["loss-spike@step=5", "loss-spike@step=9", "nan@step=6"])
def test_an_anomaly_in_the_first_steps_rolls_back_to_the_step_zero_baseline(
    run: Run, drill: str
) -> None:
    done = run(small_manifest("early", epochs=2), "--inject", drill)
    assert done.returncode == 0, done.stderr[-3000:]
    report = done.report
    assert report["status"] == "Succeeded" and report["epochs_completed"] == 2
    (rollback,) = report["rollbacks"]
    assert rollback["tier"] == "ROLLBACK_TIER_FAST"
    assert rollback["outcome"] == "ROLLBACK_OUTCOME_SUCCEEDED" and rollback.get("to_step", 0) == 0
    (decision,) = report["decisions"]
    assert decision["action"] == "RECOVERY_ACTION_ROLL_BACK"


@pytest.mark.req("R6.2")
def test_a_corrupt_newest_snapshot_is_skipped_for_an_older_one(run: Run) -> None:
    done = run(small_manifest("older", epochs=3), "--inject", "corrupt-snapshot@step=20")
    assert done.returncode == 0, done.stderr[-3000:]
    report = done.report
    (rollback,) = report["rollbacks"]
    assert rollback["tier"] == "ROLLBACK_TIER_FAST" and rollback["rejected_slots"]
    assert rollback["outcome"] == "ROLLBACK_OUTCOME_SUCCEEDED"
    assert rollback.get("to_step", 0) < 16, "the corrupt epoch-end snapshot was not restored"


# -- item 2: runs with any names side by side ----------------------------------------------------


@pytest.mark.req("R13.1")
@pytest.mark.parametrize("layout", ["same name, two workdirs", "a name and its prefix"])
def test_two_runs_side_by_side_with_crash_and_spike_drills_both_succeed(
    tmp_path: Path, shm: Path, layout: str
) -> None:
    if layout == "same name, two workdirs":
        runs = [("twin", tmp_path / "a"), ("twin", tmp_path / "b")]
    else:
        runs = [("x", tmp_path / "runs"), ("x-2", tmp_path / "runs")]
    procs = []
    for (name, workdir), drill in zip(runs, ("crash@step=20", "loss-spike@step=30"), strict=True):
        path = tmp_path / f"{name}-{workdir.name}.yaml"
        path.write_text(yaml.safe_dump(small_manifest(name, epochs=4)))
        flags = ("--inject", drill, "--inject", "crash@step=44")
        procs.append(
            subprocess.Popen(
                _command(path, workdir, flags),
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_env(shm),
            )
        )
    for proc, (name, workdir) in zip(procs, runs, strict=True):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        report = Finished(0, "", "", workdir, name).report
        assert report["status"] == "Succeeded" and report["epochs_completed"] == 4
        assert report["restarts"] >= 1
        assert all(r["origin"] == "RESUME_SOURCE_SHARED_MEMORY" for r in report["resumes"])
    reports = [Finished(0, "", "", w, n).report for n, w in runs]
    assert reports[0]["instance_id"] != reports[1]["instance_id"]
    assert list(shm.iterdir()) == []


# -- item 3: a re-run never restores another run -------------------------------------------------


@pytest.mark.req("R13.1")
def test_a_run_directory_holding_an_earlier_runs_checkpoints_is_refused(run: Run) -> None:
    first = run(small_manifest("again", epochs=2))
    assert first.returncode == 0, first.stderr[-3000:]
    before = first.report_path.read_bytes()
    again = run(small_manifest("again", epochs=2, optimizer={"lr": 0.006}))
    assert again.returncode == 2
    assert "--resume" in again.stderr and "--fresh" in again.stderr
    assert again.report_path.read_bytes() == before, "the earlier run was left as it was"


@pytest.mark.req("R13.1")
def test_resume_with_another_training_section_is_refused_naming_the_field(run: Run) -> None:
    assert run(small_manifest("changed", epochs=2)).returncode == 0
    done = run(small_manifest("changed", epochs=2, optimizer={"lr": 0.006}), "--resume")
    assert done.returncode == 2
    assert "spec.training.optimizer.lr: 0.003 in the checkpoint, 0.006 now" in done.stderr


@pytest.mark.req("R13.1")
def test_fresh_moves_the_earlier_run_aside_and_starts_over(run: Run, tmp_path: Path) -> None:
    first = run(small_manifest("over", epochs=2)).report
    done = run(small_manifest("over", epochs=2, optimizer={"lr": 0.006}), "--fresh")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.report["instance_id"] != first["instance_id"]
    assert done.report["epochs"][0]["global_step"] == 16, "trained from step 0"
    (aside,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("over.")]
    assert (aside / "report.json").exists()


# -- item 4: no rollback loops --------------------------------------------------------------------


@pytest.mark.req("R13.3")
@pytest.mark.parametrize("policy", ["skip", "replay"])
def test_a_poisoned_sample_is_quarantined_and_the_run_ends_on_its_own(
    run: Run, policy: str
) -> None:
    doc = small_manifest("poison", epochs=6, task="tests.integration.recovery_tasks:poisoned")
    doc["spec"]["rollback"] = {"replayPolicy": policy}
    done = run(doc)
    assert done.returncode == 0, done.stderr[-3000:]
    report = done.report
    assert report["status"] == "Succeeded" and report["epochs_completed"] == 6
    assert 1 <= len(report["rollbacks"]) <= 2 * 3  # within 2 x maxPerEpoch
    assert 123 in [int(s) for s in report["quarantined_samples"]]
    assert report["decisions"][-1]["window_policy"] == "REPLAY_POLICY_SKIP"
    assert all(e["training_loss"] == e["training_loss"] for e in report["epochs"])  # no NaN


@pytest.mark.req("R13.3")
def test_a_deterministic_accuracy_collapse_halts_within_two_epochs_of_budget(run: Run) -> None:
    doc = small_manifest("collapse", epochs=8, task="tests.integration.recovery_tasks:collapsing")
    done = run(doc)
    assert done.returncode == 3, done.stderr[-3000:]
    report = done.report
    assert report["status"] == "Halted"
    assert 2 <= len(report["rollbacks"]) <= 2 * 3
    last = report["decisions"][-1]
    assert last["action"] == "RECOVERY_ACTION_HALT"
    assert last["kind"] == "ANOMALY_KIND_ROLLBACK_LOOP" and "budget" in last["reason"]
    skipped = {w["epoch"] for w in report["skipped_batches"]}
    assert 2 in skipped, "the epoch that collapsed twice was skipped before the run halted"


# -- items 5 and 6: a failed restore leaves live state alone; crash resume uses disk ------------


@pytest.mark.req("R13.2")
def test_a_crash_with_every_snapshot_corrupt_resumes_from_the_newest_checkpoint(
    run: Run,
) -> None:
    done = run(
        small_manifest("disk", epochs=3),
        "--inject",
        "corrupt-snapshot@step=20,spike=0,all=1",
        "--inject",
        "crash@step=21",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = done.report
    assert report["status"] == "Succeeded" and report["restarts"] == 1
    (resume,) = report["resumes"]
    assert resume["origin"] == "RESUME_SOURCE_CHECKPOINT" and resume["checkpoint_id"]
    assert resume["step"] == 16 and "shared memory" in resume["detail"]
    assert report["snapshot_rejections"], "the corrupt slots are in the report"


@pytest.mark.req("R13.2")
def test_a_corrupt_snapshot_drill_waits_for_a_slow_disk_before_it_strikes(run: Run) -> None:
    """The step-16 checkpoint starts 3 s late: striking at once would leave nothing on disk
    (a fresh start), which is not what the drill is for."""
    done = run(
        small_manifest("slowdisk", epochs=3),
        "--inject",
        "slow-checkpoint@epoch=1,seconds=3",
        "--inject",
        "corrupt-snapshot@step=18,spike=0,all=1",
        "--inject",
        "crash@step=19",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = done.report
    (resume,) = report["resumes"]
    assert resume["origin"] == "RESUME_SOURCE_CHECKPOINT" and resume["step"] == 16


# -- resumes end bit-identical to an uninterrupted run (CPU) ---------------------------------


@pytest.mark.req("R6.2")
@pytest.mark.parametrize(
    "interruption",
    ["crash@step=40", "sidecar-crash@step=20", "corrupt-snapshot@step=20,spike=0,all=1"],
)
def test_an_interrupted_run_ends_bit_identical_to_an_uninterrupted_one(
    run: Run, tmp_path: Path, interruption: str
) -> None:
    baseline = run(small_manifest("same", epochs=4), workdir=tmp_path / "clean")
    assert baseline.returncode == 0, baseline.stderr[-3000:]
    flags = ["--inject", interruption]
    if interruption.startswith("corrupt"):
        flags += ["--inject", "crash@step=21"]
    done = run(small_manifest("same", epochs=4), *flags, workdir=tmp_path / "hit")
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(done.report) == losses(baseline.report)
    assert final_state_digest(done) == final_state_digest(baseline)


@pytest.mark.req("R6.2")
def test_a_run_resumed_with_resume_ends_bit_identical_to_an_uninterrupted_one(
    run: Run, tmp_path: Path
) -> None:
    baseline = run(small_manifest("cont", epochs=4), workdir=tmp_path / "clean")
    doc = small_manifest("cont", epochs=4)
    doc["spec"]["restarts"] = {"limit": 0}
    broken = run(doc, "--inject", "crash@step=40", workdir=tmp_path / "hit")
    assert broken.returncode == 1, "the crash used up the restart limit"
    broken_instance = broken.report["instance_id"]
    done = run(doc, "--resume", workdir=tmp_path / "hit")
    assert done.returncode == 0, done.stderr[-3000:]
    report = done.report
    (resume,) = report["resumes"]
    assert resume["origin"] == "RESUME_SOURCE_CHECKPOINT"
    assert report["lineage_id"] == broken_instance
    assert report["resumed_from"]
    assert final_state_digest(done) == final_state_digest(baseline)
    assert losses(report) == losses(baseline.report)


@pytest.mark.req("R13.4")
def test_with_nothing_to_restore_the_run_halts_at_once_saying_why(run: Run) -> None:
    doc = small_manifest("nothing", epochs=3)
    doc["spec"]["snapshots"] = {"enabled": False}
    doc["spec"]["checkpoints"] = {"everyEpochs": 0}
    done = run(doc, "--inject", "loss-spike@step=20")
    assert done.returncode == 3, done.stderr[-3000:]
    report = done.report
    assert report["status"] == "Halted"
    assert "no valid state before step 20" in report["reason"]
    (decision,) = report["decisions"]
    assert decision["kind"] == "ANOMALY_KIND_NO_ROLLBACK_TARGET"
    assert report["wall_seconds"] < 30, "halted at once, not after the CRITICAL timeout"
