"""`tolaria run` as a user meets it: a real subprocess, a manifest, a report on disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from leyline import RunReport
from tests.integration.conftest import ROOT, Finished, small_manifest, tolaria
from tolaria_trainer.report import read_report


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> Finished:
    """The README's main job, run once for the whole module."""
    cwd = tmp_path_factory.mktemp("quickstart")
    shutil.copy(ROOT / "examples" / "quickstart.yaml", cwd / "quickstart.yaml")
    done = tolaria(["run", "quickstart.yaml", "--log-format", "json"], cwd=cwd)
    return Finished(done.returncode, done.stdout, done.stderr, cwd / "runs", "quickstart")


@pytest.mark.req("R1.2")
def test_quickstart_succeeds_within_the_hook_budget_and_learns(quickstart: Finished) -> None:
    assert quickstart.returncode == 0, quickstart.stderr[-3000:]
    report = quickstart.report
    assert report["status"] == "Succeeded" and report["exit_code"] == 0
    assert report["hook_latency"]["p99_ms"] <= 18.0
    assert report["validation_loss"]["last"] < 0.7 * report["validation_loss"]["first"]
    assert report["epochs_completed"] == 10


def test_quickstart_report_is_a_leyline_run_report(quickstart: Finished) -> None:
    report = read_report(quickstart.report_path)
    assert isinstance(report, RunReport) and report.run_id == "quickstart"


def test_quickstart_report_lists_every_section(quickstart: Finished) -> None:
    report = quickstart.report
    for key in (
        "global_step",
        "training_loss",
        "validation_time",
        "breaker_trips",
        "conservative_intervals",
        "lr_changes",
        "optimizer_rebuilds",
        "telemetry",
        "trace_paths",
        "rollbacks",
        "emergencies",
    ):
        assert key in report, key
    assert report["rollbacks"] == [] and report["emergencies"] == []
    assert {c["priority"] for c in report["telemetry"]} >= {
        "MESSAGE_PRIORITY_NORMAL",
        "MESSAGE_PRIORITY_CRITICAL",
    }


def test_json_log_format_prints_one_object_per_line(quickstart: Finished) -> None:
    lines = [json.loads(line) for line in quickstart.stdout.splitlines()]
    assert lines[0]["event"] == "start" and lines[-1]["event"] == "finish"
    assert [x["epoch"] for x in lines if x["event"] == "epoch"] == list(range(10))


def test_quickstart_writes_telemetry_next_to_the_report(quickstart: Finished) -> None:
    telemetry = quickstart.workdir / "quickstart" / "telemetry.jsonl"
    assert all(
        json.loads(line)["sourceSubsystem"] == "tolaria"
        for line in telemetry.read_text().splitlines()
    )


def test_an_invalid_field_exits_2_naming_it_and_creates_nothing(
    run_manifest: Any, tmp_path: Path
) -> None:
    done = run_manifest(small_manifest("bad", epochs=0))
    assert done.returncode == 2
    assert "spec.training.epochs: must be >= 1" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_an_unknown_drill_exits_2(run_manifest: Any) -> None:
    done = run_manifest(small_manifest("drill"), "--inject", "melt@epoch=1")
    assert done.returncode == 2 and "unknown drill 'melt'" in done.stderr


def test_a_drill_past_the_end_of_the_run_exits_2(run_manifest: Any) -> None:
    done = run_manifest(small_manifest("late"), "--inject", "slow-tamiyo@epoch=99")
    assert done.returncode == 2 and "never reached" in done.stderr


def test_a_missing_user_task_exits_2_naming_the_task_field(run_manifest: Any) -> None:
    done = run_manifest(small_manifest("user", task="no_such_module:build"))
    assert done.returncode == 2 and "spec.training.task" in done.stderr


@pytest.mark.req("R1.3")
def test_slow_tamiyo_drill_falls_back_enters_and_leaves_conservative_mode(
    run_manifest: Any,
) -> None:
    doc = small_manifest("slow", epochs=8)
    # Budgets 20x the defaults: a loaded machine must not breach them by itself (that would
    # open conservative intervals of its own); the drill's 1 s Tamiyo still overruns its deadline.
    doc["spec"]["budgets"] = {
        "hookMs": 360,
        "assemblyMs": 70,
        "tamiyoMs": 240,
        "commandMs": 30,
        "guardMs": 20,
        "lrStepMs": 100,
        "lrGuardMs": 40,
    }
    done = run_manifest(doc, "--inject", "slow-tamiyo@epoch=2")
    assert done.returncode == 0, done.stderr[-3000:]
    report = done.report
    assert report["status"] == "Succeeded"
    epoch2 = report["epochs"][2]
    assert epoch2["fallback_command"] and "deadline" in epoch2["fallback_reason"]
    assert report["fallback_commands"] == 1
    (interval,) = report["conservative_intervals"]
    assert interval["entered_epoch"] == 2 and interval["exited"] and interval["exited_epoch"] == 5
    assert report["drills"][0]["fired"]
    assert report["hook_latency"]["max_ms"] < 500


@pytest.mark.req("R3.2")
def test_lr_tamper_drill_is_detected_and_does_not_crash(run_manifest: Any) -> None:
    done = run_manifest(small_manifest("tamper", epochs=3), "--inject", "lr-tamper@step=20")
    assert done.returncode == 0, done.stderr[-3000:]
    report = done.report
    assert report["lr_integrity_breaches"] == 1
    breaker = next(b for b in report["breakers"] if b["breaker"] == "BREAKER_LR_INTEGRITY")
    assert breaker["failures"] == 1
    assert any(c["source"] == "LR_CHANGE_SOURCE_INTEGRITY_RESTORE" for c in report["lr_changes"])
    assert report["conservative_intervals"][0]["reason"].startswith("BREAKER_LR_INTEGRITY")


@pytest.mark.req("R9.1")
def test_profile_flag_writes_a_chrome_trace_with_hook_ranges(run_manifest: Any) -> None:
    done = run_manifest(small_manifest("prof", epochs=2), "--profile", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = done.report["trace_paths"]
    trace = json.loads(Path(path).read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {
        "tolaria/forward",
        "tolaria/backward",
        "tolaria/optimizer_step",
        "tolaria/lr_update",
        "tolaria/tamiyo_eval",
        "tolaria/kasmina_apply",
    } <= names


def test_validate_accepts_every_example(tmp_path: Path) -> None:
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        done = tolaria(["validate", str(path)], cwd=tmp_path)
        assert done.returncode == 0, (path, done.stderr)


def test_validate_refuses_a_bad_manifest_with_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "apiVersion: tolaria.dev/v1alpha1\nkind: TolariaRun\nmetadata: {name: b}\n"
        "spec: {training: {task: synthetic-mlp}, budgets: {hookMs: -1}}\n"
    )
    done = tolaria(["validate", str(path)], cwd=tmp_path)
    assert done.returncode == 2 and "spec.budgets.hookMs: must be > 0.0" in done.stderr


def test_drills_lists_every_drill(tmp_path: Path) -> None:
    done = tolaria(["drills"], cwd=tmp_path)
    assert "slow-tamiyo@epoch=N" in done.stdout and "lr-tamper@step=N" in done.stdout
