"""The committed Leyline bindings are exactly what the `.proto` sources generate."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _codegen() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "run_codegen", ROOT / "leyline" / "run_codegen.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_bindings_match_a_fresh_generation(tmp_path: Path) -> None:
    generated = _codegen().generate(tmp_path)
    assert generated, "codegen produced nothing"
    drift = [
        str(rel)
        for rel in generated
        if not (ROOT / rel).exists() or (ROOT / rel).read_bytes() != (tmp_path / rel).read_bytes()
    ]
    assert drift == [], f"regenerate with `python leyline/run_codegen.py`: {drift}"


def test_no_stale_generated_file_outlives_its_proto(tmp_path: Path) -> None:
    generated = {str(p) for p in _codegen().generate(tmp_path)}
    committed = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "leyline" / "v1").iterdir()
        if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"))
    }
    assert committed == generated


@pytest.mark.parametrize(
    "proto", sorted((ROOT / "leyline" / "v1").glob("*.proto")), ids=lambda p: p.name
)
def test_every_proto_is_in_the_leyline_package(proto: Path) -> None:
    assert "package esper.leyline.v1;" in proto.read_text()
