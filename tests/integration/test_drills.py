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


@pytest.mark.req("R13.5")
def test_the_crash_drill_is_in_the_report_marked_fired_with_the_attempt_that_resumed(
    drill: Any,
) -> None:
    done = drill(
        small_manifest("crashdrill", epochs=4),
        "--inject",
        "crash@step=40",
        "--inject",
        "checkpoint-io-error@epoch=1",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = done.report
    assert [d["spec"] for d in report["drills"]] == ["crash@step=40", "checkpoint-io-error@epoch=1"]
    crash = report["drills"][0]
    assert crash["fired"] and (crash["step"], crash["epoch"]) == (40, 2)
    assert "attempt 1 died by SIGKILL after step 40" in crash["observed"]
    assert "attempt 2 resumed from shared memory" in crash["observed"]


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
    assert report["sidecar_restarts"] == 1


@pytest.mark.req("R8.2")
def test_while_the_sidecar_is_down_the_run_is_degraded_and_healthy_again_after(
    drill: Any,
) -> None:
    # an epoch takes ~40 ms and a sidecar restart ~1 s (more under load): 200 epochs leave
    # the restarted sidecar time to answer well before the end
    done = drill(small_manifest("degraded", epochs=200), "--inject", "sidecar-crash@step=20")
    assert done.returncode == 0, done.stderr[-3000:]
    epochs = done.report["epochs"]
    away = [e for e in epochs if "sidecar unreachable" in e["health_reason"]]
    assert away, [(e["health"], e["health_reason"]) for e in epochs]
    # DEGRADED at least (a breaker a loaded machine opens may make it UNHEALTHY)
    assert all(e["health"] != "HEALTH_STATUS_HEALTHY" for e in away)
    back = [e for e in epochs if e["epoch"] > away[-1]["epoch"]]
    assert back, "the sidecar was reachable again before the end"
    healthy = [e for e in back if e["health"] == "HEALTH_STATUS_HEALTHY"]
    assert healthy, [(e["health"], e["health_reason"]) for e in back]
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    shown = [
        x for x in lines if x["event"] == "epoch" and "sidecar unreachable" in x["health_reason"]
    ]
    assert shown and shown[0]["health"] != "HEALTH_STATUS_HEALTHY"
    packets = (done.workdir / "degraded" / "telemetry.jsonl").read_text().splitlines()
    health = [json.loads(p).get("systemHealth", {}) for p in packets]
    assert any("sidecar unreachable" in h.get("summary", "") for h in health)


@pytest.mark.req("R13.5")
def test_the_report_names_only_checkpoints_on_disk_even_when_the_last_one_commits_late(
    drill: Any,
) -> None:
    done = drill(small_manifest("late", epochs=6), "--inject", "slow-checkpoint@epoch=6,seconds=2")
    assert done.returncode == 0, done.stderr[-3000:]
    report = done.report
    directory = done.workdir / "late" / "checkpoints"
    on_disk = sorted(p.name for p in directory.glob("ckpt-*.bin"))
    assert sorted(c["file_name"] for c in report["checkpoints"]) == on_disk
    assert report["checkpoints"][-1]["epoch"] == 6, "the late last checkpoint is listed"
    (record,) = report["drills"]
    assert record["fired"] and record["epoch"] == 6


@pytest.mark.req("R13.5")
def test_checkpoints_a_full_rollback_rejected_are_in_the_report(drill: Any) -> None:
    # every snapshot is corrupted after step 45 and step 46 explodes: the fast tier rejects them
    # all, the full tier loads the newest checkpoint, which is damaged on disk, rejects it and
    # restores the next older one
    done = drill(
        small_manifest("rejected", epochs=4),
        "--inject",
        "corrupt-checkpoint@epoch=2",
        "--inject",
        "corrupt-snapshot@step=45,all=1",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = done.report
    full = [r for r in report["rollbacks"] if r["tier"] == "ROLLBACK_TIER_FULL"]
    assert full and full[0]["outcome"] == "ROLLBACK_OUTCOME_SUCCEEDED"
    rejected = report["checkpoint_rejections"]
    assert rejected and all("xxh3" in r["reason"] for r in rejected)
    assert {r["epoch"] for r in rejected} <= {2, 3}
    fired = [d for d in report["drills"] if d["spec"].startswith("corrupt-checkpoint")]
    assert any(d["fired"] and "rejected at load" in d["observed"] for d in fired)


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
