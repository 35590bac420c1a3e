"""Fire drills through `tolaria run`: real supervisor, sidecar and trainer processes (R6, R7)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import Finished, small_manifest

TOLARIA = [sys.executable, "-m", "tolaria_trainer.cli"]


@pytest.fixture
def drill(tmp_path: Path):
    """Runs `tolaria run` with drills in an isolated shm directory; checks nothing is left."""
    shm = tmp_path / "shm"
    shm.mkdir()

    def run(doc: dict[str, Any], *flags: str) -> Finished:
        path = tmp_path / f"{doc['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(doc))
        workdir = tmp_path / "runs"
        env = {**os.environ, "TOLARIA_SHM_DIR": str(shm), "PYTHONUNBUFFERED": "1"}
        done = subprocess.run(
            [*TOLARIA, "run", str(path), "--workdir", str(workdir), "--log-format", "json", *flags],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
            check=False,
        )
        assert list(shm.iterdir()) == [], "the run left shared memory behind"
        return Finished(done.returncode, done.stdout, done.stderr, workdir, doc["metadata"]["name"])

    return run


def phases_ms(rollback: dict[str, Any]) -> dict[str, float]:
    return {p["phase"]: p["elapsed_ns"] / 1e6 for p in rollback["phases"]}


@pytest.mark.req("R6.1")
def test_loss_spike_rolls_back_once_within_the_phase_budgets_and_continues(drill: Any) -> None:
    done = drill(small_manifest("spike", epochs=4), "--inject", "loss-spike@step=40")
    assert done.returncode == 0, done.stderr[-3000:]
    report = done.report
    assert report["status"] == "Succeeded"
    (rollback,) = report["rollbacks"]
    assert (
        rollback["tier"] == "ROLLBACK_TIER_FAST"
        and rollback["outcome"] == "ROLLBACK_OUTCOME_SUCCEEDED"
    )
    assert rollback["reason"] == "ANOMALY_KIND_LOSS_EXPLOSION" and rollback["from_step"] == 40
    assert rollback["to_step"] < 40
    p = phases_ms(rollback)
    assert p["ROLLBACK_PHASE_PREPARE"] <= 150 and p["ROLLBACK_PHASE_COMMIT"] <= 250
    assert p["ROLLBACK_PHASE_CONFIRM"] <= 100
    assert rollback["skipped"]["last_batch"] >= rollback["skipped"]["first_batch"]
    assert report["epochs_completed"] == 4
    (emergency,) = report["emergencies"]
    assert emergency["signal"]["level"] == "EMERGENCY_LEVEL_SEVERE"
    assert emergency["final_state"] == "EMERGENCY_STATE_RESOLVED"


@pytest.mark.req("R6.1a")
def test_with_the_reshuffle_policy_a_loss_spike_window_is_reshuffled_not_skipped(
    drill: Any,
) -> None:
    doc = small_manifest("reshuffle", epochs=4)
    doc["spec"]["rollback"] = {"replayPolicy": "reshuffle"}
    done = drill(doc, "--inject", "loss-spike@step=40")
    assert done.returncode == 0, done.stderr[-3000:]
    report = done.report
    assert report["status"] == "Succeeded" and report["epochs_completed"] == 4
    (rollback,) = report["rollbacks"]
    assert rollback["skipped"]["policy"] == "REPLAY_POLICY_RESHUFFLE"
    steps = [e["global_step"] for e in report["epochs"]]
    assert steps[-1] == 4 * 16, "no batch was dropped: every step of every epoch ran"


@pytest.mark.req("R6.1")
def test_a_nan_loss_rolls_back_instead_of_poisoning_the_model(drill: Any) -> None:
    done = drill(small_manifest("nan", epochs=3), "--inject", "nan@step=30")
    assert done.returncode == 0, done.stderr[-3000:]
    report = done.report
    (rollback,) = report["rollbacks"]
    assert rollback["reason"] == "ANOMALY_KIND_NON_FINITE_LOSS"
    assert all(e["validation_loss"] == e["validation_loss"] for e in report["epochs"])  # no NaN


@pytest.mark.req("R6.2")
def test_a_killed_trainer_restarts_and_resumes_from_shared_memory(drill: Any) -> None:
    done = drill(small_manifest("crash", epochs=4), "--inject", "crash@step=40")
    assert done.returncode == 0, done.stderr[-3000:]
    report = done.report
    assert report["status"] == "Succeeded" and report["restarts"] == 1
    (resume,) = report["resumes"]
    assert resume["source"] == "ROLLBACK_TIER_CRASH_RESUME" and resume["attempt"] == 2
    assert 0 < resume["step"] <= 40  # from a shared-memory snapshot, not from step 0
    assert resume["restore_ms"] > 0
    assert report["epochs_completed"] == 4


@pytest.mark.req("R7.4")
def test_a_hung_trainer_is_frozen_acknowledged_and_halted_with_exit_code_3(drill: Any) -> None:
    doc = small_manifest("hang", epochs=3)
    doc["spec"]["detection"] = {"stallSeconds": 2}
    doc["spec"]["emergency"] = {"haltAfterSeconds": 2}
    done = drill(doc, "--inject", "hang@step=20")
    assert done.returncode == 3, done.stderr[-3000:]
    report = done.report
    assert report["status"] == "Halted" and report["exit_code"] == 3
    assert "unresolved" in report["reason"]
    critical = [
        e for e in report["emergencies"] if e["signal"]["level"] == "EMERGENCY_LEVEL_CRITICAL"
    ]
    assert critical and critical[0]["signal"]["kind"] == "ANOMALY_KIND_STALLED_STEP"
    acked = {a["participant"] for a in critical[0]["acks"] if a.get("frozen")}
    assert acked >= {
        "PARTICIPANT_TRAINER",
        "PARTICIPANT_KASMINA",
        "PARTICIPANT_TAMIYO",
        "PARTICIPANT_SIDECAR",
    }
    assert critical[0]["final_state"] == "EMERGENCY_STATE_HALTED"
    assert report["checkpoints"], "a final durable checkpoint was attempted"


@pytest.mark.req("R6.2")
def test_a_corrupted_snapshot_is_detected_and_skipped(drill: Any) -> None:
    done = drill(small_manifest("corrupt", epochs=3), "--inject", "corrupt-snapshot@step=40")
    assert done.returncode == 0, done.stderr[-3000:]
    report = done.report
    (rollback,) = report["rollbacks"]
    assert rollback["rejected_slots"], "the corrupted slot was not rejected"
    assert any("checksum" in r["reason"] for r in report["snapshot_rejections"])
    assert rollback["outcome"] == "ROLLBACK_OUTCOME_SUCCEEDED"


@pytest.mark.req("R6.2")
def test_training_survives_a_sidecar_crash_and_the_restarted_sidecar_reattaches(drill: Any) -> None:
    # 10 epochs: the crash at step 20 must leave the supervisor time to notice and restart
    # the sidecar before the run ends, also on a loaded machine (4 epochs raced it once)
    done = drill(small_manifest("sidecar", epochs=10), "--inject", "sidecar-crash@step=20")
    assert done.returncode == 0, done.stderr[-3000:]
    report = done.report
    assert report["status"] == "Succeeded" and report["epochs_completed"] == 10
    (record,) = report["drills"]
    assert record["fired"] and "re-attached" in record["observed"]
    assert report["checkpoints"], "the restarted sidecar kept persisting checkpoints"


@pytest.mark.req("R6.3")
def test_a_checkpoint_io_error_is_reported_and_training_goes_on(drill: Any) -> None:
    done = drill(small_manifest("ioerr", epochs=4), "--inject", "checkpoint-io-error@epoch=2")
    assert done.returncode == 0, done.stderr[-3000:]
    report = done.report
    (failure,) = report["checkpoint_failures"]
    assert failure["epoch"] == 2
    assert "ENOSPC" in failure["error"] or "No space" in failure["error"]
    assert [c["epoch"] for c in report["checkpoints"]][-1] == 4
    (record,) = report["drills"]
    assert record["fired"]


def test_interrupting_tolaria_run_leaves_nothing_behind(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(small_manifest("long", epochs=200)))
    env = {**os.environ, "TOLARIA_SHM_DIR": str(shm)}
    proc = subprocess.Popen(
        [*TOLARIA, "run", str(path), "--workdir", str(tmp_path / "runs"), "--log-format", "json"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if json.loads(line).get("event") == "epoch":
            break
    proc.send_signal(2)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-2000:]
    assert list(shm.iterdir()) == []
    report = json.loads((tmp_path / "runs" / "long" / "report.json").read_text())
    assert report["status"] == "Failed" and "signal" in report["reason"]
