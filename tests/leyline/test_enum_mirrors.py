"""No code outside `leyline/` re-declares a Leyline enum (ARCHITECTURE design rules).

A mirror is an `Enum` class, or a dict literal keyed by strings, whose names
are the value names of one Leyline enum (two or more of them, with or without
the enum's common prefix, case-insensitive), or a string literal spelling a
full prefixed Leyline value name. Code uses `leyline` enums and `Enum.Name(v)`.
A second `enum_names` (or quantity grammar) is caught by `test_single_definitions.py`.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from pathlib import Path

from google.protobuf.descriptor import EnumDescriptor

from leyline.v1 import leyline_pb2, report_pb2, resilience_pb2, runtime_pb2, sidecar_pb2

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("trainer_image", "sidecar", "operator", "bench", "tests", "examples", "charts")
THIS_FILE = Path(__file__).resolve()


def _leyline_enums() -> dict[str, EnumDescriptor]:
    enums: dict[str, EnumDescriptor] = {}
    for module in (leyline_pb2, report_pb2, resilience_pb2, runtime_pb2, sidecar_pb2):
        enums.update(module.DESCRIPTOR.enum_types_by_name)
    return enums


def _short_names(enum: EnumDescriptor) -> set[str]:
    """Value names with and without the enum's common prefix, as spelled in the proto."""
    names = [v.name for v in enum.values if v.number != 0]
    prefix = os.path.commonprefix(names)
    prefix = prefix[: prefix.rfind("_") + 1] if "_" in prefix else ""
    return {n.removeprefix(prefix) for n in names} | set(names)


ENUMS = _leyline_enums()
SHORT = {name: _short_names(e) for name, e in ENUMS.items()}
SHORT_FOLDED = {name: {n.lower() for n in short} for name, short in SHORT.items()}
FULL_PREFIXED = {
    v.name for e in ENUMS.values() for v in e.values if "_" in v.name and v.name.isupper()
}


def mirrors_in(source: str, *, literals: bool = True) -> Iterator[str]:
    """Yields a description of every mirror in one Python source.

    Enum classes are compared case-insensitively (a mirror may spell `SGD`
    for `sgd`); dict keys exactly as the proto spells them, so manifest-like
    dicts with keys such as "model" are not mistaken for `StateComponent`.
    `literals=False` skips the string-literal rule (tests compare report
    JSON, where the enum name is the serialised form).
    """
    tree = ast.parse(source)
    for node in ast.walk(tree):
        names: set[str] = set()
        what = ""
        table = SHORT
        if isinstance(node, ast.ClassDef) and any(
            isinstance(b, ast.Name | ast.Attribute) and "Enum" in ast.unparse(b) for b in node.bases
        ):
            what = f"enum class {node.name}"
            table = SHORT_FOLDED
            for stmt in node.body:
                if isinstance(stmt, ast.Assign):
                    names |= {t.id.lower() for t in stmt.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.Dict):
            what = f"dict at line {node.lineno}"
            names = {
                k.value
                for k in node.keys
                if isinstance(k, ast.Constant) and isinstance(k.value, str)
            }
        elif literals and isinstance(node, ast.Constant) and node.value in FULL_PREFIXED:
            yield f"string literal {node.value!r} at line {node.lineno}"
            continue
        for enum_name, short in table.items():
            overlap = names & short
            if len(overlap) >= 2:
                yield f"{what} mirrors {enum_name}: {sorted(overlap)}"


def _python_files() -> Iterator[Path]:
    for top in SCANNED:
        for path in (ROOT / top).rglob("*.py"):
            if path.resolve() != THIS_FILE and ".venv" not in path.parts:
                yield path


def test_no_code_outside_leyline_mirrors_a_leyline_enum() -> None:
    found = [
        f"{p.relative_to(ROOT)}: {m}"
        for p in _python_files()
        for m in mirrors_in(p.read_text(), literals=p.parts[len(ROOT.parts)] != "tests")
    ]
    assert found == []


def test_detector_catches_an_enum_class_mirror() -> None:
    source = "import enum\nclass Level(enum.IntEnum):\n    MINOR = 1\n    MAJOR = 2\n"
    assert any("EmergencyLevel" in m for m in mirrors_in(source))


def test_detector_catches_a_dict_keyed_by_stage_names() -> None:
    source = "WEIGHTS = {'DORMANT': 0.0, 'TRAINING': 0.1, 'BLENDING': 0.5}\n"
    assert any("SeedLifecycleStage" in m for m in mirrors_in(source))


def test_detector_catches_a_string_copy_of_a_value_name() -> None:
    assert list(mirrors_in("state = 'CIRCUIT_STATE_OPEN'\n"))


def test_detector_accepts_code_that_uses_leyline_enums() -> None:
    source = (
        "from leyline import CircuitBreakerState\n"
        "name = CircuitBreakerState.Name(CircuitBreakerState.CIRCUIT_STATE_OPEN)\n"
    )
    assert list(mirrors_in(source)) == []
