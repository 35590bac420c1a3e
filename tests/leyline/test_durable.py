"""The durable formats and recovery rules (R6.3, R6.4): WAL scan with resynchronisation, the
checkpoint file verified alone, and the table of what recovery may do with each file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from leyline.checksum import crc32c, digest_bytes, xxh3
from leyline.durable import (
    Action,
    CheckpointFile,
    CheckpointHeader,
    Fate,
    WalState,
    encode_header,
    file_name,
    plan_recovery,
    read_checkpoint_file,
    record_from_file,
    settle,
    temp_name,
)
from leyline.durable.wal_format import (
    HEADER_BYTES,
    MAGIC,
    Op,
    WalVersionUnknown,
    encode_record,
    scan,
)
from leyline.v1.resilience_pb2 import CheckpointFailure, CheckpointRecord, SnapshotManifest

TXN = bytes(range(16))


def record_of(sequence: int, txn: bytes = TXN, epoch: int = 1) -> CheckpointRecord:
    return CheckpointRecord(
        sequence=sequence,
        transaction_id=txn,
        epoch=epoch,
        global_step=10 * sequence,
        file_name=file_name(sequence, epoch),
        payload_bytes=3,
        payload_checksum=digest_bytes(xxh3(b"abc")),
    )


def begin(sequence: int, txn: bytes = TXN) -> bytes:
    return encode_record(Op.BEGIN, sequence, txn, 1, record_of(sequence, txn).SerializeToString())


def commit(log_sequence: int, sequence: int, txn: bytes = TXN) -> bytes:
    payload = record_of(sequence, txn).SerializeToString()
    return encode_record(Op.COMMIT, log_sequence, txn, 1, payload)


def retire(log_sequence: int, txn: bytes = TXN) -> bytes:
    return encode_record(Op.RETIRE, log_sequence, txn, 1, b"")


def abort(log_sequence: int, txn: bytes = TXN) -> bytes:
    return encode_record(
        Op.ABORT, log_sequence, txn, 1, CheckpointFailure(error="ENOSPC").SerializeToString()
    )


# -- scan --------------------------------------------------------------------------------------


def junk() -> st.SearchStrategy[bytes]:
    """Damage: any bytes that cannot hold a record's magic."""
    return st.binary(min_size=1, max_size=600).filter(lambda b: MAGIC[:4] not in b)


@pytest.mark.req("R6.3")
@given(
    count=st.integers(1, 8),
    damaged=st.sets(st.integers(0, 7), max_size=4),
    data=st.data(),
)
def test_resynchronisation_finds_every_record_after_any_damage(
    count: int, damaged: set[int], data: st.DataObject
) -> None:
    damaged = {i for i in damaged if i < count}
    records = [retire(i + 1, os.urandom(16)) for i in range(count)]
    log = bytearray()
    expected_offsets = []
    expected_damage = []
    for i, raw in enumerate(records):
        if i in damaged:
            noise = data.draw(junk())
            expected_damage.append((len(log), len(noise)))
            log += noise
        expected_offsets.append(len(log))
        log += raw
    found = scan(bytes(log))
    assert [r.offset for r in found.records] == expected_offsets
    assert [(d.offset, d.length) for d in found.damage] == expected_damage
    assert found.mid_log == bool(damaged) and not found.torn_tail


@pytest.mark.req("R6.3")
@given(cut=st.integers(1, HEADER_BYTES + 40 - 1))
def test_an_unfinished_append_after_whole_records_is_a_torn_tail(cut: int) -> None:
    whole = begin(1) + commit(2, 1)
    tail = encode_record(Op.ABORT, 3, TXN, 1, b"x" * 40)[:cut]
    found = scan(whole + tail)
    assert len(found.records) == 2 and found.torn_tail and not found.mid_log
    assert (found.valid_bytes, found.damaged_bytes) == (len(whole), cut)


@pytest.mark.req("R6.3")
@pytest.mark.parametrize(
    ("raw", "torn", "garbage"),
    [
        (b"", False, False),
        (b"ESPE", True, False),  # the first append, cut short
        (bytes(300), True, False),  # a block the file system had not written
        (b"this is not a write-ahead log at all" * 20, False, True),
    ],
    ids=["empty", "a torn first append", "zeros", "garbage"],
)
def test_a_log_with_no_record_is_empty_a_torn_first_append_or_garbage(
    raw: bytes, torn: bool, garbage: bool
) -> None:
    found = scan(raw)
    assert found.records == () and (found.torn_tail, found.garbage) == (torn, garbage)


@pytest.mark.req("R6.3")
def test_a_damaged_run_longer_than_any_record_is_not_a_torn_tail() -> None:
    found = scan(begin(1) + b"\xff" * (HEADER_BYTES + (1 << 20) + 1))
    assert not found.torn_tail and not found.clean


@pytest.mark.req("R6.3")
def test_a_sound_record_of_another_version_refuses_the_scan_even_after_damage() -> None:
    other = bytearray(retire(2))
    other[8] = 2  # version 2, header CRC recomputed
    other[60:64] = bytes(4)
    other[60:64] = crc32c(bytes(other[:HEADER_BYTES])).to_bytes(4, "little")
    with pytest.raises(WalVersionUnknown, match="version 2"):
        scan(begin(1) + b"junk" + bytes(other))


# -- the checkpoint file -----------------------------------------------------------------------


def write_checkpoint(directory: Path, sequence: int, epoch: int, data: bytes) -> Path:
    manifest = SnapshotManifest(
        run_id="r", instance_id="i-1", lineage_id="l-1", manifest_digest="d" * 16
    ).SerializeToString()
    header = encode_header(
        manifest=manifest,
        data_length=len(data),
        data_xxh3=xxh3(data),
        sequence=sequence,
        transaction_id=TXN,
        epoch=epoch,
        global_step=100,
        snapshot_generation=7,
    )
    path = directory / file_name(sequence, epoch)
    path.write_bytes(header + manifest + data)
    return path


@pytest.mark.req("R6.4")
def test_a_file_verified_alone_gives_the_record_recovery_adopts(tmp_path: Path) -> None:
    checked = read_checkpoint_file(write_checkpoint(tmp_path, 12, 3, b"data"))
    assert checked.ok and checked.data_verified
    record = record_from_file(checked)
    assert (record.sequence, record.epoch, record.global_step, record.snapshot_generation) == (
        12,
        3,
        100,
        7,
    )
    assert (record.instance_id, record.lineage_id, record.manifest_digest) == (
        "i-1",
        "l-1",
        "d" * 16,
    )
    assert record.recovered_from_file and record.file_name == file_name(12, 3)
    assert record.payload_checksum == digest_bytes(xxh3(b"data")) and record.payload_bytes == 4


@pytest.mark.req("R6.4")
def test_a_file_renamed_over_another_sequence_does_not_verify(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path, 12, 3, b"data")
    renamed = path.rename(tmp_path / file_name(13, 3))
    checked = read_checkpoint_file(renamed)
    assert not checked.ok and "sequence (file name)" in checked.error
    with pytest.raises(ValueError, match="only a verified file"):
        record_from_file(checked)


# -- what recovery may do with each file -------------------------------------------------------


def verified(name: str, sequence: int, txn: bytes = TXN, ok: bool = True) -> CheckpointFile:
    header = CheckpointHeader(0, 3, 0, xxh3(b"abc"), sequence, txn, 1, 10 * sequence, 0)
    return CheckpointFile(
        Path(name), header, SnapshotManifest(run_id="r"), ok, "" if ok else "data xxh3: ..."
    )


CLEAN_BEGIN = begin(1)
DAMAGE = b"\x00garbage between records\x00"
CASES = {
    # name: (log, files present, verified alone, expected (state, action, fate))
    "temp file": (b"", [temp_name(1)], {}, (WalState.NOT_IN_WAL, Action.REMOVE, Fate.REMOVED)),
    "committed": (
        CLEAN_BEGIN + commit(2, 1),
        [file_name(1, 1)],
        {},
        (WalState.COMMITTED, Action.KEEP, Fate.COMMITTED),
    ),
    "retired": (
        CLEAN_BEGIN + commit(2, 1) + retire(3),
        [file_name(1, 1)],
        {},
        (WalState.RETIRED, Action.REMOVE, Fate.REMOVED),
    ),
    "aborted": (
        CLEAN_BEGIN + abort(2),
        [file_name(1, 1)],
        {},
        (WalState.ABORTED, Action.REMOVE, Fate.REMOVED),
    ),
    "in doubt, intact log after": (
        CLEAN_BEGIN,
        [file_name(1, 1)],
        {},
        (WalState.IN_DOUBT, Action.REMOVE, Fate.REMOVED),
    ),
    "in doubt, damage after, verifies": (
        CLEAN_BEGIN + DAMAGE + retire(9, bytes(16)),
        [file_name(1, 1)],
        {file_name(1, 1): verified(file_name(1, 1), 1)},
        (WalState.IN_DOUBT, Action.VERIFY, Fate.ADOPTED),
    ),
    "in doubt, damage after, does not verify": (
        CLEAN_BEGIN + DAMAGE,
        [file_name(1, 1)],
        {file_name(1, 1): verified(file_name(1, 1), 1, ok=False)},
        (WalState.IN_DOUBT, Action.VERIFY, Fate.DAMAGED),
    ),
    "not in the log, verifies": (
        retire(1, bytes(16)),
        [file_name(5, 1)],
        {file_name(5, 1): verified(file_name(5, 1), 5, txn=bytes(15) + b"\x01")},
        (WalState.NOT_IN_WAL, Action.VERIFY, Fate.ADOPTED),
    ),
    "not in the log, its transaction retired": (
        DAMAGE + retire(7),
        [file_name(5, 1)],
        {file_name(5, 1): verified(file_name(5, 1), 5)},
        (WalState.NOT_IN_WAL, Action.VERIFY, Fate.REMOVED),
    ),
}


@pytest.mark.req("R6.3")
@pytest.mark.parametrize("case", CASES)
def test_recovery_deletes_only_what_the_log_proves_dead(case: str) -> None:
    log, names, alone, (state, action, fate) = CASES[case]
    plan = plan_recovery(scan(log), [*names, "wal.log", "unrelated.txt"], wal_existed=True)
    (item,) = plan.files
    assert (item.wal_state, item.action) == (state, action)
    outcome = settle(plan, alone)
    (decided,) = outcome.files
    assert decided.fate is fate
    adopted = [r.file_name for r in outcome.adopted]
    assert adopted == ([names[0]] if fate is Fate.ADOPTED else [])
    log_damaged = not scan(log).clean and not scan(log).torn_tail
    kept_in_doubt = fate is Fate.DAMAGED and state is WalState.IN_DOUBT
    assert outcome.rewrite == bool(adopted or log_damaged or kept_in_doubt)


@pytest.mark.req("R6.3")
def test_a_later_file_the_log_does_not_name_proves_records_were_lost() -> None:
    names = [file_name(1, 1), file_name(4, 1)]
    plan = plan_recovery(scan(CLEAN_BEGIN), names, wal_existed=True)
    assert [p.action for p in plan.files] == [Action.VERIFY, Action.VERIFY]
    assert "proves records after it were lost" in plan.files[0].why


@pytest.mark.req("R6.3")
def test_sequences_continue_above_every_file_and_adopted_commit() -> None:
    names = [file_name(40, 1)]
    plan = plan_recovery(scan(b""), names, wal_existed=False)
    outcome = settle(plan, {names[0]: verified(names[0], 40)})
    assert plan.wal_lost.startswith("wal.log is missing")
    assert outcome.high_water == 41 and outcome.live[0][0] == 41 and outcome.rewrite
