"""Reads a `TolariaRun` manifest from YAML and refuses bad input at the edge.

YAML is parsed with a safe loader that also reads `1e-3` as a float (PyYAML's
YAML 1.1 resolver would keep it a string, unlike kubectl) and refuses a key
written twice in one mapping (PyYAML would silently keep the last value, so
`epochs: 500` above `epochs: 5` would train 5 epochs). Every problem is
reported as `path: rule`, e.g. `spec.training.epochs: must be >= 1`.

Callers: `tolaria run`/`validate`, the trainer worker and the sidecar, which
all read manifest files. The operator never does: the API server parses YAML
and hands it JSON, so `validate_manifest` is its entry point.
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


MERGE_KEY = "tag:yaml.org,2002:merge"
"""`<<: *anchor`: merged keys may be overridden by the mapping's own, so they are no duplicates."""


def _key_text(node: yaml.Node) -> str | None:
    """A scalar key as the path spells it; None for a merge key or a non-scalar key."""
    if isinstance(node, yaml.ScalarNode) and node.tag != MERGE_KEY:
        return str(node.value)
    return None


def _where(mark: yaml.Mark, earlier: yaml.Mark) -> tuple[str, str]:
    """Both places as `line N`, with columns when they share a line (`{lr: 1, lr: 2}`)."""
    if mark.line != earlier.line:
        return f"line {mark.line + 1}", f"line {earlier.line + 1}"
    return (
        f"line {mark.line + 1} column {mark.column + 1}",
        f"column {earlier.column + 1}",
    )


def _duplicate_keys(root: yaml.Node) -> list[FieldError]:
    """Every key written twice in one mapping of `root`, named by its path and both lines.

    Walks the composed node tree (before construction, which is where PyYAML lets the last
    value win). Keys compare by tag and text, so `epochs` and `"epochs"` are the same key. An
    aliased node is walked once, which also ends the walk of a recursive alias.
    """
    found: list[tuple[int, FieldError]] = []
    walked: set[int] = set()
    todo: list[tuple[yaml.Node, str]] = [(root, "")]
    while todo:
        node, path = todo.pop()
        if id(node) in walked:
            continue
        walked.add(id(node))
        children: list[tuple[yaml.Node, str]] = []
        if isinstance(node, yaml.SequenceNode):
            children = [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        first: dict[tuple[str, str], yaml.Mark] = {}
        for key, value in node.value if isinstance(node, yaml.MappingNode) else ():
            text = _key_text(key)
            if text is None:  # a merge, or a key no path can name: its value sits at `path`
                children.append((value, path))
                continue
            child = f"{path}.{text}" if path else text
            earlier = first.setdefault((key.tag, text), key.start_mark)
            if earlier is not key.start_mark:
                here, there = _where(key.start_mark, earlier)
                rule = (
                    f"duplicate key at {here} (first at {there}); "
                    "YAML would silently keep only the last value"
                )
                found.append((key.start_mark.index, FieldError(child, rule)))
            children.append((value, child))
        # depth first in file order, so an aliased mapping is named where its anchor is written
        todo.extend(reversed(children))
    return [error for _, error in sorted(found, key=lambda item: item[0])]


def parse_document(text: str, source: str) -> dict[str, Any]:
    """The single YAML document in `text` as a mapping; refuses a key written twice."""
    try:
        nodes = list(yaml.compose_all(text, Loader=_Loader))
        duplicates = [e for node in nodes if node is not None for e in _duplicate_keys(node)]
        if duplicates:
            raise ManifestInvalid(source, duplicates)
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
