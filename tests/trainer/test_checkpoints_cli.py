"""`tolaria checkpoints DIR` (R6.3, R13.5): lists and verifies a checkpoint directory, read-only.

Directories are written by the real sidecar store; the command is run through `cli.main`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from leyline.durable.wal_format import WAL_NAME, scan
from tests.sidecar.scenarios import INSTANCE_ID, LINEAGE_ID, RUN_ID, SPEC, write_index
from tolaria_sidecar.checkpoints import DurableStore
from tolaria_trainer.cli import main

SEED = 3


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    """Checkpoints 1, 2 and 3 committed by a real store."""
    path = tmp_path / "checkpoints"
    with DurableStore(path, SPEC, run_id=RUN_ID) as store:
        for index in (1, 2, 3):
            write_index(store, SEED, index)
    return path


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(raw)


@pytest.mark.req("R13.5")
def test_an_intact_directory_is_listed_file_by_file_and_exits_0(
    directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["checkpoints", str(directory)]) == 0
    out = capsys.readouterr().out
    for index in (1, 2, 3):
        (row,) = [line for line in out.splitlines() if f"-e{index}.bin" in line]
        assert row.split()[2:] == [
            str(index),
            str(index),
            INSTANCE_ID,
            LINEAGE_ID,
            "committed",
            "committed",
            "yes",
        ]
    assert "wal.log: " in out and "intact" in out and "ok: every checkpoint file verifies" in out


@pytest.mark.req("R13.5")
def test_json_output_has_every_file_and_the_wal(
    directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["checkpoints", str(directory), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["damaged"] is False and report["wal"]["damaged"] is False
    assert [(f["global_step"], f["wal_state"], f["verified"]) for f in report["files"]] == [
        (1, "committed", True),
        (2, "committed", True),
        (3, "committed", True),
    ]
    assert {f["instance_id"] for f in report["files"]} == {INSTANCE_ID}


@pytest.mark.req("R13.5")
def test_a_damaged_file_exits_1_naming_it_and_the_failed_check(
    directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (newest,) = directory.glob("ckpt-*-e3.bin")
    flip(newest, newest.stat().st_size - 1)
    assert main(["checkpoints", str(directory)]) == 1
    out = capsys.readouterr().out
    (row,) = [line.split() for line in out.splitlines() if line.split()[:1] == [newest.name]]
    assert row[-1] == "NO"
    assert f"{newest.name}: " in out and "data xxh3" in out and "DAMAGED" in out


@pytest.mark.req("R13.5")
def test_wal_damage_exits_1_and_shows_where(
    directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wal = directory / WAL_NAME
    second = scan(wal.read_bytes()).records[1]
    flip(wal, second.offset + 20)
    assert main(["checkpoints", str(directory), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["wal"]["damaged"] is True
    assert report["wal"]["damage"][0]["offset"] == second.offset
    assert "header crc32c" in report["wal"]["damage"][0]["reason"]
    assert [f["fate"] for f in report["files"]] == ["adopted", "committed", "committed"]


@pytest.mark.req("R13.5")
def test_a_torn_tail_is_shown_but_is_not_damage(
    directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with (directory / WAL_NAME).open("ab") as f:
        f.write(b"ESPERWAL\x01\x00")
    assert main(["checkpoints", str(directory)]) == 0
    assert "torn tail" in capsys.readouterr().out


@pytest.mark.req("R13.5")
def test_a_missing_wal_exits_1(directory: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (directory / WAL_NAME).unlink()
    assert main(["checkpoints", str(directory)]) == 1
    out = capsys.readouterr().out
    assert "wal.log: missing" in out and out.count("adopted") == 3


@pytest.mark.req("R13.5")
def test_not_a_directory_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["checkpoints", str(tmp_path / "absent")]) == 2
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.req("R13.5")
def test_it_reads_beside_a_running_store_and_changes_nothing(
    directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (directory / "ckpt-0000000099.tmp").write_bytes(b"a write in progress")
    with (directory / WAL_NAME).open("ab") as f:
        f.write(b"ESPERWAL")
    before = files_of(directory)
    with DurableStore(directory.parent / "other", SPEC, run_id=RUN_ID):
        assert main(["checkpoints", str(directory)]) == 0
    assert files_of(directory) == before
    with DurableStore(directory, SPEC, run_id=RUN_ID):  # holds the WAL's lock
        assert main(["checkpoints", str(directory)]) == 0
    capsys.readouterr()


@pytest.mark.req("R13.5")
def test_the_command_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "from tolaria_trainer.cli import main\n"
        "main(['checkpoints', '.'])\n"
        "sys.exit(1 if 'torch' in sys.modules else 0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**os.environ},
        cwd=Path(__file__).parent,
    )
    assert done.returncode == 0, done.stderr
