"""The generated CRDs: in sync with the models, valid, structural, documented, and saying what the
models say (enums, defaults, rules, immutability). No server needed."""

from __future__ import annotations

import copy
import re
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import kubernetes_validate
import pytest
import yaml
from pydantic import TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from leyline import crd
from leyline.spec import (
    ProtoEnum,
    SpecModel,
    TolariaIncidentSpec,
    TolariaIncidentStatus,
    TolariaRunSpec,
    TolariaRunStatus,
    load_manifest,
)
from leyline.spec.loader import parse_document
from leyline.spec.run import IMMUTABLE

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "crds"
CHART_CRD_DIR = ROOT / "charts" / "tolaria" / "files" / "crds"
"""The Helm chart's copy, which its templates render verbatim (tests/chart checks the render)."""
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def committed(name: str) -> dict[str, Any]:
    return yaml.safe_load((CRD_DIR / name).read_text(encoding="utf-8"))


def root_schema(name: str) -> dict[str, Any]:
    return committed(name)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


RUN = root_schema(crd.RUN_FILE)
INCIDENT = root_schema(crd.INCIDENT_FILE)
SECTIONS: list[tuple[str, type[SpecModel], dict[str, Any]]] = [
    ("TolariaRun.spec", TolariaRunSpec, RUN["properties"]["spec"]),
    ("TolariaRun.status", TolariaRunStatus, RUN["properties"]["status"]),
    ("TolariaIncident.spec", TolariaIncidentSpec, INCIDENT["properties"]["spec"]),
    ("TolariaIncident.status", TolariaIncidentStatus, INCIDENT["properties"]["status"]),
]
SECTION_IDS = [s[0] for s in SECTIONS]


def strip_none(value: Any) -> Any:
    """`value` without null entries: in the model and on the server null means "unset"."""
    if isinstance(value, dict):
        return {k: strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [strip_none(v) for v in value]
    return value


def _unwrap(annotation: Any) -> tuple[Any, str]:
    """The element annotation of a field and how it is held: 'one', 'list' or 'map'."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        (inner,) = [a for a in get_args(annotation) if a is not type(None)]
        return _unwrap(inner)
    if origin is Annotated:
        return _unwrap(get_args(annotation)[0])
    if origin is list:
        return get_args(annotation)[0], "list"
    if origin is dict:
        return get_args(annotation)[1], "map"
    return annotation, "one"


def _submodel(info: FieldInfo) -> tuple[type[SpecModel] | None, str]:
    inner, held = _unwrap(info.annotation)
    if isinstance(inner, type) and issubclass(inner, SpecModel):
        return inner, held
    return None, held


def _proto_enum(info: FieldInfo) -> ProtoEnum | None:
    found = [m for m in info.metadata if isinstance(m, ProtoEnum)]
    for arg in get_args(info.annotation):
        found += [m for m in getattr(arg, "__metadata__", ()) if isinstance(m, ProtoEnum)]
    return found[0] if found else None


def _literal(info: FieldInfo) -> list[str] | None:
    inner, _ = _unwrap(info.annotation)
    return list(get_args(inner)) if get_origin(inner) is Literal else None


def fields(
    model: type[SpecModel], node: dict[str, Any], path: str
) -> Iterator[tuple[str, FieldInfo, dict[str, Any], dict[str, Any]]]:
    """Every field of `model` and below: (path, field, its schema node, the parent's node)."""
    for name, info in model.model_fields.items():
        key = info.alias or name
        assert key in node.get("properties", {}), f"{path}.{key} is not declared in the CRD"
        child = node["properties"][key]
        yield f"{path}.{key}", info, child, node
        sub, held = _submodel(info)
        if sub is not None:
            target = {"list": "items", "map": "additionalProperties"}.get(held)
            yield from fields(sub, child[target] if target else child, f"{path}.{key}")


def models(
    model: type[SpecModel], node: dict[str, Any], path: str
) -> Iterator[tuple[str, type[SpecModel], dict[str, Any]]]:
    """`model` and every model below it, each with the schema node of its object."""
    yield path, model, node
    for name, info in model.model_fields.items():
        sub, held = _submodel(info)
        if sub is not None:
            key = info.alias or name
            child = node["properties"][key]
            target = {"list": "items", "map": "additionalProperties"}.get(held)
            yield from models(sub, child[target] if target else child, f"{path}.{key}")


def structural_problems(node: dict[str, Any], path: str) -> list[str]:
    """What keeps `node` from being a structural schema the way this project writes one."""
    problems = [
        f"{path}: has {key}"
        for key in ("$ref", "$defs", "definitions", "anyOf", "allOf", "oneOf", "not", "title")
        if key in node
    ]
    problems += [f"{path}: leftover {key}" for key in node if key.startswith("x-tolaria-")]
    if "type" not in node:
        problems.append(f"{path}: no type")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties together")
    if node.get("type") == "array" and "items" not in node:
        problems.append(f"{path}: array without items")
    for bound in ("exclusiveMinimum", "exclusiveMaximum"):
        if bound in node and not isinstance(node[bound], bool):
            problems.append(f"{path}: {bound} is the draft-2020 number form")
    if "default" in node and node["default"] is None:
        problems.append(f"{path}: null default")
    for rule in node.get("x-kubernetes-validations", []):
        if not rule.get("rule") or not rule.get("message"):
            problems.append(f"{path}: CEL rule without rule or message: {rule}")
    for name, child in node.get("properties", {}).items():
        problems += structural_problems(child, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            problems += structural_problems(node[key], f"{path}.{key}")
    return problems


def serialized_default(info: FieldInfo) -> Any:
    value = info.get_default(call_default_factory=True)
    return TypeAdapter(info.rebuild_annotation()).dump_python(value, mode="json", by_alias=True)


@pytest.mark.req("R11.1")
@pytest.mark.parametrize("committed_dir", [CRD_DIR, CHART_CRD_DIR], ids=["crds", "chart"])
def test_committed_crds_match_a_fresh_generation(tmp_path: Path, committed_dir: Path) -> None:
    written = crd.write(tmp_path)
    assert sorted(p.name for p in written) == sorted(crd.crds())
    where = committed_dir.relative_to(ROOT)
    for path in written:
        assert (committed_dir / path.name).read_bytes() == path.read_bytes(), (
            f"{where}/{path.name} is stale: run `make crds`"
        )
    assert crd.drift(committed_dir) == []


def test_the_committed_places_are_the_repository_and_the_chart() -> None:
    assert [ROOT / d for d in crd.CRD_DIRS] == [CRD_DIR, CHART_CRD_DIR]


def test_write_without_a_directory_writes_every_committed_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert crd.main(["--write"]) == 0
    for directory in crd.CRD_DIRS:
        assert sorted(p.name for p in (tmp_path / directory).iterdir()) == sorted(crd.crds())
    assert crd.main(["--check"]) == 0
    (tmp_path / crd.CRD_DIRS[1] / crd.RUN_FILE).write_text("# edited by hand\n")
    assert crd.main(["--check"]) == 1


@pytest.mark.parametrize("name", sorted(crd.crds()))
def test_every_crd_tells_helm_to_keep_it_on_uninstall(name: str) -> None:
    """Deleting a CRD deletes every object stored under it: runs and incidents must survive
    `helm uninstall`. The annotation is in the generated file so the chart renders it as is."""
    assert committed(name)["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


def test_generation_is_deterministic() -> None:
    assert crd.rendered() == crd.rendered()


def test_check_exits_1_and_shows_the_difference_when_a_file_drifted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    crd.write(tmp_path)
    path = tmp_path / crd.RUN_FILE
    path.write_text(path.read_text().replace("default: 18.0", "default: 25.0"))
    (tmp_path / crd.INCIDENT_FILE).unlink()
    (tmp_path / "tolariaold.tolaria.dev.yaml").write_text("{}\n")
    assert crd.main(["--check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "-" + " " * 20 + "default: 25.0" in out
    assert "+" + " " * 20 + "default: 18.0" in out
    assert f"{crd.INCIDENT_FILE}: missing" in out
    assert "tolariaold.tolaria.dev.yaml: stale" in out


def test_check_exits_0_on_a_fresh_generation(tmp_path: Path) -> None:
    assert crd.main(["--write", str(tmp_path)]) == 0
    assert crd.main(["--check", str(tmp_path)]) == 0


def test_every_file_says_it_is_generated_and_how_to_regenerate() -> None:
    for name in crd.crds():
        head = (CRD_DIR / name).read_text().splitlines()[:3]
        assert head[0].startswith("# Generated by `python -m leyline.crd --write` (`make crds`)")
        assert "charts/tolaria/files/crds/" in head[1] and "do not edit" in head[1]
        assert "--check" in head[2]


@pytest.mark.parametrize("name", sorted(crd.crds()))
def test_crd_validates_against_the_kubernetes_1_33_schema(name: str) -> None:
    kubernetes_validate.validate(committed(name), "1.33.0", strict=True)


@pytest.mark.parametrize("name", sorted(crd.crds()))
def test_schema_is_structural(name: str) -> None:
    assert structural_problems(root_schema(name), name) == []


def test_run_crd_names_scope_and_status_subresource() -> None:
    spec = committed(crd.RUN_FILE)["spec"]
    assert spec["group"] == "tolaria.dev" and spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "TolariaRun",
        "listKind": "TolariaRunList",
        "plural": "tolariaruns",
        "singular": "tolariarun",
        "shortNames": ["trun"],
        "categories": ["tolaria"],
    }
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_incident_crd_is_cluster_scoped_with_a_status_subresource() -> None:
    spec = committed(crd.INCIDENT_FILE)["spec"]
    assert spec["scope"] == "Cluster"
    assert spec["names"]["kind"] == "TolariaIncident"
    assert spec["names"]["shortNames"] == ["tinc"]
    assert spec["versions"][0]["subresources"] == {"status": {}}
    assert INCIDENT["required"] == ["spec"]


@pytest.mark.req("R10.1")
def test_run_crd_requires_spec_training_and_its_task_with_no_default() -> None:
    training = RUN["properties"]["spec"]["properties"]["training"]
    assert RUN["required"] == ["spec"]
    assert RUN["properties"]["spec"]["required"] == ["training"]
    assert training["required"] == ["task"]
    assert "default" not in training and "default" not in training["properties"]["task"]


def test_run_printer_columns() -> None:
    columns = committed(crd.RUN_FILE)["spec"]["versions"][0]["additionalPrinterColumns"]
    table = [(c["name"], c["jsonPath"], c["type"], c.get("priority", 0)) for c in columns]
    assert table == [
        ("Phase", ".status.phase", "string", 0),
        ("Attempt", ".status.attempt", "integer", 0),
        ("Restarts", ".status.restarts", "integer", 0),
        ("Epoch", ".status.progress.epoch", "integer", 0),
        ("Step", ".status.progress.step", "integer", 0),
        ("Last-Checkpoint", ".status.latestCheckpoint.time", "date", 0),
        ("Age", ".metadata.creationTimestamp", "date", 0),
        ("Reason", ".status.reason", "string", 1),
        ("Incident", ".status.incident.name", "string", 1),
    ]


def test_incident_printer_columns() -> None:
    columns = committed(crd.INCIDENT_FILE)["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [(c["name"], c["jsonPath"]) for c in columns] == [
        ("Level", ".spec.level"),
        ("Source", ".spec.sourceRun.name"),
        ("Scope", ".spec.scope"),
        ("Phase", ".status.phase"),
        ("Age", ".metadata.creationTimestamp"),
    ]


@pytest.mark.parametrize(("where", "model", "node"), SECTIONS, ids=SECTION_IDS)
def test_every_field_is_declared_with_a_description(
    where: str, model: type[SpecModel], node: dict[str, Any]
) -> None:
    # `fields` asserts each model field is declared, so nothing the operator writes is pruned
    undocumented = [
        path for path, _, child, _ in fields(model, node, where) if not child.get("description")
    ]
    assert undocumented == []
    assert node["description"]


@pytest.mark.parametrize(("where", "model", "node"), SECTIONS, ids=SECTION_IDS)
def test_nothing_is_declared_that_the_model_lacks(
    where: str, model: type[SpecModel], node: dict[str, Any]
) -> None:
    for path, sub, sub_node in models(model, node, where):
        declared = set(sub_node.get("properties", {}))
        assert declared == {i.alias or n for n, i in sub.model_fields.items()}, path


@pytest.mark.parametrize(("where", "model", "node"), SECTIONS, ids=SECTION_IDS)
def test_enum_lists_are_the_leyline_names(
    where: str, model: type[SpecModel], node: dict[str, Any]
) -> None:
    checked = 0
    for path, info, child, _ in fields(model, node, where):
        marker = _proto_enum(info)
        if marker is not None:
            assert child["enum"] == marker.names(), path
            checked += 1
        elif (literal := _literal(info)) is not None:
            assert child["enum"] == literal, path
    assert checked or where == "TolariaRun.status" or where.startswith("TolariaIncident")


def test_enum_lists_match_the_proto_enums_by_name() -> None:
    training = RUN["properties"]["spec"]["properties"]["training"]["properties"]
    assert training["optimizer"]["properties"]["kind"]["enum"] == [
        "sgd",
        "adam",
        "adamw",
        "rmsprop",
    ]
    phase = RUN["properties"]["status"]["properties"]["phase"]
    assert phase["enum"] == [
        "Pending",
        "Running",
        "Succeeded",
        "Failed",
        "Halted",
        "Suspended",
        "Restarting",
        "RollingBack",
        "Stopped",
    ]
    threshold = RUN["properties"]["spec"]["properties"]["escalation"]["properties"]["threshold"]
    assert threshold["enum"] == ["minor", "major", "severe", "critical"]


@pytest.mark.req("R12")
def test_budget_defaults_in_the_crd_are_the_design_numbers() -> None:
    spec = RUN["properties"]["spec"]["properties"]
    assert spec["budgets"]["properties"]["hookMs"]["default"] == 18
    assert spec["breakers"]["properties"]["failureThreshold"]["default"] == 3
    assert spec["breakers"]["properties"]["cooldownSeconds"]["default"] == 30
    assert spec["snapshots"]["properties"]["slots"]["default"] == 5
    assert spec["rollback"]["properties"]["fullDeadlineSeconds"]["default"] == 12


@pytest.mark.parametrize(("where", "model", "node"), SECTIONS, ids=SECTION_IDS)
def test_every_default_is_the_model_default(
    where: str, model: type[SpecModel], node: dict[str, Any]
) -> None:
    for path, info, child, parent in fields(model, node, where):
        if info.is_required():
            assert "default" not in child and path.rsplit(".", 1)[1] in parent["required"], path
            continue
        expected = strip_none(serialized_default(info))
        if expected is None:
            assert "default" not in child, path
        else:
            assert "default" in child, f"{path}: no default (the model's is {expected!r})"
            # a section's `{}` (or its expansion) becomes the model's section once defaulted
            assert crd.apply_defaults(child, copy.deepcopy(child["default"])) == expected, path


def test_an_omitted_section_is_defaulted_to_the_whole_model_section() -> None:
    spec = RUN["properties"]["spec"]
    given = {"training": {"task": "char-lm"}}  # the one thing without a default
    model = TolariaRunSpec.model_validate(given)
    assert crd.apply_defaults(spec, given) == strip_none(model.model_dump(mode="json"))
    status = RUN["properties"]["status"]
    assert crd.apply_defaults(status, {}) == strip_none(TolariaRunStatus().model_dump(mode="json"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_defaults_the_same_way_in_the_crd_and_the_model(path: Path) -> None:
    spec = parse_document(path.read_text(), str(path))["spec"]
    model = load_manifest(path).spec.model_dump(mode="json")
    assert crd.apply_defaults(RUN["properties"]["spec"], spec) == strip_none(model)


@pytest.mark.parametrize(("where", "model", "node"), SECTIONS, ids=SECTION_IDS)
def test_every_rule_is_a_cel_validation_on_its_object(
    where: str, model: type[SpecModel], node: dict[str, Any]
) -> None:
    for path, sub, sub_node in models(model, node, where):
        rules = sub_node.get("x-kubernetes-validations", [])
        for rule in sub.rules:
            wanted = {"rule": rule.cel, "message": rule.message, "fieldPath": f".{rule.field}"}
            assert wanted in rules, f"{path}: {rule.field}"


def test_rules_of_the_spec_sections_are_all_present() -> None:
    cel = [
        r["fieldPath"]
        for _, _, n in models(TolariaRunSpec, RUN["properties"]["spec"], "spec")
        for r in n.get("x-kubernetes-validations", [])
        if "oldSelf" not in r["rule"]
    ]
    pod = [
        ".extra",  # resources: extended resources and their counts
        ".extra",  # resources: nvidia.com/gpu in one place
        ".sizeLimit",  # checkpointVolume: more than 0
        ".value",  # tolerations: empty with Exists
        ".operator",  # tolerations: Exists with an empty key
        ".tolerationSeconds",  # tolerations: only with NoExecute
        ".nodeSelector",
        ".volumeMounts",  # names a volume
        ".volumes",  # unique names
        ".volumeMounts",  # unique paths
        ".env",  # unique names
        ".labels",  # label keys
        ".labels",  # not the operator's
        ".annotations",  # label keys
        ".annotations",  # not the operator's
        ".shmSizeLimit",  # more than 0
    ]
    fragments = [  # the Kubernetes fragments of spec.pod (leyline/spec/kube.py)
        ".configMapKeyRef",  # env valueFrom: one source
        ".name",  # env: not TOLARIA_* or HOME
        ".valueFrom",  # env: not with value
        ".prefix",  # envFrom: not TOLARIA_
        ".configMapRef",  # envFrom: one source
        ".name",  # volumes: not the operator's
        ".name",  # volumes: one source
        ".mountPath",  # volumeMounts: not over the operator's paths
        ".subPath",  # volumeMounts: no ..
    ]
    affinity = [".values"] * 10 + [".matchLabels"] * 8  # every requirement and selector
    sections = [".hookMs", ".lrGuardMs", ".shape", ".epochs", ".fastMs", ".criticalMs"]
    assert sorted(cel) == sorted([*sections, ".groupLabel", *pod, *fragments, *affinity])


def test_immutable_sections_carry_a_transition_rule_and_mutable_ones_none() -> None:
    spec = RUN["properties"]["spec"]["properties"]
    immutable_key = next(iter(IMMUTABLE))
    for name, info in TolariaRunSpec.model_fields.items():
        key = info.alias or name
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        transition = [
            r for r in spec[key].get("x-kubernetes-validations", []) if "oldSelf" in r["rule"]
        ]
        if extra.get(immutable_key):
            assert transition == [{"rule": "self == oldSelf", "message": "is immutable"}], key
        else:
            assert transition == [], key
    for mutable in ("suspend", "restarts", "escalation", "failurePolicy"):
        assert "x-kubernetes-validations" not in spec[mutable] or all(
            "oldSelf" not in r["rule"] for r in spec[mutable]["x-kubernetes-validations"]
        )


def test_the_root_limits_the_run_name_as_the_model_does() -> None:
    rules = RUN["x-kubernetes-validations"]
    assert {
        "rule": "self.metadata.name.size() <= 52",
        "message": "metadata.name must be at most 52 characters",
        "fieldPath": ".metadata.name",
    } in rules
    assert all("metadata.name" in r["message"] for r in rules)


def test_conditions_are_a_map_keyed_by_type() -> None:
    conditions = RUN["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert conditions["maxItems"] == 16


def test_draft_2020_exclusive_bounds_become_openapi_3_0() -> None:
    hook = RUN["properties"]["spec"]["properties"]["budgets"]["properties"]["hookMs"]
    assert (hook["minimum"], hook["exclusiveMinimum"]) == (0, True)


def test_optional_fields_are_nullable_except_enums() -> None:
    training = RUN["properties"]["spec"]["properties"]["training"]["properties"]
    assert training["maxStepsPerEpoch"]["nullable"] is True
    assert "default" not in training["maxStepsPerEpoch"]
    # the server refuses null for an enum even when nullable; pruning null means "unset" as well
    shape = training["schedule"]["properties"]["groups"]["additionalProperties"]["properties"]
    assert "nullable" not in shape["shape"]


def test_the_int64_bound_becomes_the_int64_format() -> None:
    seed = RUN["properties"]["spec"]["properties"]["training"]["properties"]["seed"]
    assert seed["format"] == "int64" and "maximum" not in seed


def test_unsupported_union_is_refused_with_the_field_named() -> None:
    class Bad(SpecModel):
        value: int | str = 0
        """Either."""

    with pytest.raises(crd.CrdError, match=r"Bad\.value: a union"):
        crd.structural_schema(Bad)


@pytest.mark.parametrize(
    ("model", "minimal"),
    [
        (TolariaRunSpec, {"training": {"task": "synthetic-mlp"}}),
        (TolariaRunStatus, {}),
        (TolariaIncidentSpec, {"level": "critical", "sourceRun": {"namespace": "ns", "name": "r"}}),
        (TolariaIncidentStatus, {}),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_every_model_default_reads_back_through_its_own_model(
    model: type[SpecModel], minimal: dict[str, Any]
) -> None:
    """A default the model cannot read back (an enum's UNSPECIFIED) could not be a CRD default."""
    dumped = model.model_validate(minimal).model_dump(mode="json")
    assert model.model_validate(dumped).model_dump(mode="json") == dumped


@pytest.mark.parametrize(
    ("section", "key", "junk"),
    [("pod", "shmSizeLimit", "lots-of-4Gi"), ("escalation", "groupLabel", "!!!tolaria.dev/group")],
)
def test_optional_pattern_fields_refuse_junk_before_a_valid_value(
    section: str, key: str, junk: str
) -> None:
    pattern = RUN["properties"]["spec"]["properties"][section]["properties"][key]["pattern"]
    assert re.search(pattern, junk) is None  # Go's regexp.MatchString also searches
    with pytest.raises(ValidationError, match=key):
        TolariaRunSpec.model_validate({"training": {"task": "char-lm"}, section: {key: junk}})


def test_a_default_outside_its_enum_is_refused_with_the_field_named() -> None:
    class Bad(SpecModel):
        shape: Literal["a", "b"] = "c"  # type: ignore[assignment]
        """A shape whose default its own enum refuses."""

    with pytest.raises(crd.CrdError, match=r"Bad\.shape: default 'c' is not in its enum"):
        crd.structural_schema(Bad)


CEL_OF_KUBERNETES_1_28 = frozenset(
    {"has", "size", "matches", "startsWith", "endsWith", "contains", "all", "exists", "exists_one"}
)
"""The CEL functions and macros the CRDs may call: core CEL, which every Kubernetes with CRD
validation rules compiles. A new rule may call the quantity library (`quantity()`,
`isQuantity()`) from 1.29 on, and the chart's oldest Kubernetes is 1.28: a rule calling it
would make the whole CRD fail to install there (`leyline.quantity` explains the pattern used
instead)."""


def _cel_rules(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for rule in node.get("x-kubernetes-validations", []):
            yield str(rule["rule"])
        for child in node.values():
            yield from _cel_rules(child)
    elif isinstance(node, list):
        for child in node:
            yield from _cel_rules(child)


@pytest.mark.parametrize("name", sorted(crd.crds()))
def test_every_cel_rule_compiles_on_the_oldest_kubernetes_the_chart_supports(name: str) -> None:
    for rule in _cel_rules(committed(name)):
        code = re.sub(r"'([^'\\]|\\.)*'", "''", rule)  # string literals say nothing
        called = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(", code))
        assert called <= CEL_OF_KUBERNETES_1_28, (
            f"{rule}: {sorted(called - CEL_OF_KUBERNETES_1_28)}"
        )
