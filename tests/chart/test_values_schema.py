"""values.schema.json: it describes every value, refuses every key it does not declare, and
Helm refuses bad values with it, naming where the bad value is."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
import yaml

from tests.chart.rendering import CHART_DIR, helm, render, walk

SCHEMA: dict[str, Any] = json.loads((CHART_DIR / "values.schema.json").read_text(encoding="utf-8"))
VALUES: dict[str, Any] = yaml.safe_load((CHART_DIR / "values.yaml").read_text(encoding="utf-8"))


def schema_nodes(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every schema below `node` that describes a value (properties, items, map values)."""
    found = [(path, node)]
    for key, child in node.get("properties", {}).items():
        found += schema_nodes(child, f"{path}.{key}" if path else key)
    if isinstance(node.get("items"), dict):
        found += schema_nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += schema_nodes(node["additionalProperties"], f"{path}.*")
    return found


def node_for(path: str) -> dict[str, Any] | None:
    node: dict[str, Any] | None = SCHEMA
    for key in path.split("."):
        if node is None:
            return None
        props = node.get("properties", {})
        node = props.get(key) if key in props else None
    return node


def refusal(values: dict[str, Any]) -> str:
    """Helm's message refusing `values` (fails the test when Helm accepts them)."""
    with pytest.raises(helm.HelmValuesError) as caught:
        render(values)
    return str(caught.value)


def test_the_schema_is_a_valid_draft_7_schema() -> None:
    """Draft 7: what Helm 3 and Helm 4 both validate with."""
    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(SCHEMA)


def test_the_default_values_satisfy_the_schema() -> None:
    jsonschema.Draft7Validator(SCHEMA).validate(VALUES)


def test_every_value_in_values_yaml_is_declared_in_the_schema() -> None:
    undeclared = [
        path
        for path, value in walk(VALUES)
        if path and "[" not in path and node_for(path) is None and not _inside_a_map(path)
    ]
    assert undeclared == []


def _inside_a_map(path: str) -> bool:
    """Whether `path` is an entry of a free-form map (labels, resources amounts...)."""
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    node = node_for(parent) if parent else SCHEMA
    return node is not None and "properties" not in node and "additionalProperties" in node


def test_every_schema_node_has_a_description() -> None:
    undocumented = [
        path or "(root)" for path, node in schema_nodes(SCHEMA) if not node.get("description")
    ]
    assert undocumented == []


def test_every_object_refuses_keys_it_does_not_declare() -> None:
    """`additionalProperties: false` on every object with declared keys; a free-form map
    (labels, annotations, settings) constrains its values with a typed schema instead."""
    loose = []
    for path, node in schema_nodes(SCHEMA):
        if node.get("type") != "object":
            continue
        extra = node.get("additionalProperties")
        if "properties" in node and extra is not False:
            loose.append(f"{path or '(root)'}: declared keys but additionalProperties is {extra!r}")
        if "properties" not in node and not isinstance(extra, dict):
            loose.append(f"{path}: a map without a schema for its values")
    assert loose == []


def test_every_declared_value_has_a_default_in_values_yaml() -> None:
    """values.yaml is the chart's documentation of its defaults: nothing is left implicit."""
    missing = [
        path
        for path, node in schema_nodes(SCHEMA)
        if path
        and "[]" not in path
        and "*" not in path
        and not _has(VALUES, path)
        and not _under_optional_object(path)
    ]
    assert missing == []


def _has(values: dict[str, Any], path: str) -> bool:
    node: Any = values
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def _under_optional_object(path: str) -> bool:
    """Resource amounts (`operator.resources.limits.ephemeral-storage`) are optional."""
    return path.startswith("operator.resources.") and path.count(".") == 3


@pytest.mark.parametrize(
    ("values", "where", "says"),
    [
        ({"replicas": 2}, "at ''", "additional properties 'replicas' not allowed"),
        (
            {"images": {"trainer": {"digest": "sha256:00"}}},
            "at '/images/trainer'",
            "additional properties 'digest' not allowed",
        ),
        ({"watch": {"allNamespaces": "yes"}}, "at '/watch/allNamespaces'", "want boolean"),
        ({"operator": {"metricsPort": "9403"}}, "at '/operator/metricsPort'", "want integer"),
        ({"operator": {"logFormat": "xml"}}, "at '/operator/logFormat'", "one of 'plain'"),
        ({"images": {"pullPolicy": "Sometimes"}}, "at '/images/pullPolicy'", "'IfNotPresent'"),
        (
            {"images": {"trainer": {"tag": "latest please"}}},
            "at '/images/trainer/tag'",
            "'latest please' does not match",
        ),
        ({"monitoring": {"interval": "30 seconds"}}, "at '/monitoring/interval'", "'30 seconds'"),
        ({"watch": {"allNamespaces": False}}, "at '/watch/namespaces'", "minItems"),
        ({"watch": {"namespaces": ["team-a"]}}, "at '/watch/namespaces'", "maxItems"),
        ({"watch": {"namespaces": ["Team_A"]}}, "at '/watch/namespaces/0'", "'Team_A'"),
        (
            {"runs": {"metricsScraper": {"namespaceLabels": {"name": 7}}}},
            "at '/runs/metricsScraper/namespaceLabels/name'",
            "want string",
        ),
        (
            {"escalation": {"maxScope": "group"}},
            "at '/escalation/maxScope'",
            "value must be one of 'run', 'namespace', 'cluster'",
        ),
        (
            {"operator": {"settings": {"images.trainer": "mine:1"}}},
            "invalid propertyName",  # Helm's validator locates a key's own refusal at ''
            "'images.trainer'",
        ),
    ],
    ids=[
        "unknown-top-level-key",
        "unknown-nested-key",
        "wrong-type-boolean",
        "wrong-type-integer",
        "bad-enum",
        "bad-pull-policy",
        "bad-image-tag",
        "bad-duration",
        "namespaced-without-namespaces",
        "namespaces-while-watching-all",
        "bad-namespace-name",
        "non-string-label",
        "a-reach-that-is-no-reach",
        "a-setting-the-chart-derives",
    ],
)
def test_bad_values_are_refused_naming_where_they_are(
    values: dict[str, Any], where: str, says: str
) -> None:
    message = refusal(values)
    assert "values don't meet the specifications of the schema" in message
    assert where in message and says in message


def documented_values() -> dict[str, str]:
    """The chart README's values table: value -> its default as written there."""
    text = (CHART_DIR / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([A-Za-z.]+)` \| `(.*?)` \|", text, flags=re.MULTILINE)
    return dict(rows)


def value_leaves(node: dict[str, Any], path: str = "") -> list[str]:
    """The values a user sets one by one (resources are one value, as in a PodSpec)."""
    props = node.get("properties")
    if props and not path.endswith("resources"):
        return [p for k, c in props.items() for p in value_leaves(c, f"{path}.{k}" if path else k)]
    return [path]


def test_the_chart_readme_documents_every_value_with_its_default() -> None:
    documented = documented_values()
    assert sorted(documented) == sorted(value_leaves(SCHEMA))
    for path, default in documented.items():
        value: Any = VALUES
        for key in path.split("."):
            value = value[key]
        assert json.loads(default) == value, path
