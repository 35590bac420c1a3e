"""The shipped alerting rules: promtool accepts them, their unit tests pass, every alert has a
severity, a summary, a description and a runbook section that exists, and every alert has a
promtool case that fires and one that stays silent."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "charts/tolaria/files/prometheus/tolaria-rules.yaml"
RULE_TESTS = Path(__file__).with_name("alerts.test.yaml")
RUNBOOKS = ROOT / "docs/runbooks.md"
RUNBOOK_URL = "https://github.com/tolaria-dev/tolaria/blob/main/docs/runbooks.md#"
SEVERITIES = {"critical", "warning", "info"}

promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (scripts/system-deps.sh installs it: apt prometheus)",
)


def alerts() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to
    hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=RULE_TESTS.parent,
    )


@promtool
def test_promtool_accepts_the_rule_file() -> None:
    done = run_promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr


@promtool
def test_the_promtool_unit_tests_of_every_alert_pass() -> None:
    done = run_promtool("test", "rules", RULE_TESTS.name)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_severity_a_summary_a_description_and_a_runbook_url() -> None:
    for rule in alerts():
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], rule["alert"]
        assert notes["runbook_url"] == RUNBOOK_URL + rule["alert"].lower(), rule["alert"]


def test_every_runbook_url_points_at_a_section_of_docs_runbooks() -> None:
    sections = {
        github_anchor(line.lstrip("#"))
        for line in RUNBOOKS.read_text().splitlines()
        if line.startswith("#")
    }
    for rule in alerts():
        anchor = rule["annotations"]["runbook_url"].removeprefix(RUNBOOK_URL)
        assert anchor in sections, f"{rule['alert']}: no section #{anchor} in {RUNBOOKS.name}"


def test_every_alert_has_a_promtool_case_that_fires_and_one_that_stays_silent() -> None:
    cases = [
        check
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for check in test.get("alert_rule_test", [])
    ]
    for rule in alerts():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c.get("exp_alerts") for c in mine), f"{rule['alert']}: no case that fires"
        assert any(not c.get("exp_alerts") for c in mine), f"{rule['alert']}: no silent case"
