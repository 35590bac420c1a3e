"""Reads a `TolariaRun` manifest from YAML and refuses bad input at the edge.

YAML is parsed with a safe loader that also reads `1e-3` as a float (PyYAML's
YAML 1.1 resolver would keep it a string, unlike kubectl). Every problem is
reported as `path: rule`, e.g. `spec.training.epochs: must be >= 1`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from leyline.spec.errors import FieldError, field_errors
from leyline.spec.run import TolariaRun


class ManifestInvalid(ValueError):
    """The manifest cannot be run; `errors` names each field and the rule it broke."""

    def __init__(self, source: str, errors: list[FieldError]) -> None:
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {e}" for e in errors)
        super().__init__(f"{source}: invalid TolariaRun manifest:\n{lines}")


class _Loader(yaml.SafeLoader):
    """SafeLoader whose float resolver accepts `1e-3` and `1E+5` (YAML 1.2 style)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_document(text: str, source: str) -> dict[str, Any]:
    """The single YAML document in `text` as a mapping."""
    try:
        docs = [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]
    except yaml.YAMLError as err:
        raise ManifestInvalid(source, [FieldError("(yaml)", f"not valid YAML: {err}")]) from err
    if len(docs) != 1:
        rule = f"must hold exactly one YAML document, found {len(docs)}"
        raise ManifestInvalid(source, [FieldError("(file)", rule)])
    doc = docs[0]
    if not isinstance(doc, dict):
        raise ManifestInvalid(source, [FieldError("(root)", "must be a mapping")])
    return doc


def _as_the_server_reads(value: Any) -> Any:
    """What the API server sees in a manifest: explicit nulls dropped (`epochs: null` means
    "the default" in both places) and whole floats read as integers (`epochs: 10.0` is 10;
    a number field takes an int as well, so nothing else changes)."""
    if isinstance(value, dict):
        return {k: _as_the_server_reads(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_as_the_server_reads(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


def validate_manifest(doc: dict[str, Any], source: str = "<manifest>") -> TolariaRun:
    """Validates a parsed manifest; raises `ManifestInvalid` naming every bad field.

    Strict: no string-to-number or bool-to-int coercion, exactly like the
    API server's schema validation, so both refuse the same manifests.
    """
    try:
        return TolariaRun.model_validate(_as_the_server_reads(doc), strict=True)
    except ValidationError as err:
        raise ManifestInvalid(source, field_errors(err)) from err


def load_manifest(path: Path) -> TolariaRun:
    """Reads and validates a manifest file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestInvalid(str(path), [FieldError("(file)", f"cannot read: {err}")]) from err
    return validate_manifest(parse_document(text, str(path)), str(path))
