"""`tolaria validate` and the input `tolaria run` refuses at the edge, as a user meets them: a
real `tolaria` process, exit 2 naming the field or flag, nothing on disk."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import ROOT, TOLARIA, small_manifest, tolaria

NO_TORCH = "raise ImportError('torch imported, but --offline promised not to')\n"


def write(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def validate(path: Path, *flags: str, env: dict[str, str] | None = None) -> Any:
    """`tolaria validate` run from the repository root, so `tests.…` tasks import."""
    return subprocess.run(
        [*TOLARIA, "validate", *flags, str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.fixture
def torch_forbidden(tmp_path: Path) -> dict[str, str]:
    """An environment in which importing torch fails: a layer that must not be reached raises."""
    poison = tmp_path / "no-torch" / "torch"
    poison.mkdir(parents=True)
    (poison / "__init__.py").write_text(NO_TORCH)
    return {"PYTHONPATH": os.pathsep.join([str(poison.parent), str(ROOT)])}


def test_validate_imports_the_task_and_refuses_a_module_that_does_not_exist(
    tmp_path: Path,
) -> None:
    done = validate(write(tmp_path, small_manifest("lost", task="no_such_module:build")))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "spec.training.task: cannot import module 'no_such_module'" in done.stderr


def test_validate_refuses_a_task_module_without_the_named_function(tmp_path: Path) -> None:
    doc = small_manifest("nofn", task="tests.trainer.user_task_example:no_such_function")
    done = validate(write(tmp_path, doc))
    assert done.returncode == 2
    assert "spec.training.task: module 'tests.trainer.user_task_example' has no attribute" in (
        done.stderr
    )


def test_validate_finds_the_task_function_without_building_the_task(tmp_path: Path) -> None:
    """Fast by contract: the task's module is imported, its function is not called (a task
    that fails while building is refused by `tolaria run`, exit 2, before training)."""
    doc = small_manifest("unbuilt", task="tests.trainer.user_task_example:broken_raises")
    done = validate(write(tmp_path, doc))
    assert done.returncode == 0, done.stderr
    assert "task tests.trainer.user_task_example:broken_raises, device cpu" in done.stdout


def test_validate_names_the_builtin_tasks_function_and_the_device(tmp_path: Path) -> None:
    done = validate(write(tmp_path, small_manifest("builtin")))
    assert done.returncode == 0, done.stderr
    assert "task synthetic-mlp = tolaria_trainer.tasks.synthetic_mlp:build_task" in done.stdout


def test_validate_refuses_cuda_on_a_machine_without_a_gpu(tmp_path: Path) -> None:
    doc = small_manifest("gpu", device="cuda")
    done = validate(write(tmp_path, doc), env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "spec.training.device: cuda requested but torch sees no CUDA device" in done.stderr


def test_validate_offline_checks_the_schema_only_and_never_imports_torch(
    tmp_path: Path, torch_forbidden: dict[str, str]
) -> None:
    doc = small_manifest("elsewhere", task="only_in_the_image:build", device="cuda")
    done = validate(write(tmp_path, doc), "--offline", env=torch_forbidden)
    assert done.returncode == 0, done.stderr
    assert "valid TolariaRun 'elsewhere' (schema only)" in done.stdout


def test_validate_offline_still_refuses_a_schema_error(
    tmp_path: Path, torch_forbidden: dict[str, str]
) -> None:
    done = validate(
        write(tmp_path, small_manifest("zero", epochs=0)), "--offline", env=torch_forbidden
    )
    assert done.returncode == 2 and "spec.training.epochs: must be >= 1" in done.stderr


def test_validate_help_says_what_it_checks(tmp_path: Path) -> None:
    done = tolaria(["validate", "--help"], cwd=tmp_path)
    text = " ".join(done.stdout.split())
    for checked in ("every field and rule", "spec.training.task", "spec.training.device"):
        assert checked in text, text
    assert "--offline" in text and "no torch" in text


TWICE = """\
apiVersion: tolaria.dev/v1alpha1
kind: TolariaRun
metadata:
  name: twice
spec:
  training:
    task: synthetic-mlp
    epochs: 50
    batchSize: 32
    epochs: 2
"""


@pytest.mark.req("R13.5")
@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_key_written_twice_exits_2_naming_its_path_and_lines(
    tmp_path: Path, command: str
) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text(TWICE)
    workdir = tmp_path / "runs"
    flags = ["--workdir", str(workdir)] if command == "run" else []
    done = tolaria([command, str(path), *flags], cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "spec.training.epochs: duplicate key at line 10 (first at line 8)" in done.stderr
    assert not workdir.exists()


@pytest.mark.req("R9.1")
@pytest.mark.parametrize("mode", [[], ["--no-sidecar"]], ids=["supervised", "no-sidecar"])
def test_profile_naming_an_epoch_the_run_never_reaches_exits_2(
    tmp_path: Path, mode: list[str]
) -> None:
    workdir = tmp_path / "runs"
    path = write(tmp_path, small_manifest("late", epochs=10))
    done = tolaria(
        ["run", str(path), "--workdir", str(workdir), "--profile", "3,12", *mode], tmp_path
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "error: --profile: epoch 12 is never reached (this run's last epoch is 9)" in done.stderr
    assert not workdir.exists()
