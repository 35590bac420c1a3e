"""Integration fixtures: `tolaria` as a real subprocess, small manifests, parsed reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TOLARIA = [sys.executable, "-m", "tolaria_trainer.cli"]


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    workdir: Path
    name: str

    @property
    def report_path(self) -> Path:
        return self.workdir / self.name / "report.json"

    @property
    def report(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.report_path.read_text())
        return loaded


def tolaria(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [*TOLARIA, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def small_manifest(name: str, **training: Any) -> dict[str, Any]:
    """A run that takes a few seconds: small data, few steps."""
    spec_training: dict[str, Any] = {
        "task": "synthetic-mlp",
        "epochs": 8,
        "batchSize": 64,
        "data": {"trainSamples": 1024, "validationSamples": 256},
        "model": {"hiddenSize": 32},
    }
    spec_training.update(training)
    return {
        "apiVersion": "tolaria.dev/v1alpha1",
        "kind": "TolariaRun",
        "metadata": {"name": name},
        "spec": {"training": spec_training},
    }


@pytest.fixture
def run_manifest(tmp_path: Path):
    def run(doc: dict[str, Any], *flags: str) -> Finished:
        path = tmp_path / f"{doc['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(doc))
        workdir = tmp_path / "runs"
        done = tolaria(
            ["run", str(path), "--workdir", str(workdir), "--log-format", "json", *flags],
            cwd=tmp_path,
        )
        return Finished(done.returncode, done.stdout, done.stderr, workdir, doc["metadata"]["name"])

    return run
