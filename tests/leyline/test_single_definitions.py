"""Two Leyline contracts have exactly one definition (ARCHITECTURE "Design rules"):
`leyline.enums.enum_names`, the value names of an enum without its reserved 0, and
`leyline.quantity`, the grammar of Kubernetes quantities.

A second definition is code outside those modules that filters an enum's items on a non-zero
number itself (`[name for name, number in E.items() if number != 0]`, or the same as a loop),
or that spells the quantity grammar: a regex alternating binary suffixes (`Ki|Mi|...`) or two
or more binary suffixes as separate strings (a suffix table). Each detector is pinned on the
copies it was written against, so it cannot quietly stop seeing them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("leyline", "trainer_image", "sidecar", "operator", "bench", "tests", "examples", "tools")
THIS_FILE = Path(__file__).resolve()
HOMES = {
    "enum names": ROOT / "leyline" / "enums.py",
    "quantity grammar": ROOT / "leyline" / "quantity.py",
}
"""The one module allowed to define each contract."""

BINARY_SUFFIXES = {"Ki", "Mi", "Gi", "Ti", "Pi", "Ei"}


def _tests_nonzero(test: ast.expr, name: str, *, bare: bool) -> bool:
    """Whether `test` keeps items whose `name` is non-zero (`n != 0`, `n > 0`, `0 != n`; a bare
    `n` when `bare`; or one of these inside `and`/`or`)."""
    if isinstance(test, ast.Name):
        return bare and test.id == name
    if isinstance(test, ast.BoolOp):
        return any(_tests_nonzero(value, name, bare=bare) for value in test.values)
    if isinstance(test, ast.Compare) and len(test.ops) == 1:
        left, right = test.left, test.comparators[0]
        sides = {type(left), type(right)}
        if sides != {ast.Name, ast.Constant}:
            return False
        variable = left if isinstance(left, ast.Name) else right
        constant = right if isinstance(right, ast.Constant) else left
        if not (isinstance(variable, ast.Name) and isinstance(constant, ast.Constant)):
            return False
        return (
            variable.id == name
            and constant.value == 0
            and isinstance(test.ops[0], ast.NotEq | ast.Gt | ast.Lt)
        )
    return False


def _pair_target(target: ast.expr) -> tuple[str, str] | None:
    if (
        isinstance(target, ast.Tuple)
        and len(target.elts) == 2
        and all(isinstance(e, ast.Name) for e in target.elts)
    ):
        first, second = target.elts
        assert isinstance(first, ast.Name) and isinstance(second, ast.Name)
        return first.id, second.id
    return None


def _reads_items(iterable: ast.expr) -> bool:
    """`x.items()`, or a variable named like an enum's items (`items`, `enum`)."""
    if isinstance(iterable, ast.Call) and isinstance(iterable.func, ast.Attribute):
        return iterable.func.attr == "items"
    return isinstance(iterable, ast.Name) and ("item" in iterable.id or "enum" in iterable.id)


def enum_name_filters_in(source: str) -> Iterator[str]:
    """Every place that drops an enum's 0 by hand while listing (name, number) pairs: an
    explicit comparison with 0 anywhere, a bare truth test only over an enum's items (a pair
    list filtered on a flag, `[f for f, on in flags if on]`, is not an enum)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ListComp | ast.SetComp | ast.GeneratorExp):
            for generator in node.generators:
                pair = _pair_target(generator.target)
                bare = _reads_items(generator.iter)
                if pair and any(_tests_nonzero(t, pair[1], bare=bare) for t in generator.ifs):
                    yield f"comprehension at line {node.lineno} drops the 0 of (name, number)"
        elif isinstance(node, ast.For) and (pair := _pair_target(node.target)):
            bare = _reads_items(node.iter)
            for statement in node.body:
                if isinstance(statement, ast.If) and _tests_nonzero(
                    statement.test, pair[1], bare=bare
                ):
                    yield f"loop at line {node.lineno} drops the 0 of (name, number)"


def quantity_grammars_in(source: str) -> Iterator[str]:
    """Every quantity regex, and a module spelling two or more binary suffixes (a table)."""
    suffixes: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in BINARY_SUFFIXES:
                suffixes.add(node.value)
            elif any(f"{a}|{b}" in node.value for a in BINARY_SUFFIXES for b in BINARY_SUFFIXES):
                yield f"quantity regex at line {node.lineno}"
    if len(suffixes) >= 2:
        yield f"suffix table spelling {sorted(suffixes)}"


DETECTORS = {"enum names": enum_name_filters_in, "quantity grammar": quantity_grammars_in}


def _python_files() -> Iterator[Path]:
    for top in SCANNED:
        for path in (ROOT / top).rglob("*.py"):
            generated = path.name.endswith(("_pb2.py", "_pb2_grpc.py"))
            if path.resolve() != THIS_FILE and ".venv" not in path.parts and not generated:
                yield path


@pytest.mark.parametrize("contract", sorted(DETECTORS))
def test_each_contract_is_defined_only_in_its_leyline_module(contract: str) -> None:
    found = [
        f"{path.relative_to(ROOT)}: {hit}"
        for path in _python_files()
        if path.resolve() != HOMES[contract]
        for hit in DETECTORS[contract](path.read_text())
    ]
    assert found == []


@pytest.mark.parametrize("contract", sorted(DETECTORS))
def test_the_one_definition_is_where_the_detector_looks(contract: str) -> None:
    assert list(DETECTORS[contract](HOMES[contract].read_text()))


OLD_ENUM_NAME_COPIES = {
    "sidecar metrics": (
        "def enum_names(enum):\n    return [name for name, number in enum if number != 0]\n"
    ),
    "operator metrics": (
        "def _names(wrapper, skip_zero=True):\n"
        "    items = getattr(wrapper, 'items')()\n"
        "    return [name for name, number in items if number or not skip_zero]\n"
    ),
    "sidecar slot gauge": (
        "for name, number in SlotCondition.items():\n"
        "    if number != 0:\n"
        "        gauge.labels(name).set(counts.get(number, 0))\n"
    ),
}


@pytest.mark.parametrize("source", OLD_ENUM_NAME_COPIES.values(), ids=OLD_ENUM_NAME_COPIES)
def test_detector_catches_a_hand_written_enum_names(source: str) -> None:
    assert list(enum_name_filters_in(source))


def test_detector_accepts_code_that_calls_enum_names() -> None:
    source = (
        "from leyline import EmergencyLevel, enum_names\n"
        "labels = enum_names(EmergencyLevel)\n"
        "clean = {k: v for k, v in raw.items() if v is not None}\n"
        "out = [flag for flag, on in flags if on]\n"
        "known = {int(number) for _, number in AnomalyKind.items()}\n"
    )
    assert list(enum_name_filters_in(source)) == []


OLD_QUANTITY_COPIES = {
    "operator regex": (
        "_QUANTITY = re.compile(r'^([0-9]+(?:\\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)?$')\n"
    ),
    "operator suffix table": "_FACTORS = {None: 1, 'Ki': 1024, 'Mi': 1024**2}\n",
    "operator formatter": "for suffix, f in (('Gi', GiB), ('Mi', MiB), ('Ki', 1024)):\n    pass\n",
}


@pytest.mark.parametrize("source", OLD_QUANTITY_COPIES.values(), ids=OLD_QUANTITY_COPIES)
def test_detector_catches_a_second_quantity_grammar(source: str) -> None:
    assert list(quantity_grammars_in(source))


def test_detector_accepts_quantities_written_as_values() -> None:
    source = (
        "from leyline.quantity import format_quantity, parse_bytes\n"
        "limit = parse_bytes('4Gi')\n"
        "assert format_quantity(1088 * MiB) == '1088Mi'\n"
    )
    assert list(quantity_grammars_in(source)) == []
