"""Snapshots and checkpoints are never unpickled (ARCHITECTURE design rules; R6.2, R6.3).

Two proofs: no source file of the sidecar or Leyline imports or calls a deserializer that can
run code, and a checkpoint restores with every pickle entry point made to raise.
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest

from tests.sidecar.scenarios import RUN_ID, SPEC, content, write_index
from tolaria_sidecar.checkpoints import DurableStore

ROOT = Path(__file__).resolve().parents[2]
SCANNED = (ROOT / "sidecar", ROOT / "leyline")
FORBIDDEN_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve"}
FORBIDDEN_CALLS = {"torch.load", "pickle.load", "pickle.loads", "marshal.loads", "shelve.open"}


def dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def violations(text: str, label: str) -> list[str]:
    """Each forbidden import or call in `text`, as "<label>:<line> <what>"."""
    found = []
    for node in ast.walk(ast.parse(text, filename=label)):
        where = f"{label}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "") in FORBIDDEN_MODULES:
            found.append(f"{where} from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = dotted(node.func)
            if name in FORBIDDEN_CALLS:
                found.append(f"{where} {name}(...)")
            pickles = any(
                k.arg == "allow_pickle"
                and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                for k in node.keywords
            )
            if name.endswith("load") and pickles:
                found.append(f"{where} {name}(allow_pickle=...)")
    return found


def sources() -> list[Path]:
    return [p for base in SCANNED for p in sorted(base.rglob("*.py"))]


@pytest.mark.req("R6.3")
def test_the_scan_sees_the_store_and_the_slot_layout() -> None:
    names = {p.name for p in sources()}
    assert {"checkpoints.py", "wal.py", "shm.py", "checksum.py"} <= names


@pytest.mark.req("R6.3")
def test_the_scan_catches_each_forbidden_form() -> None:
    probe = (
        "import pickle\n"
        "from marshal import loads\n"
        "import torch\n"
        "torch.load('x')\n"
        "np.load('x', allow_pickle=True)\n"
        "np.load('x', allow_pickle=False)\n"
    )
    assert violations(probe, "probe.py") == [
        "probe.py:1 import pickle",
        "probe.py:2 from marshal import ...",
        "probe.py:4 torch.load(...)",
        "probe.py:5 np.load(allow_pickle=...)",
    ]


@pytest.mark.req("R6.3")
def test_no_sidecar_or_leyline_source_can_unpickle() -> None:
    found = [
        v for path in sources() for v in violations(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert found == []


@pytest.mark.req("R6.3")
def test_a_checkpoint_restores_with_every_pickle_entry_point_raising(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a checkpoint path reached pickle")

    class RefusingUnpickler:
        def __init__(self, *args: object, **kwargs: object) -> None:
            refuse()

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    buffer = memoryview(bytearray(64 * 1024))
    with DurableStore(tmp_path / "checkpoints", SPEC, run_id=RUN_ID) as store:
        write_index(store, 1, 1)
    with DurableStore(tmp_path / "checkpoints", SPEC, run_id=RUN_ID) as reopened:
        record, manifest, length = reopened.load_latest(buffer)
    assert (manifest, bytes(buffer[:length])) == content(1, record.epoch)
