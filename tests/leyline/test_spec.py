"""The TolariaRun spec: defaults pinned to R12, and refusals that name the field and the rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from leyline import LrShape, OptimizerKind
from leyline.spec import (
    BreakerSpec,
    BudgetsSpec,
    ConservativeSpec,
    ManifestInvalid,
    TamiyoSpec,
    TolariaRun,
    TolariaRunSpec,
    TrainingSpec,
    load_manifest,
    validate_manifest,
)

ROOT = Path(__file__).resolve().parents[2]


TASK = "synthetic-mlp"


def manifest(spec: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    """A manifest whose training section names `TASK` unless `spec` names a task."""
    spec = dict(spec or {})
    spec["training"] = {"task": TASK, **spec.get("training", {})}
    doc: dict[str, Any] = {
        "apiVersion": "tolaria.dev/v1alpha1",
        "kind": "TolariaRun",
        "metadata": {"name": "unit"},
        "spec": spec,
    }
    doc.update(top)
    return doc


def refusal(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ManifestInvalid) as info:
        validate_manifest(doc)
    return [str(e) for e in info.value.errors]


@pytest.mark.req("R12")
def test_hook_budget_defaults_are_the_design_numbers() -> None:
    b = BudgetsSpec()
    assert (b.hook_ms, b.assembly_ms, b.tamiyo_ms, b.command_ms, b.guard_ms) == (
        18.0,
        3.5,
        12.0,
        1.5,
        1.0,
    )
    assert b.tamiyo_ceiling_seconds == 2.0
    assert (b.lr_step_ms, b.lr_guard_ms) == (5.0, 2.0)


@pytest.mark.req("R12")
def test_breaker_defaults_are_three_failures_thirty_seconds_one_trial() -> None:
    b = BreakerSpec()
    assert (b.failure_threshold, b.cooldown_seconds, b.half_open_trials) == (3, 30.0, 1)


@pytest.mark.req("R2.3")
def test_conservative_mode_exits_after_three_clean_epochs_by_default() -> None:
    assert ConservativeSpec().exit_clean_epochs == 3


def test_tamiyo_defaults_cut_the_lr_in_half_after_a_three_epoch_plateau() -> None:
    t = TamiyoSpec()
    assert (t.plateau_epochs, t.lr_cut_factor) == (3, 0.5)


def minimal_spec() -> TolariaRunSpec:
    return TolariaRunSpec(training=TrainingSpec(task=TASK))


def test_a_spec_naming_only_its_task_gets_every_default() -> None:
    run = validate_manifest(manifest())
    assert run.spec == minimal_spec()
    assert run.spec.training.optimizer.kind == OptimizerKind.adamw
    assert run.spec.training.schedule.shape == LrShape.cosine


def test_enum_fields_serialise_back_to_their_names() -> None:
    dumped = minimal_spec().model_dump()
    assert dumped["training"]["optimizer"]["kind"] == "adamw"
    assert dumped["training"]["device"] == "auto"


def test_spec_keys_are_camel_case() -> None:
    dumped = minimal_spec().model_dump()
    assert "gradientAccumulationSteps" in dumped["training"]
    assert "hookMs" in dumped["budgets"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"training": {"epochs": 0}}, "spec.training.epochs: must be >= 1"),
        ({"training": {"batchSize": -3}}, "spec.training.batchSize: must be >= 1"),
        ({"training": {"epochs": "ten"}}, "spec.training.epochs: must be an integer"),
        (
            {"training": {"optimizer": {"kind": "lion"}}},
            "spec.training.optimizer.kind: must be one of: sgd, adam, adamw, rmsprop",
        ),
        ({"training": {"optimizer": {"lr": 0}}}, "spec.training.optimizer.lr: must be > 0.0"),
        ({"training": {"task": "not a task"}}, "spec.training.task: must match"),
        ({"trainnig": {}}, "spec.trainnig: unknown field"),
        (
            {"budgets": {"tamiyoMs": 30}},
            "spec.budgets.hookMs: must be >= assemblyMs + tamiyoMs + commandMs + guardMs",
        ),
        ({"budgets": {"lrGuardMs": 9}}, "spec.budgets.lrGuardMs: must be <= lrStepMs"),
        ({"breakers": {"failureThreshold": 0}}, "spec.breakers.failureThreshold: must be >= 1"),
        (
            {"training": {"schedule": {"shape": "seed_warmup"}}},
            "spec.training.schedule.shape: seed_warmup is reserved for seed groups",
        ),
        ({"profiler": {"epochs": [1, -2]}}, "spec.profiler.epochs: must be >= 0"),
    ],
)
def test_invalid_field_is_refused_naming_field_and_rule(
    spec: dict[str, Any], expected: str
) -> None:
    assert any(line.startswith(expected) for line in refusal(manifest(spec))), refusal(
        manifest(spec)
    )


@pytest.mark.req("R10.1")
def test_a_training_section_without_a_task_is_refused_naming_spec_training_task() -> None:
    doc = manifest({"training": {"epochs": 3}})
    del doc["spec"]["training"]["task"]
    assert refusal(doc) == ["spec.training.task: is required"]


@pytest.mark.req("R10.1")
def test_a_spec_without_a_training_section_is_refused_naming_spec_training() -> None:
    doc = manifest()
    del doc["spec"]["training"]
    assert refusal(doc) == ["spec.training: is required"]


def test_a_manifest_without_a_spec_is_refused_naming_spec() -> None:
    doc = manifest()
    del doc["spec"]
    assert refusal(doc) == ["spec: is required"]


def test_wrong_kind_is_refused() -> None:
    assert refusal(manifest(kind="TrainJob")) == ["kind: must be 'TolariaRun'"]


def test_missing_name_is_refused() -> None:
    doc = manifest()
    doc["metadata"] = {}
    assert refusal(doc) == ["metadata.name: is required"]


def test_name_that_is_not_a_dns_label_is_refused() -> None:
    doc = manifest()
    doc["metadata"] = {"name": "Bad_Name"}
    assert refusal(doc)[0].startswith("metadata.name: must match")


def test_every_problem_is_reported_at_once() -> None:
    assert len(refusal(manifest({"training": {"epochs": 0, "batchSize": 0}}))) == 2


def test_spec_is_frozen_after_validation() -> None:
    run = validate_manifest(manifest())
    with pytest.raises(ValidationError):
        run.spec.training.epochs = 3  # type: ignore[misc]


def test_yaml_exponent_floats_are_numbers(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "apiVersion: tolaria.dev/v1alpha1\nkind: TolariaRun\nmetadata: {name: y}\n"
        "spec: {training: {task: synthetic-mlp, optimizer: {lr: 1e-3}}}\n"
    )
    assert load_manifest(path).spec.training.optimizer.lr == pytest.approx(1e-3)


def test_file_with_two_documents_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("a: 1\n---\nb: 2\n")
    with pytest.raises(ManifestInvalid, match="exactly one YAML document"):
        load_manifest(path)


def test_missing_file_is_refused_with_the_path(tmp_path: Path) -> None:
    with pytest.raises(ManifestInvalid, match="cannot read"):
        load_manifest(tmp_path / "absent.yaml")


def test_broken_yaml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("spec: [unclosed\n")
    with pytest.raises(ManifestInvalid, match="not valid YAML"):
        load_manifest(path)


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_manifest_is_valid(path: Path) -> None:
    assert isinstance(load_manifest(path), TolariaRun)


@given(epochs=st.integers(1, 10_000), batch=st.integers(1, 4096), lr=st.floats(1e-6, 1.0))
def test_valid_manifests_round_trip_through_their_dump(epochs: int, batch: int, lr: float) -> None:
    spec = {"training": {"epochs": epochs, "batchSize": batch, "optimizer": {"lr": lr}}}
    run = validate_manifest(manifest(spec))
    again = validate_manifest(manifest(run.spec.model_dump()))
    assert again == run


def test_readme_manifest_reference_matches_the_model() -> None:
    from leyline.spec.reference import splice

    readme = (ROOT / "README.md").read_text()
    assert splice(readme) == readme, "run: python -m leyline.spec.reference --write README.md"
