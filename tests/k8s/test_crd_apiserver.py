"""The committed CRDs on a real Kubernetes API server: one manifest means the same thing to the
server and to `tolaria`, status survives pruning, immutability and printer columns work.

Server tests are marked `apiserver` and use the session's server (see conftest.py); they skip
with build.sh's reason where it cannot be built. The `tolaria validate` half of the parity test
needs no server.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import ApiClient, ApiextensionsV1Api, CustomObjectsApi
from kubernetes.client.rest import ApiException
from pydantic import BaseModel

from leyline.spec import (
    ManifestInvalid,
    TolariaIncidentSpec,
    TolariaIncidentStatus,
    TolariaRunSpec,
    TolariaRunStatus,
    validate_manifest,
)
from leyline.spec.loader import parse_document

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
INVALID = sorted((ROOT / "tests" / "manifests" / "invalid").glob("*.yaml"))
GROUP, VERSION = "tolaria.dev", "v1alpha1"
RUNS, INCIDENTS = "tolariaruns", "tolariaincidents"
MERGE_PATCH = "application/merge-patch+json"
TABLE = "application/json;as=Table;g=meta.k8s.io;v=v1"
NOT_CHECKED = "some validation rules were not checked"
"""The server's extra cause when CEL was skipped because the schema already failed."""

apiserver = pytest.mark.apiserver


def strip_none(value: Any) -> Any:
    """`value` without null entries: to the model and to the server, null means "unset"."""
    if isinstance(value, dict):
        return {k: strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [strip_none(v) for v in value]
    return value


def expectation(path: Path) -> tuple[str, int]:
    """The field an invalid manifest gets wrong (first line) and the server's status code.

    422 Invalid unless a `# status:` line says otherwise: unknown fields are a *decoding* error
    under `fieldValidation=Strict` (400 BadRequest, "strict decoding error"), raised before the
    schema is consulted.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    field = lines[0].removeprefix("# field:").strip()
    status = 422
    for line in lines[1:3]:
        if line.startswith("# status:"):
            status = int(line.removeprefix("# status:"))
    return field, status


def run_doc(name: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """A run named `name`; its training section names `synthetic-mlp` unless `spec` names a task
    (or sets the section to null, to test the section itself)."""
    spec = copy.deepcopy(spec or {})
    training = spec.setdefault("training", {})
    if isinstance(training, dict):
        training.setdefault("task", "synthetic-mlp")
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TolariaRun",
        "metadata": {"name": name},
        "spec": spec,
    }


def refused(call: Callable[[], Any]) -> tuple[int, dict[str, Any]]:
    """The status code and Status body of a call the server must refuse."""
    with pytest.raises(ApiException) as info:
        call()
    return int(info.value.status), json.loads(info.value.body)


def cause_fields(status: dict[str, Any]) -> set[str]:
    causes = status.get("details", {}).get("causes", [])
    return {c.get("field", "") for c in causes if NOT_CHECKED not in c.get("message", "")}


def unset_fields(model: BaseModel, path: str = "") -> list[str]:
    """Fields of `model` (and of every model inside it) left at their default."""
    missing = [f"{path}{n}" for n in type(model).model_fields if n not in model.model_fields_set]
    for name in type(model).model_fields:
        value = getattr(model, name)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, BaseModel):
                missing += unset_fields(item, f"{path}{name}[{i}].")
    return missing


class Runs:
    """TolariaRun calls in one namespace, as the operator and users make them."""

    def __init__(self, custom: CustomObjectsApi, namespace: str) -> None:
        self.custom = custom
        self.namespace = namespace

    def create(self, doc: dict[str, Any]) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(  # type: ignore[no-any-return]
            GROUP, VERSION, self.namespace, RUNS, doc, field_validation="Strict"
        )

    def get(self, name: str, **kwargs: Any) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(  # type: ignore[no-any-return]
            GROUP, VERSION, self.namespace, RUNS, name, **kwargs
        )

    def patch(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object(  # type: ignore[no-any-return]
            GROUP, VERSION, self.namespace, RUNS, name, body, _content_type=MERGE_PATCH
        )

    def patch_status(self, name: str, status: dict[str, Any]) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object_status(  # type: ignore[no-any-return]
            GROUP,
            VERSION,
            self.namespace,
            RUNS,
            name,
            {"status": status},
            _content_type=MERGE_PATCH,
        )


@pytest.fixture
def runs(custom: CustomObjectsApi, namespace: str) -> Runs:
    return Runs(custom, namespace)


T0, T1, T2, T3 = (f"2026-11-25T10:{m:02d}:00Z" for m in (0, 5, 10, 15))

FULL_STATUS: dict[str, Any] = {
    "phase": "RollingBack",
    "reason": "LossExplosion",
    "message": "loss 41.25 > 15x running median 2.7 at step 1220; fast rollback",
    "observedGeneration": 3,
    "conditions": [
        {
            "type": "Ready",
            "status": "False",
            "reason": "RollingBack",
            "message": "restoring slot 3",
            "lastTransitionTime": T2,
            "observedGeneration": 3,
        },
        {
            "type": "Progressing",
            "status": "True",
            "reason": "Training",
            "message": "epoch 4",
            "lastTransitionTime": T1,
            "observedGeneration": 3,
        },
    ],
    "attempt": 2,
    "restarts": 3,
    "restartsCounted": 1,
    "podName": "full-a2",
    "sidecarService": "full-sidecar",
    "firstFailure": {
        "container": "trainer",
        "exitCode": 137,
        "reason": "OOMKilled",
        "message": "out of memory in backward",
        "node": "gpu-7",
        "time": T0,
        "attempt": 1,
    },
    "progress": {"epoch": 4, "step": 1220, "heartbeat": T2, "loss": 41.25},
    "latestSnapshot": {"slot": 3, "generation": 57, "step": 1200, "epoch": 4},
    "latestCheckpoint": {
        "id": "ckpt-000003",
        "epoch": 3,
        "step": 960,
        "time": T1,
        "bytes": 734003200,
    },
    "rollback": {
        "id": "rb-0007",
        "tier": "ROLLBACK_TIER_FAST",
        "reason": "ANOMALY_KIND_LOSS_EXPLOSION",
        "state": "Succeeded",
        "startedAt": T2,
        "deadline": T3,
        "finishedAt": T2,
    },
    "incident": {"name": "inc-20261125-0001", "level": "severe", "role": "reached"},
    "startTime": T0,
    "completionTime": T3,
}


def test_full_status_fixture_sets_every_status_field() -> None:
    """The pruning test below is only as good as this: a new status field must be added here."""
    assert unset_fields(TolariaRunStatus.model_validate(FULL_STATUS)) == []


@apiserver
@pytest.mark.req("R11.1")
def test_both_crds_are_accepted_and_established(kube: ApiClient) -> None:
    ext = ApiextensionsV1Api(kube)
    for name in ("tolariaruns.tolaria.dev", "tolariaincidents.tolaria.dev"):
        crd = ext.read_custom_resource_definition(name)
        conditions = {c.type: c.status for c in crd.status.conditions}
        assert conditions["Established"] == "True" and conditions["NamesAccepted"] == "True"


@apiserver
def test_the_charts_crds_are_stored_with_helms_keep_policy(kube: ApiClient) -> None:
    """The server keeps the annotation that makes `helm uninstall` leave the CRDs in place."""
    ext = ApiextensionsV1Api(kube)
    for name in ("tolariaruns.tolaria.dev", "tolariaincidents.tolaria.dev"):
        annotations = ext.read_custom_resource_definition(name).metadata.annotations
        assert annotations["helm.sh/resource-policy"] == "keep"


@apiserver
@pytest.mark.req("R10.1")
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_stored_with_the_model_defaults(path: Path, runs: Runs) -> None:
    doc = parse_document(path.read_text(encoding="utf-8"), str(path))
    stored = runs.create(doc)["spec"]
    expected = TolariaRunSpec.model_validate(doc["spec"]).model_dump(mode="json")
    assert strip_none(stored) == strip_none(expected)
    assert TolariaRunSpec.model_validate(stored) == TolariaRunSpec.model_validate(doc["spec"])


@apiserver
@pytest.mark.req("R10.1")
@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_manifest_is_refused_by_the_server_naming_the_field(path: Path, runs: Runs) -> None:
    field, code = expectation(path)
    doc = parse_document(path.read_text(encoding="utf-8"), str(path))
    status, body = refused(lambda: runs.create(doc))
    assert status == code, body["message"]
    if code == 400:
        assert f'unknown field "{field}"' in body["message"]
    else:
        assert cause_fields(body) == {field}, body["message"]


@pytest.fixture(scope="module")
def cli_verdicts() -> dict[str, subprocess.CompletedProcess[str]]:
    """`tolaria validate FILE` for every invalid manifest, run side by side (each start imports
    torch, ~4 s on a small machine)."""

    def validate(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tolaria_trainer.cli", "validate", str(path)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
            check=False,
        )

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(zip((p.name for p in INVALID), pool.map(validate, INVALID), strict=True))


@pytest.mark.req("R10.1")
@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_manifest_is_refused_by_tolaria_validate_naming_the_same_field(
    path: Path, cli_verdicts: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    field, _ = expectation(path)
    verdict = cli_verdicts[path.name]
    assert verdict.returncode == 2, verdict.stdout + verdict.stderr
    lines = [line.strip() for line in verdict.stderr.splitlines() if line.startswith("  ")]
    assert {line.split(": ", 1)[0] for line in lines} == {field}, verdict.stderr


def test_the_invalid_folder_covers_every_kind_of_mistake() -> None:
    fields = [expectation(p)[0] for p in INVALID]
    assert len(INVALID) >= 15
    assert [expectation(p)[1] for p in INVALID].count(400) >= 2  # unknown fields
    rule_fields = {
        "spec.budgets.hookMs",
        "spec.budgets.lrGuardMs",
        "spec.training.schedule.shape",
        "spec.profiler.epochs",
        "spec.rollback.fastMs",
        "spec.emergency.criticalMs",
        "spec.escalation.groupLabel",
    }
    assert rule_fields <= set(fields)  # every cross-field Rule broken once
    assert "metadata.name" in fields


@apiserver
@pytest.mark.req("R10.1")
def test_changing_the_epochs_of_an_existing_run_is_refused_as_immutable(runs: Runs) -> None:
    runs.create(run_doc("frozen", {"training": {"epochs": 10}}))
    status, body = refused(lambda: runs.patch("frozen", {"spec": {"training": {"epochs": 11}}}))
    assert status == 422
    assert cause_fields(body) == {"spec.training"} and "is immutable" in body["message"]
    assert runs.get("frozen")["spec"]["training"]["epochs"] == 10


@apiserver
@pytest.mark.req("R10.4")
def test_suspend_and_escalation_scope_may_change_on_an_existing_run(runs: Runs) -> None:
    created = runs.create(run_doc("mutable"))
    suspended = runs.patch("mutable", {"spec": {"suspend": True}})
    widened = runs.patch("mutable", {"spec": {"escalation": {"scope": "namespace"}}})
    assert suspended["spec"]["suspend"] is True
    assert widened["spec"]["escalation"]["scope"] == "namespace"
    assert widened["metadata"]["generation"] == created["metadata"]["generation"] + 2


@apiserver
@pytest.mark.req("R10.1")
def test_a_fully_populated_status_survives_pruning(runs: Runs) -> None:
    runs.create(run_doc("full"))
    status = TolariaRunStatus.model_validate(FULL_STATUS).model_dump(mode="json")
    runs.patch_status("full", status)
    stored = runs.get("full")["status"]
    assert stored == status
    assert TolariaRunStatus.model_validate(stored) == TolariaRunStatus.model_validate(FULL_STATUS)


@apiserver
@pytest.mark.req("R10.1")
def test_status_writes_do_not_change_the_generation(runs: Runs) -> None:
    generation = runs.create(run_doc("gen"))["metadata"]["generation"]
    runs.patch_status("gen", {"phase": "Running", "progress": {"epoch": 1, "step": 10}})
    runs.patch_status("gen", {"progress": {"epoch": 2, "step": 20}})
    assert runs.get("gen")["metadata"]["generation"] == generation
    suspended = runs.patch("gen", {"spec": {"suspend": True}})
    assert suspended["metadata"]["generation"] == generation + 1


@apiserver
@pytest.mark.req("R10.1")
def test_printer_columns_show_phase_and_epoch_after_a_status_patch(runs: Runs) -> None:
    runs.create(run_doc("printed"))
    runs.patch_status(
        "printed",
        {
            "phase": "Running",
            "attempt": 1,
            "restarts": 2,
            "reason": "Training",
            "progress": {"epoch": 3, "step": 120},
            "latestCheckpoint": {"time": T1},
            "incident": {"name": "inc-7"},
        },
    )
    table = runs.get("printed", _headers={"Accept": TABLE})
    columns = [c["name"] for c in table["columnDefinitions"]]
    assert columns == [
        "Name",
        "Phase",
        "Attempt",
        "Restarts",
        "Epoch",
        "Step",
        "Last-Checkpoint",
        "Age",
        "Reason",
        "Incident",
    ]
    row = dict(zip(columns, table["rows"][0]["cells"], strict=True))
    assert (row["Name"], row["Phase"], row["Epoch"], row["Step"]) == ("printed", "Running", 3, 120)
    assert (row["Attempt"], row["Restarts"], row["Reason"], row["Incident"]) == (
        1,
        2,
        "Training",
        "inc-7",
    )
    assert row["Last-Checkpoint"] != "<none>"


@apiserver
@pytest.mark.req("R10.4")
def test_an_incident_is_cluster_scoped_and_its_status_can_be_patched(
    custom: CustomObjectsApi, namespace: str
) -> None:
    name = f"inc-{uuid.uuid4().hex[:8]}"
    spec = TolariaIncidentSpec.model_validate(
        {
            "level": "critical",
            "kind": "ANOMALY_KIND_STALLED_STEP",
            "sourceRun": {"namespace": namespace, "name": "stalled"},
            "scope": "namespace",
            "requestedScope": "cluster",
            "crossNamespace": False,
            "reason": "no heartbeat for 120 s",
        }
    ).model_dump(mode="json", exclude_none=True)
    status = TolariaIncidentStatus.model_validate(
        {
            "phase": "Open",
            "timeline": [
                {"time": T0, "event": "Raised", "message": "stalled step"},
                {"time": T1, "event": "Signalled", "message": "2 runs"},
            ],
            "runs": [
                {
                    "namespace": namespace,
                    "name": "stalled",
                    "ack": "Acknowledged",
                    "latencyMs": 4.5,
                },
                {
                    "namespace": namespace,
                    "name": "other",
                    "ack": "Unreachable",
                    "message": "no route",
                },
            ],
            "resolution": {"time": T2, "by": "operator", "reason": "halted"},
            "observedGeneration": 1,
        }
    ).model_dump(mode="json")
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TolariaIncident",
        "metadata": {"name": name},
        "spec": spec,
    }
    created = custom.create_cluster_custom_object(
        GROUP, VERSION, INCIDENTS, body, field_validation="Strict"
    )
    try:
        assert "namespace" not in created["metadata"]
        assert created["spec"] == spec
        custom.patch_cluster_custom_object_status(
            GROUP, VERSION, INCIDENTS, name, {"status": status}, _content_type=MERGE_PATCH
        )
        stored = custom.get_cluster_custom_object(GROUP, VERSION, INCIDENTS, name)
        assert stored["status"] == status
        assert stored["metadata"]["generation"] == created["metadata"]["generation"]
        table = custom.get_cluster_custom_object(
            GROUP, VERSION, INCIDENTS, name, _headers={"Accept": TABLE}
        )
        columns = [c["name"] for c in table["columnDefinitions"]]
        row = dict(zip(columns, table["rows"][0]["cells"], strict=True))
        assert (row["Level"], row["Source"], row["Scope"], row["Phase"]) == (
            "critical",
            "stalled",
            "namespace",
            "Open",
        )
    finally:
        custom.delete_cluster_custom_object(GROUP, VERSION, INCIDENTS, name)


def model_accepts(doc: dict[str, Any]) -> bool:
    try:
        validate_manifest(doc)
    except ManifestInvalid:
        return False
    return True


def server_accepts(runs: Runs, doc: dict[str, Any]) -> bool:
    try:
        runs.create(copy.deepcopy(doc))
    except ApiException as err:
        if err.status in (400, 422):
            return False
        raise
    return True


@apiserver
@pytest.mark.parametrize(
    ("spec", "accepted"),
    [
        pytest.param({"training": {"epochs": 10.5}}, False, id="fraction-for-integer"),
        pytest.param({"training": {"seed": 2**63 - 1}}, True, id="largest-int64-seed"),
        pytest.param({"training": {"seed": 2**63}}, False, id="seed-past-int64"),
        pytest.param({"budgets": {"hookMs": 18}}, True, id="integer-for-number"),
        pytest.param({"budgets": {"hookMs": "18"}}, False, id="string-for-number"),
        pytest.param({"training": {"epochs": "10"}}, False, id="string-for-integer"),
        pytest.param({"training": {"deterministic": "true"}}, False, id="string-for-boolean"),
        pytest.param({"training": {"deterministic": 1}}, False, id="integer-for-boolean"),
        pytest.param({"training": {"epochs": True}}, False, id="boolean-for-integer"),
        pytest.param({"training": {"epochs": None}}, True, id="null-for-a-defaulted-field"),
        pytest.param({"budgets": None}, True, id="null-for-a-section"),
        pytest.param({"training": None}, False, id="null-for-the-required-section"),
        pytest.param({"training": {"maxStepsPerEpoch": None}}, True, id="null-optional-number"),
        pytest.param(
            {"training": {"schedule": {"groups": {"host": {"shape": None}}}}},
            True,
            id="null-optional-enum",
        ),
        pytest.param({"telemetry": {"metricsAddress": ""}}, False, id="empty-required-string"),
        pytest.param({"profiler": {"epochs": list(range(65))}}, False, id="list-past-max-items"),
        pytest.param({"pod": {"shmSizeLimit": "lots-of-4Gi"}}, False, id="junk-before-quantity"),
        pytest.param({"training": {"epochs": 10.0}}, True, id="whole-float-for-integer"),
    ],
)
def test_server_and_model_agree_on_edge_values(
    spec: dict[str, Any], accepted: bool, runs: Runs
) -> None:
    doc = run_doc(f"edge-{uuid.uuid4().hex[:8]}", spec)
    assert (server_accepts(runs, doc), model_accepts(doc)) == (accepted, accepted)
