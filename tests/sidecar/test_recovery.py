"""Recovery at open (R6.3, R6.4, R13.5): damage anywhere never deletes or hides an intact
checkpoint, a damaged one is never restored, and what was found is reported.

Every test damages real files of a real history (BEGIN, COMMIT, ABORT, RETIRE and COMPACTED
records; checkpoints 7, 8 and 9 live) and opens a real store on them. `inspect_directory` is run
first on the same bytes: it must change nothing and predict exactly what the store then does.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from leyline.durable import Fate, inspect_directory, wal_format
from leyline.durable.checkpoint_file import HEADER_BYTES as FILE_HEADER_BYTES
from leyline.durable.wal_format import HEADER_BYTES, WAL_NAME, Op
from leyline.v1 import sidecar_pb2 as pb
from leyline.v1.resilience_pb2 import WalRecovery
from tests.sidecar.conftest import Served
from tests.sidecar.scenarios import (
    INSTANCE_ID,
    LINEAGE_ID,
    RUN_ID,
    SPEC,
    content,
    seed_full_write,
    write_index,
)
from tolaria_sidecar import checkpoints, wal
from tolaria_sidecar.checkpoints import DurableStore
from tolaria_sidecar.config import SidecarConfig
from tolaria_sidecar.errors import (
    CheckpointCorrupt,
    CheckpointDirectoryLocked,
    CheckpointWriteFailed,
    ConfigInvalid,
    InjectedCrash,
)
from tolaria_sidecar.faults import Faults
from tolaria_sidecar.sidecar import Sidecar

SEED = 5
INTACT = (7, 8, 9)
"""The live checkpoints of the history, by step (= epoch = index)."""
ABORTED_INDEX = 99
HISTORY_OPS = [
    Op.COMMIT,  # 5 (kept by compaction; retired later)
    Op.COMMIT,  # 6 (idem)
    Op.COMMIT,  # 7
    Op.COMPACTED,
    Op.BEGIN,  # 8
    Op.COMMIT,  # 8
    Op.RETIRE,  # 5
    Op.BEGIN,  # a write that failed
    Op.ABORT,
    Op.BEGIN,  # 9
    Op.COMMIT,  # 9
    Op.RETIRE,  # 6
]
ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def build_history(directory: Path) -> None:
    """Checkpoints 4..9 written, one write failed, 4..6 retired, the log compacted once."""
    seed_full_write(directory, SEED)
    faults = Faults()
    with DurableStore(directory, SPEC, run_id=RUN_ID, faults=faults) as store:
        write_index(store, SEED, 7)  # retires 4, then compacts
        write_index(store, SEED, 8)
        faults.fail_at("checkpoint.after_data_write", ENOSPC)
        with pytest.raises(CheckpointWriteFailed):
            write_index(store, SEED, ABORTED_INDEX)
        write_index(store, SEED, 9)


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The template history, built once per module (each test damages its own copy)."""
    directory = tmp_path_factory.mktemp("history") / "checkpoints"
    build_history(directory)
    return directory


@pytest.fixture
def copy(history: Path, tmp_path: Path) -> Path:
    """A private copy of the history to damage."""
    directory = tmp_path / "checkpoints"
    shutil.copytree(history, directory)
    return directory


def wal_records(directory: Path) -> tuple[wal_format.WalRecord, ...]:
    return wal_format.scan((directory / WAL_NAME).read_bytes()).records


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= mask
    path.write_bytes(raw)


def bin_names(directory: Path) -> set[str]:
    return {p.name for p in directory.glob("*.bin")}


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def file_of(directory: Path, step: int) -> Path:
    (found,) = directory.glob(f"ckpt-*-e{step}.bin")
    return found


@dataclass(frozen=True)
class Opened:
    recovery: WalRecovery
    listed: tuple[int, ...]
    """Steps of the committed checkpoints, newest first."""


def open_and_check(
    directory: Path,
    *,
    intact: tuple[int, ...] = INTACT,
    refused: tuple[int, ...] = (),
    may_remove: frozenset[str] = frozenset(),
) -> Opened:
    """Opens a store on a damaged directory and checks the promises of recovery.

    * `inspect_directory` changes nothing and predicts the store's adopted, removed and
      damaged files exactly;
    * every `intact` checkpoint is listed and loads bit for bit; the newest one is restored;
    * every `refused` one (listed, damaged) raises `CheckpointCorrupt` and is never restored;
    * no checkpoint file is deleted but those in `may_remove`;
    * a second open finds nothing new (damaged files stay kept and reported) and lists the
      same checkpoints (idempotent).
    """
    before = files_of(directory)
    predicted = inspect_directory(directory)
    assert files_of(directory) == before, "inspect_directory must be read-only"
    buffer = memoryview(bytearray(64 * 1024))
    with DurableStore(directory, SPEC, run_id=RUN_ID) as store:
        recovery = store.recovery
        listed = {r.global_step: r for r in store.committed()}
        assert set(intact) <= set(listed), (sorted(listed), recovery)
        for step in intact:
            manifest, length = store.load(listed[step], buffer)
            assert (manifest, bytes(buffer[:length])) == content(SEED, step)
        for step in refused:
            with pytest.raises(CheckpointCorrupt):
                store.load(listed[step], buffer)
        record, manifest, length = store.load_latest(buffer)
        assert record.global_step == max(intact)
        assert (manifest, bytes(buffer[:length])) == content(SEED, record.global_step)
        assert {r.global_step for r, _ in store.last_rejections} == {
            s for s in refused if s > max(intact)
        }
        order = [(r.sequence, r.global_step) for r in store.committed()]
    deleted = {name for name in before if name.endswith(".bin")} - bin_names(directory)
    assert deleted <= may_remove, f"deleted {sorted(deleted)}"
    assert list(recovery.adopted_files) == list(predicted.recovery.adopted_files)
    assert list(recovery.removed_files) == list(predicted.recovery.removed_files)
    assert list(recovery.damaged_files) == list(predicted.recovery.damaged_files)
    if recovery.preserved_copy:
        assert (directory / recovery.preserved_copy).read_bytes() == before[WAL_NAME]
    with DurableStore(directory, SPEC, run_id=RUN_ID) as again:
        found = again.recovery
        assert not (found.adopted_files or found.removed_files or found.torn_tail), found
        assert found.damaged_bytes == 0 and not found.preserved_copy, found
        assert list(found.damaged_files) == list(recovery.damaged_files), "kept, still reported"
        assert [(r.sequence, r.global_step) for r in again.committed()] == order
    return Opened(recovery, tuple(step for _, step in order))


def assert_reported(recovery: WalRecovery) -> None:
    assert recovery.reason and recovery.damaged_bytes > 0 and recovery.HasField("at")


# -- the history --------------------------------------------------------------------------------


@pytest.mark.req("R6.3")
def test_the_history_holds_every_kind_of_record_and_three_live_checkpoints(
    history: Path,
) -> None:
    assert [r.header.op for r in wal_records(history)] == HISTORY_OPS
    report = inspect_directory(history)
    assert not report.is_damaged and not report.torn_tail
    assert [(f.global_step, f.fate) for f in report.files] == [(s, Fate.COMMITTED) for s in INTACT]
    assert all(len(content(SEED, step)[1]) > 2 for step in INTACT)


# -- the two bugs that deleted or hid intact checkpoints ----------------------------------------


@pytest.mark.req("R6.3")
def test_a_flipped_bit_in_a_mid_log_commit_never_deletes_or_hides_a_checkpoint(
    copy: Path,
) -> None:
    commit_of_8 = wal_records(copy)[5]
    flip(copy / WAL_NAME, commit_of_8.offset + 44)  # the epoch field of COMMIT(8)
    opened = open_and_check(copy)
    assert opened.listed == (9, 8, 7)
    assert list(opened.recovery.adopted_files) == [file_of(copy, 8).name]
    assert not opened.recovery.torn_tail and opened.recovery.preserved_copy == "wal.log.damaged-1"
    assert_reported(opened.recovery)


@pytest.mark.req("R6.3")
@pytest.mark.parametrize("how", ["missing", "empty", "garbage"])
def test_a_missing_empty_or_garbage_wal_hides_no_intact_checkpoint(copy: Path, how: str) -> None:
    wal = copy / WAL_NAME
    if how == "missing":
        wal.unlink()
    elif how == "empty":
        wal.write_bytes(b"")
    else:
        wal.write_bytes(os.urandom(3000).replace(b"E", b"e"))
    opened = open_and_check(copy)
    assert opened.listed == (9, 8, 7)
    assert sorted(opened.recovery.adopted_files) == sorted(file_of(copy, s).name for s in INTACT)
    assert opened.recovery.reason
    assert bool(opened.recovery.preserved_copy) == (how == "garbage")
    with DurableStore(copy, SPEC, run_id=RUN_ID) as store:
        adopted = store.committed()
    assert all(r.recovered_from_file for r in adopted)
    assert {(r.instance_id, r.lineage_id) for r in adopted} == {(INSTANCE_ID, LINEAGE_ID)}
    assert {r.manifest_digest for r in adopted} == {f"{SEED:016x}"}


# -- a flipped byte in every region of the WAL ---------------------------------------------------

WAL_FIELDS = {
    "magic": 0,
    "version": 8,
    "op": 10,
    "reserved": 12,
    "sequence": 16,
    "transaction id": 24,
    "epoch": 40,
    "payload length": 48,
    "payload crc": 56,
    "header crc": 60,
    "zero padding": 64,
    "last header byte": 255,
}
PAYLOAD_SPOTS = ("payload first byte", "payload middle byte", "payload last byte")


def wal_spot(record: wal_format.WalRecord, region: str) -> int | None:
    if region in WAL_FIELDS:
        return record.offset + WAL_FIELDS[region]
    length = len(record.payload)
    if length == 0:
        return None
    at = {"payload first byte": 0, "payload middle byte": length // 2}.get(region, length - 1)
    return record.offset + HEADER_BYTES + at


@pytest.mark.req("R6.4")
@pytest.mark.parametrize("region", [*WAL_FIELDS, *PAYLOAD_SPOTS])
@pytest.mark.parametrize(
    "index", range(len(HISTORY_OPS)), ids=lambda i: f"{i}-{HISTORY_OPS[i].name}"
)
def test_a_flipped_byte_anywhere_in_the_wal_loses_no_checkpoint_and_is_reported(
    copy: Path, index: int, region: str
) -> None:
    record = wal_records(copy)[index]
    spot = wal_spot(record, region)
    if spot is None:
        pytest.skip(f"a {record.header.op.name} record has no payload")
    flip(copy / WAL_NAME, spot)
    opened = open_and_check(copy)
    assert opened.listed == (9, 8, 7)
    assert_reported(opened.recovery)
    last = index == len(HISTORY_OPS) - 1
    assert opened.recovery.torn_tail == last
    assert bool(opened.recovery.preserved_copy) == (not last)
    assert not opened.recovery.removed_files and not opened.recovery.damaged_files


# -- a flipped byte in every region of a checkpoint file -----------------------------------------

FILE_FIELDS = {
    "magic": 0,
    "format version": 8,
    "header bytes": 12,
    "manifest length": 16,
    "data length": 24,
    "manifest xxh3": 32,
    "data xxh3": 40,
    "sequence": 48,
    "transaction id": 56,
    "epoch": 72,
    "global step": 80,
    "snapshot generation": 88,
    "header xxh3": 96,
    "zero padding": 104,
    "last header byte": 255,
}
BODY_SPOTS = (
    "manifest first byte",
    "manifest middle byte",
    "manifest last byte",
    "data first byte",
    "data middle byte",
    "data last byte",
)


def file_spot(region: str, step: int) -> int:
    if region in FILE_FIELDS:
        return FILE_FIELDS[region]
    manifest, data = content(SEED, step)
    start, length = (
        (FILE_HEADER_BYTES, len(manifest))
        if region.startswith("manifest")
        else (FILE_HEADER_BYTES + len(manifest), len(data))
    )
    return start + {"first": 0, "middle": length // 2, "last": length - 1}[region.split()[1]]


@pytest.mark.req("R6.4")
@pytest.mark.parametrize("region", [*FILE_FIELDS, *BODY_SPOTS])
def test_a_flipped_byte_anywhere_in_a_committed_file_is_refused_and_kept(
    copy: Path, region: str
) -> None:
    newest = file_of(copy, 9)
    flip(newest, file_spot(region, 9))
    report = inspect_directory(copy)
    (damaged,) = [f for f in report.files if f.is_damage]
    assert damaged.name == newest.name and damaged.fate is Fate.COMMITTED and not damaged.verified
    assert report.is_damaged
    opened = open_and_check(copy, intact=(8, 7), refused=(9,))
    assert opened.listed == (9, 8, 7) and newest.exists()


@pytest.mark.req("R6.4")
@pytest.mark.parametrize("region", [*FILE_FIELDS, *BODY_SPOTS])
def test_a_flipped_byte_in_a_file_the_wal_cannot_vouch_for_keeps_it_damaged_never_restored(
    copy: Path, region: str
) -> None:
    newest = file_of(copy, 9)
    flip(newest, file_spot(region, 9))
    (copy / WAL_NAME).unlink()
    opened = open_and_check(copy, intact=(8, 7))
    assert opened.listed == (8, 7) and newest.exists()
    assert list(opened.recovery.damaged_files) == [newest.name]
    with DurableStore(copy, SPEC, run_id=RUN_ID) as store:
        assert newest.name not in {r.file_name for r in store.committed()}
        assert list(store.recovery.damaged_files) == [newest.name], "still reported when reopened"


# -- a truncated WAL -----------------------------------------------------------------------------

CUTS = ("at its start", "inside its header", "inside its payload")


@pytest.mark.req("R6.3")
@pytest.mark.parametrize("where", CUTS)
@pytest.mark.parametrize(
    "index", range(len(HISTORY_OPS)), ids=lambda i: f"{i}-{HISTORY_OPS[i].name}"
)
def test_a_wal_cut_short_anywhere_loses_no_committed_checkpoint(
    copy: Path, index: int, where: str
) -> None:
    records = wal_records(copy)
    record = records[index]
    if where == "inside its payload" and not record.payload:
        pytest.skip(f"a {record.header.op.name} record has no payload")
    cut = (
        record.offset
        + {
            "at its start": 0,
            "inside its header": HEADER_BYTES // 2,
            "inside its payload": HEADER_BYTES + len(record.payload) // 2,
        }[where]
    )
    os.truncate(copy / WAL_NAME, cut)
    # A log cut exactly after a BEGIN reads, by its bytes, as a crash before that write's
    # COMMIT: by rule (leyline.durable) its file is the one recovery deletes, and reports,
    # unless a later file the log no longer names proves the log lost records after it.
    orphan = records[index - 1] if where == "at its start" and index > 0 else None
    may_remove: frozenset[str] = frozenset()
    if orphan is not None and orphan.header.op is Op.BEGIN:
        begun = wal_format.checkpoint_record(orphan)
        later = [p for p in copy.glob("ckpt-*") if int(p.name[5:15]) > begun.sequence]
        if (copy / begun.file_name).exists() and not later:
            may_remove = frozenset({begun.file_name})
    intact = tuple(s for s in INTACT if file_of(copy, s).name not in may_remove)
    opened = open_and_check(copy, intact=intact, may_remove=may_remove)
    assert set(opened.listed) >= set(intact)
    assert set(opened.recovery.removed_files) == set(may_remove)
    if where != "at its start":
        assert opened.recovery.torn_tail or index == 0


# -- one writer per directory --------------------------------------------------------------------


@pytest.mark.req("R6.3")
def test_a_second_store_on_the_same_directory_is_refused_naming_it(copy: Path) -> None:
    with DurableStore(copy, SPEC, run_id=RUN_ID) as first:
        with pytest.raises(CheckpointDirectoryLocked, match=str(copy)):
            DurableStore(copy, SPEC, run_id=RUN_ID)
        assert [r.global_step for r in first.committed()] == [9, 8, 7]
    with DurableStore(copy, SPEC, run_id=RUN_ID) as reopened:
        assert [r.global_step for r in reopened.committed()] == [9, 8, 7]


@pytest.mark.req("R6.3")
def test_a_second_sidecar_on_the_same_checkpoint_directory_is_a_config_error(
    config: SidecarConfig,
) -> None:
    build_history(config.checkpoint_dir)
    with (
        DurableStore(config.checkpoint_dir, SPEC, run_id=RUN_ID),
        pytest.raises(ConfigInvalid) as refused,
    ):
        Sidecar(config, registry=CollectorRegistry())
    assert refused.value.field == "--checkpoint-dir"
    assert str(config.checkpoint_dir) in str(refused.value)
    assert isinstance(refused.value.__cause__, CheckpointDirectoryLocked)


# -- what the sidecar tells the trainer and the operator -----------------------------------------


@pytest.mark.req("R13.5")
def test_attach_and_status_carry_what_recovery_found(
    serve_sidecar: Callable[..., Served], tmp_path: Path
) -> None:
    directory = tmp_path / "checkpoints"
    build_history(directory)
    commit_of_8 = wal_records(directory)[5]
    flip(directory / WAL_NAME, commit_of_8.offset + HEADER_BYTES + 1)
    served = serve_sidecar()
    reply = served.attach()
    assert reply.HasField("wal_recovery")
    assert list(reply.wal_recovery.adopted_files) == [file_of(directory, 8).name]
    assert reply.wal_recovery.preserved_copy == "wal.log.damaged-1"
    assert_reported(reply.wal_recovery)
    status = served.link.GetStatus(pb.GetStatusRequest())
    assert status.wal_recovery == reply.wal_recovery
    assert status.last_checkpoint.global_step == 9


@pytest.mark.req("R13.5")
def test_a_clean_directory_reports_no_recovery(
    serve_sidecar: Callable[..., Served], tmp_path: Path
) -> None:
    build_history(tmp_path / "checkpoints")
    served = serve_sidecar()
    assert not served.attach().HasField("wal_recovery")
    assert not served.link.GetStatus(pb.GetStatusRequest()).HasField("wal_recovery")


# -- a crash at every write point of recovery -----------------------------------------------------


def stray_temp_file(directory: Path) -> None:
    (directory / "ckpt-0000000001.tmp").write_bytes(b"half a checkpoint")


def flipped_commit_of_8(directory: Path) -> None:
    flip(directory / WAL_NAME, wal_records(directory)[5].offset + 44)


def torn_last_append(directory: Path) -> None:
    with (directory / WAL_NAME).open("ab") as f:
        f.write(b"ESPERWAL\x01\x00")


RECOVERY_CRASHES = {
    "checkpoint.recovery.after_remove": stray_temp_file,
    "wal.recovery.after_preserve": flipped_commit_of_8,
    "wal.compact.after_sync": flipped_commit_of_8,
    "wal.compact.after_rename": flipped_commit_of_8,
    "wal.recovery.after_cut": torn_last_append,
}


@pytest.mark.req("R6.3")
@pytest.mark.parametrize("point", list(RECOVERY_CRASHES))
def test_a_crash_at_any_write_point_of_recovery_is_recovered_the_same_way(
    copy: Path, point: str
) -> None:
    assert set(RECOVERY_CRASHES) >= set(wal.RECOVERY_POINTS + checkpoints.RECOVERY_POINTS)
    RECOVERY_CRASHES[point](copy)
    faults = Faults()
    faults.crash_at(point)
    with pytest.raises(InjectedCrash):
        DurableStore(copy, SPEC, run_id=RUN_ID, faults=faults)
    assert faults.fired == {point: 1}
    opened = open_and_check(copy)
    assert opened.listed == (9, 8, 7)


# -- how it is told, and what comes after ----------------------------------------------------------


@pytest.mark.req("R13.5")
def test_damage_is_logged_as_an_error_and_a_torn_tail_as_a_warning(
    history: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    damaged = shutil.copytree(history, tmp_path / "damaged")
    flipped_commit_of_8(damaged)
    torn = shutil.copytree(history, tmp_path / "torn")
    torn_last_append(torn)
    with caplog.at_level("INFO", logger="tolaria_sidecar"):
        DurableStore(damaged, SPEC, run_id=RUN_ID).close()
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        caplog.clear()
        DurableStore(torn, SPEC, run_id=RUN_ID).close()
        levels = {r.levelname for r in caplog.records}
    assert len(errors) == 1 and "header crc32c" in errors[0].getMessage()
    assert "wal.log.damaged-1" in errors[0].getMessage()
    assert levels == {"WARNING"} and "torn tail" in caplog.records[0].getMessage()


def missing_wal(directory: Path) -> None:
    (directory / WAL_NAME).unlink()


@pytest.mark.req("R6.3")
@pytest.mark.parametrize("damage", [flipped_commit_of_8, missing_wal, torn_last_append])
def test_sequences_keep_increasing_after_recovery(
    copy: Path, damage: Callable[[Path], None]
) -> None:
    highest = max(int(p.name[5:15]) for p in copy.glob("ckpt-*"))
    damage(copy)
    with DurableStore(copy, SPEC, run_id=RUN_ID) as store:
        record = write_index(store, SEED, 10)
    assert record.sequence > highest
    sequences = [r.header.sequence for r in wal_records(copy)]
    assert sequences == sorted(set(sequences))
    opened = open_and_check(copy, intact=(8, 9, 10))
    assert opened.listed == (10, 9, 8)
