"""Durable checkpoints (R6.3, R6.4): write protocol, verification, retention, crash safety."""

from __future__ import annotations

import array
import errno
import os
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leyline.checksum import digest_bytes, xxh3
from leyline.durable import wal_format
from leyline.durable.checkpoint_file import HEADER_BYTES
from leyline.durable.wal_format import WAL_NAME
from leyline.v1.resilience_pb2 import ChecksumAlgorithm
from tests.sidecar.scenarios import (
    NEW_EPOCH,
    RUN_ID,
    SPEC,
    WHOLE_OUTCOMES,
    content,
    reopen_and_inspect,
    seed_full_write,
    write_index,
    write_new_epoch,
)
from tolaria_sidecar import checkpoints, wal
from tolaria_sidecar.checkpoints import DurableStore
from tolaria_sidecar.errors import (
    BufferTooSmall,
    CheckpointCorrupt,
    CheckpointWriteFailed,
    InjectedCrash,
    NoCheckpoint,
)
from tolaria_sidecar.faults import Faults

SEED = 11
ALL_WRITE_POINTS = wal.WRITE_POINTS + checkpoints.WRITE_POINTS
ENOSPC = OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def checkpoint_dir(tmp_path: Path) -> Path:
    return tmp_path / "checkpoints"


@pytest.fixture
def store(checkpoint_dir: Path) -> DurableStore:
    return DurableStore(checkpoint_dir, SPEC, run_id=RUN_ID)


@pytest.fixture
def buffer() -> memoryview:
    return memoryview(bytearray(64 * 1024))


@pytest.fixture
def two_committed(tmp_path: Path) -> Path:
    """A template directory holding epochs 1 and 2 (copy it before damaging it)."""
    directory = tmp_path / "template"
    with DurableStore(directory, SPEC, run_id=RUN_ID) as store:
        write_index(store, SEED, 1)
        write_index(store, SEED, 2)
    return directory


def damaged_copy(template: Path) -> Path:
    """A fresh copy per Hypothesis example, beside the template (the fixture is shared)."""
    directory = template.parent / f"copy-{os.urandom(6).hex()}"
    shutil.copytree(template, directory)
    return directory


def flip(path: Path, offset: int, mask: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= mask
    path.write_bytes(raw)


def restored_epoch(directory: Path, into: memoryview) -> int:
    with DurableStore(directory, SPEC, run_id=RUN_ID) as store:
        record, manifest, length = store.load_latest(into)
        assert (manifest, bytes(into[:length])) == content(SEED, record.epoch)
        return record.epoch


# -- round trips -------------------------------------------------------------------------------


@pytest.mark.req("R6.3")
@settings(max_examples=20, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(manifest=st.binary(max_size=2048), data=st.binary(max_size=64 * 1024))
def test_a_written_checkpoint_loads_back_bit_for_bit(
    tmp_path: Path, manifest: bytes, data: bytes
) -> None:
    directory = tmp_path / os.urandom(6).hex()
    with DurableStore(directory, SPEC, run_id=RUN_ID) as store:
        record = store.write(
            manifest=manifest, data=memoryview(data), epoch=3, global_step=30, snapshot_generation=9
        )
    into = memoryview(bytearray(len(data) + 7))
    with DurableStore(directory, SPEC, run_id=RUN_ID) as reopened:
        assert reopened.load(record, into) == (manifest, len(data))
    assert bytes(into[: len(data)]) == data


@pytest.mark.req("R6.3")
def test_the_record_describes_the_committed_file(store: DurableStore) -> None:
    data = b"\x01\x02" * 5000
    record = store.write(
        manifest=b"m", data=memoryview(data), epoch=5, global_step=500, snapshot_generation=42
    )
    assert record.file_name == f"ckpt-{record.sequence:010d}-e5.bin"
    assert (store.directory / record.file_name).stat().st_size == HEADER_BYTES + 1 + len(data)
    assert record.payload_bytes == len(data)
    assert record.payload_checksum == digest_bytes(xxh3(data))
    assert record.checksum_algorithm == ChecksumAlgorithm.CHECKSUM_ALGORITHM_XXH3_64
    assert (record.epoch, record.global_step, record.snapshot_generation) == (5, 500, 42)
    assert len(record.transaction_id) == 16 and record.run_id == RUN_ID
    assert record.committed_at.ToNanoseconds() > 0
    store.close()


@pytest.mark.req("R6.3")
def test_the_file_header_has_the_documented_layout(store: DurableStore) -> None:
    record = store.write(
        manifest=b"mm", data=memoryview(b"ddd"), epoch=2, global_step=3, snapshot_generation=4
    )
    raw = (store.directory / record.file_name).read_bytes()
    assert raw[:8] == b"TOLCKPT1"
    assert struct.unpack_from("<IIQQQQQ", raw, 8) == (
        1,
        256,
        2,
        3,
        xxh3(b"mm"),
        xxh3(b"ddd"),
        record.sequence,
    )
    assert raw[56:72] == record.transaction_id
    assert struct.unpack_from("<QQQ", raw, 72) == (2, 3, 4)
    zeroed = bytearray(raw[:256])
    zeroed[96:104] = bytes(8)
    assert struct.unpack_from("<Q", raw, 96)[0] == xxh3(zeroed)
    assert raw[104:256] == bytes(152) and raw[256:] == b"mmddd"
    store.close()


@pytest.mark.req("R6.3")
def test_data_of_any_buffer_format_is_written_as_its_bytes(
    store: DurableStore, buffer: memoryview
) -> None:
    floats = array.array("f", [1.5, -2.0, 3.25])
    store.write(
        manifest=b"", data=memoryview(floats), epoch=1, global_step=1, snapshot_generation=1
    )
    _, _, length = store.load_latest(buffer)
    assert bytes(buffer[:length]) == floats.tobytes()
    store.close()


@pytest.mark.req("R6.3")
def test_committed_lists_newest_first_and_latest_is_the_newest(store: DurableStore) -> None:
    assert store.latest() is None and store.committed() == []
    for epoch in (1, 2, 3):
        write_index(store, SEED, epoch)
    assert [r.epoch for r in store.committed()] == [3, 2, 1]
    latest = store.latest()
    assert latest is not None and latest.epoch == 3
    store.close()


@pytest.mark.req("R6.3")
def test_retention_keeps_exactly_three(store: DurableStore) -> None:
    for epoch in range(1, 7):
        write_index(store, SEED, epoch)
    assert [r.epoch for r in store.committed()] == [6, 5, 4]
    on_disk = sorted(p.name for p in store.directory.iterdir())
    assert on_disk == sorted([r.file_name for r in store.committed()] + [WAL_NAME])
    store.close()


@pytest.mark.req("R6.3")
def test_the_wal_is_compacted_past_its_rotation_size(checkpoint_dir: Path) -> None:
    seed_full_write(checkpoint_dir, SEED)
    with DurableStore(checkpoint_dir, SPEC, run_id=RUN_ID) as store:
        assert store.wal.needs_compaction
        write_index(store, SEED, NEW_EPOCH)
        assert store.wal.size_bytes < SPEC.wal_rotate_bytes
    reopened = reopen_and_inspect(checkpoint_dir, SEED)
    assert reopened.committed_epochs == (7, 6, 5) and reopened.all_committed_verify


@pytest.mark.req("R6.3")
def test_the_wal_append_time_is_exposed(store: DurableStore) -> None:
    write_index(store, SEED, 1)
    assert 0 < store.wal.last_append_ns <= store.wal.worst_append_ns
    store.close()


# -- failures while writing ----------------------------------------------------------------------


@pytest.mark.req("R6.3")
@pytest.mark.parametrize(
    "point",
    [
        "checkpoint.after_data_write",
        "checkpoint.after_header_write",
        "checkpoint.after_fdatasync",
        "checkpoint.after_rename",
        "checkpoint.after_dir_fsync",
    ],
)
def test_an_io_error_while_writing_keeps_the_previous_checkpoint(
    checkpoint_dir: Path, buffer: memoryview, point: str
) -> None:
    faults = Faults()
    with DurableStore(checkpoint_dir, SPEC, run_id=RUN_ID, faults=faults) as store:
        write_index(store, SEED, 1)
        faults.fail_at(point, ENOSPC)
        with pytest.raises(CheckpointWriteFailed, match="No space left") as failed:
            write_index(store, SEED, 2)
        assert isinstance(failed.value.__cause__, OSError)
        assert failed.value.__cause__.errno == errno.ENOSPC
        assert failed.value.failure.epoch == 2 and "No space left" in failed.value.failure.error
        assert [r.epoch for r in store.committed()] == [1]
        assert sorted(p.suffix for p in checkpoint_dir.iterdir()) == [".bin", ".log"]
        write_index(store, SEED, 3)
    assert faults.fired == {point: 1}
    assert restored_epoch(checkpoint_dir, buffer) == 3


@pytest.mark.req("R6.3")
@pytest.mark.parametrize("point", ["wal.append.after_header", "wal.append.after_sync"])
def test_a_failed_commit_record_keeps_the_previous_checkpoint(
    checkpoint_dir: Path, buffer: memoryview, point: str
) -> None:
    faults = Faults()
    with DurableStore(checkpoint_dir, SPEC, run_id=RUN_ID, faults=faults) as store:
        write_index(store, SEED, 1)
        faults.fail_at(point, ENOSPC, nth=2)  # the 1st append is BEGIN, the 2nd COMMIT
        with pytest.raises(CheckpointWriteFailed):
            write_index(store, SEED, 2)
        assert [r.epoch for r in store.committed()] == [1]
        assert sorted(p.suffix for p in checkpoint_dir.iterdir()) == [".bin", ".log"]
    assert faults.fired == {point: 1}
    with DurableStore(checkpoint_dir, SPEC, run_id=RUN_ID) as reopened:
        assert reopened.wal.scan.clean and reopened.wal.in_doubt() == []
        assert not reopened.recovery_found
    assert restored_epoch(checkpoint_dir, buffer) == 1


# -- crash at every write point ------------------------------------------------------------------


@pytest.fixture
def seeded_template(tmp_path: Path) -> Path:
    """Epochs 4, 5, 6 committed and a WAL due compaction: writing epoch 7 hits every point."""
    directory = tmp_path / "seeded"
    seed_full_write(directory, SEED)
    return directory


def copy_of(template: Path, name: str) -> Path:
    directory = template.parent / name
    shutil.copytree(template, directory)
    return directory


@pytest.mark.req("R6.3")
def test_writing_into_the_seeded_directory_reaches_every_write_point(
    seeded_template: Path,
) -> None:
    faults = Faults(trace=True)
    write_new_epoch(copy_of(seeded_template, "traced"), SEED, faults)
    assert set(faults.hits) == set(ALL_WRITE_POINTS)


@pytest.mark.req("R6.3")
@pytest.mark.parametrize("point", ALL_WRITE_POINTS)
def test_reopening_after_a_crash_at_any_write_point_yields_a_whole_checkpoint(
    seeded_template: Path, point: str
) -> None:
    traced = Faults(trace=True)
    write_new_epoch(copy_of(seeded_template, "traced"), SEED, traced)
    for nth in range(1, traced.hits[point] + 1):  # every occurrence: BEGIN, COMMIT, RETIRE...
        directory = copy_of(seeded_template, f"crash-{nth}")
        faults = Faults()
        faults.crash_at(point, nth)
        with pytest.raises(InjectedCrash):
            write_new_epoch(directory, SEED, faults)
        reopened = reopen_and_inspect(directory, SEED)
        assert reopened.restored_ok and reopened.restored_epoch in (6, NEW_EPOCH)
        assert reopened.committed_epochs in WHOLE_OUTCOMES and reopened.all_committed_verify
        assert reopened.leftover_files == ()
        assert faults.fired == {point: 1}
        with DurableStore(directory, SPEC, run_id=RUN_ID) as store:
            write_index(store, SEED, 8)
        assert reopen_and_inspect(directory, SEED).restored_epoch == 8


# -- damage is always detected, and the next older checkpoint is used (R6.4) ---------------------


SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.mark.req("R6.4")
@SETTINGS
@given(data=st.data())
def test_a_flipped_byte_anywhere_in_the_newest_file_is_detected(
    two_committed: Path, buffer: memoryview, data: st.DataObject
) -> None:
    directory = damaged_copy(two_committed)
    with DurableStore(directory, SPEC, run_id=RUN_ID) as store:
        newest = store.committed()[0]
    path = directory / newest.file_name
    region = data.draw(st.sampled_from(["header", "manifest", "data"]))
    manifest, payload = content(SEED, 2)
    start, size = {
        "header": (0, HEADER_BYTES),
        "manifest": (HEADER_BYTES, len(manifest)),
        "data": (HEADER_BYTES + len(manifest), len(payload)),
    }[region]
    flip(path, start + data.draw(st.integers(0, size - 1)), data.draw(st.integers(1, 255)))
    with DurableStore(directory, SPEC, run_id=RUN_ID) as store:
        with pytest.raises(CheckpointCorrupt, match=newest.file_name):
            store.load(newest, buffer)
        record, _, _ = store.load_latest(buffer)
        assert record.epoch == 1
        assert [(r.epoch, type(e)) for r, e in store.last_rejections] == [(2, CheckpointCorrupt)]
    assert restored_epoch(directory, buffer) == 1


@pytest.mark.req("R6.4")
@SETTINGS
@given(data=st.data())
def test_a_flipped_byte_in_the_newest_wal_record_keeps_the_newest_checkpoint_restorable(
    two_committed: Path, buffer: memoryview, data: st.DataObject
) -> None:
    directory = damaged_copy(two_committed)
    path = directory / WAL_NAME
    last = wal_format.scan(path.read_bytes()).records[-1]
    assert last.header.op is wal_format.Op.COMMIT
    part = data.draw(st.sampled_from(["header", "payload"]))
    start, size = (
        (last.offset, wal_format.HEADER_BYTES)
        if part == "header"
        else (last.offset + wal_format.HEADER_BYTES, len(last.payload))
    )
    flip(path, start + data.draw(st.integers(0, size - 1)), data.draw(st.integers(1, 255)))
    with DurableStore(directory, SPEC, run_id=RUN_ID) as store:
        assert store.recovery.torn_tail and store.recovery.damaged_bytes > 0
        newest = store.committed()[0]
        assert [r.epoch for r in store.committed()] == [2, 1]
        assert newest.recovered_from_file and list(store.recovery.adopted_files) == [
            newest.file_name
        ]
    with DurableStore(directory, SPEC, run_id=RUN_ID) as reopened:
        assert reopened.wal.scan.clean and not reopened.recovery_found
    assert restored_epoch(directory, buffer) == 2


@pytest.mark.req("R6.4")
def test_a_file_swapped_for_another_checkpoint_is_refused(
    two_committed: Path, buffer: memoryview
) -> None:
    directory = damaged_copy(two_committed)
    with DurableStore(directory, SPEC, run_id=RUN_ID) as store:
        newest, older = store.committed()
        shutil.copyfile(directory / older.file_name, directory / newest.file_name)
        with pytest.raises(CheckpointCorrupt, match=r"sequence \(WAL record\)"):
            store.load(newest, buffer)


@pytest.mark.req("R6.4")
def test_a_truncated_file_is_refused(two_committed: Path, buffer: memoryview) -> None:
    directory = damaged_copy(two_committed)
    with DurableStore(directory, SPEC, run_id=RUN_ID) as store:
        newest = store.committed()[0]
        path = directory / newest.file_name
        os.truncate(path, path.stat().st_size - 1)
        with pytest.raises(CheckpointCorrupt, match="file size"):
            store.load(newest, buffer)
        assert store.load_latest(buffer)[0].epoch == 1


@pytest.mark.req("R6.3")
def test_a_missing_file_is_not_listed_and_the_older_one_loads(
    two_committed: Path, buffer: memoryview
) -> None:
    directory = damaged_copy(two_committed)
    with DurableStore(directory, SPEC, run_id=RUN_ID) as store:
        (directory / store.committed()[0].file_name).unlink()
        assert [r.epoch for r in store.committed()] == [1]
        assert store.load_latest(buffer)[0].epoch == 1


@pytest.mark.req("R6.3")
def test_no_checkpoint_names_every_rejection(two_committed: Path, buffer: memoryview) -> None:
    directory = damaged_copy(two_committed)
    with DurableStore(directory, SPEC, run_id=RUN_ID) as store:
        for record in store.committed():
            flip(directory / record.file_name, HEADER_BYTES + 1, 0x01)
        with pytest.raises(NoCheckpoint) as none:
            store.load_latest(buffer)
    assert [r.epoch for r, _ in none.value.rejected] == [2, 1]
    assert "manifest xxh3" in str(none.value)


@pytest.mark.req("R6.3")
def test_an_empty_directory_has_no_checkpoint(store: DurableStore, buffer: memoryview) -> None:
    with pytest.raises(NoCheckpoint, match="none committed"):
        store.load_latest(buffer)
    store.close()


@pytest.mark.req("R6.3")
def test_a_too_small_buffer_is_refused_before_reading(store: DurableStore) -> None:
    write_index(store, SEED, 1)
    needed = len(content(SEED, 1)[1])
    with pytest.raises(BufferTooSmall) as small:
        store.load_latest(memoryview(bytearray(needed - 1)))
    assert (small.value.needed, small.value.capacity) == (needed, needed - 1)
    store.close()


# -- recovery at open ----------------------------------------------------------------------------


@pytest.mark.req("R6.3")
def test_open_removes_temp_files_and_keeps_a_file_it_cannot_prove_dead(
    two_committed: Path,
) -> None:
    directory = damaged_copy(two_committed)
    (directory / "ckpt-0000000003.tmp").write_bytes(b"partial")
    stranger = directory / "ckpt-0000000001-e0.bin"
    stranger.write_bytes(b"no record names it, and it does not verify")
    with DurableStore(directory, SPEC, run_id=RUN_ID) as store:
        expected = {r.file_name for r in store.committed()} | {WAL_NAME, stranger.name}
        assert {p.name for p in directory.iterdir()} == expected
        assert list(store.recovery.removed_files) == ["ckpt-0000000003.tmp"]
        assert list(store.recovery.damaged_files) == [stranger.name]
        assert stranger.name not in {r.file_name for r in store.committed()}


@pytest.mark.req("R6.3")
def test_open_keeps_files_the_wal_does_not_know_and_never_reuses_their_sequence(
    two_committed: Path,
) -> None:
    directory = damaged_copy(two_committed)
    stranger = directory / "ckpt-0000000100-e9.bin"
    stranger.write_bytes(b"described by a WAL tail that was cut")
    with DurableStore(directory, SPEC, run_id=RUN_ID) as store:
        assert list(store.recovery.damaged_files) == [stranger.name] and stranger.exists()
        record = write_index(store, SEED, 3)
    assert record.sequence > 100


@pytest.mark.req("R6.3")
def test_the_cache_can_be_dropped_for_cold_reads(store: DurableStore, buffer: memoryview) -> None:
    write_index(store, SEED, 1)
    store.drop_page_cache()
    assert store.load_latest(buffer)[0].epoch == 1
    store.close()
