"""JSON schemas of the Prometheus Operator objects the chart renders (monitoring.coreos.com/v1
ServiceMonitor, PodMonitor, PrometheusRule), which `kubernetes-validate` does not know: they
are CRDs, not part of Kubernetes.

Written for this project, not copied from the Prometheus Operator: they cover only the fields
the chart writes, with the names, types and enums of the Prometheus Operator's v1 API reference
(endpoints, podMetricsEndpoints, relabelings as RelabelConfig, namespaceSelector, rule groups).
Like kubernetes-validate's strict mode, every object refuses keys it does not declare: the
real CRDs would prune a misspelt field without a word, and the monitor would quietly scrape
without its relabelling. What they cannot catch is a field the chart never writes being
required upstream; none is (selector is the only required field of both monitors).
"""

from __future__ import annotations

from typing import Any

DURATION = (
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
LABEL_NAME = r"^[a-zA-Z_][a-zA-Z0-9_]*$"


def _strict(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
        "required": list(required),
    }


STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = _strict(
    {
        "name": {"type": "string", "minLength": 1, "maxLength": 253},
        "namespace": {"type": "string", "minLength": 1, "maxLength": 63},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
    ("name", "namespace"),
)
LABEL_SELECTOR = _strict(
    {
        "matchLabels": STRING_MAP,
        "matchExpressions": {
            "type": "array",
            "items": _strict(
                {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
                ("key", "operator"),
            ),
        },
    }
)
NAMESPACE_SELECTOR = _strict(
    {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}
)
RELABELING = _strict(
    {
        "action": {
            "enum": [
                "replace",
                "Replace",
                "keep",
                "Keep",
                "drop",
                "Drop",
                "hashmod",
                "HashMod",
                "labelmap",
                "LabelMap",
                "labeldrop",
                "LabelDrop",
                "labelkeep",
                "LabelKeep",
                "lowercase",
                "Lowercase",
                "uppercase",
                "Uppercase",
                "keepequal",
                "KeepEqual",
                "dropequal",
                "DropEqual",
            ]
        },
        "sourceLabels": {
            "type": "array",
            "items": {"type": "string", "pattern": LABEL_NAME},
        },
        "separator": {"type": "string"},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "modulus": {"type": "integer", "minimum": 0},
        "replacement": {"type": "string"},
    }
)
ENDPOINT = {
    "port": {"type": "string", "minLength": 1},
    "path": {"type": "string", "pattern": "^/"},
    "interval": {"type": "string", "pattern": DURATION},
    "scrapeTimeout": {"type": "string", "pattern": DURATION},
    "relabelings": {"type": "array", "items": RELABELING},
    "metricRelabelings": {"type": "array", "items": RELABELING},
}
RULE = _strict(
    {
        "record": {"type": "string"},
        "alert": {"type": "string"},
        "expr": {"type": ["string", "integer"]},
        "for": {"type": "string", "pattern": DURATION},
        "keep_firing_for": {"type": "string", "pattern": DURATION},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
    ("expr",),
)
RULE_GROUP = _strict(
    {
        "name": {"type": "string", "minLength": 1},
        "interval": {"type": "string", "pattern": DURATION},
        "query_offset": {"type": "string", "pattern": DURATION},
        "limit": {"type": "integer", "minimum": 0},
        "labels": STRING_MAP,
        "partial_response_strategy": {"type": "string"},
        "rules": {"type": "array", "items": RULE},
    },
    ("name",),
)


def _object(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return _strict(
        {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": METADATA,
            "spec": spec,
        },
        ("apiVersion", "kind", "metadata", "spec"),
    )


SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": _object(
        "ServiceMonitor",
        _strict(
            {
                "selector": LABEL_SELECTOR,
                "namespaceSelector": NAMESPACE_SELECTOR,
                "endpoints": {"type": "array", "minItems": 1, "items": _strict(ENDPOINT)},
                "jobLabel": {"type": "string"},
            },
            ("selector",),
        ),
    ),
    "PodMonitor": _object(
        "PodMonitor",
        _strict(
            {
                "selector": LABEL_SELECTOR,
                "namespaceSelector": NAMESPACE_SELECTOR,
                "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _strict(ENDPOINT)},
                "jobLabel": {"type": "string"},
            },
            ("selector",),
        ),
    ),
    "PrometheusRule": _object(
        "PrometheusRule",
        _strict({"groups": {"type": "array", "items": RULE_GROUP}}, ("groups",)),
    ),
}
"""A schema per Prometheus Operator kind the chart renders."""
