"""The run report: `<workdir>/<run>/report.json`, the JSON form of Leyline `RunReport`.

Written once at the end of a run however it ends (the CLI writes it in a
`finally`), with proto field names and zero values spelled out, so a reader
sees `"rollbacks": []` rather than a missing key. Written to a temporary file
and renamed, so a reader never sees half a report; on a full disk into the
space reserved when the run started (`report_file.py`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from leyline import LossSummary, RunReport


def loss_summary(values: list[float]) -> LossSummary:
    """First, last and best (lowest) of a series; `has_value` false when empty."""
    finite = [v for v in values if math.isfinite(v)]
    if not values:
        return LossSummary()
    return LossSummary(
        first=values[0], last=values[-1], best=min(finite) if finite else math.nan, has_value=True
    )


def accuracy_summary(values: list[float]) -> LossSummary:
    """As `loss_summary`, but best is the highest."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return LossSummary()
    return LossSummary(first=values[0], last=values[-1], best=max(finite), has_value=True)


_INT64 = frozenset(
    (
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    )
)


def _numbers(message: Message, data: dict[str, Any]) -> dict[str, Any]:
    """Canonical proto JSON writes 64-bit integers as strings; the report writes numbers.

    `json_format.Parse` accepts either, so the file stays a valid RunReport.
    """
    for field in message.DESCRIPTOR.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.type in _INT64:
            data[field.name] = [int(v) for v in value] if field.is_repeated else int(value)
            continue
        nested = field.message_type
        if nested is None or nested.GetOptions().map_entry:
            continue
        if nested.full_name.startswith("google.protobuf."):
            continue
        sub = getattr(message, field.name)
        if field.is_repeated:
            data[field.name] = [_numbers(m, d) for m, d in zip(sub, value, strict=True)]
        else:
            data[field.name] = _numbers(sub, value)
    return data


def report_json(report: RunReport) -> str:
    data = json_format.MessageToDict(
        report,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    return json.dumps(_numbers(report, data), indent=2)


def write_report(report: RunReport, path: Path) -> None:
    """Writes the report JSON to `path`: atomically, or on a full disk into the space reserved
    at the start of the run (`report_file.write`; raises `ReportNotWritten`)."""
    from tolaria_trainer import report_file  # it builds on report_json: imported when used

    report_file.write(report, path)


def read_report(path: Path) -> RunReport:
    """Parses a report written by `write_report` (strict: unknown fields are refused)."""
    report = RunReport()
    json_format.Parse(path.read_text(encoding="utf-8"), report)
    return report


def report_dict(report: RunReport) -> dict[str, object]:
    loaded: dict[str, object] = json.loads(report_json(report))
    return loaded
