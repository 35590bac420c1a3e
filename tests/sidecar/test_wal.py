"""The checkpoint WAL (R6.3, R6.4): record layout, replay, truncation, appends, compaction."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leyline.checksum import crc32c
from leyline.durable import wal_format
from leyline.durable.wal_format import HEADER_BYTES, Op, WalRecordInvalid
from leyline.spec.resilience import CheckpointSpec
from leyline.v1.resilience_pb2 import CheckpointFailure, CheckpointRecord
from tests.sidecar.strategies import checkpoint_records, transaction_ids
from tolaria_sidecar import wal
from tolaria_sidecar.errors import (
    CheckpointDirectoryLocked,
    InjectedCrash,
    WalUnavailable,
    WalVersionUnsupported,
)
from tolaria_sidecar.faults import Faults
from tolaria_sidecar.wal import WriteAheadLog

SPEC = CheckpointSpec()


@pytest.fixture
def wal_dir(tmp_path: Path) -> Path:
    return tmp_path / "checkpoints"


def record_for(sequence: int, epoch: int = 1) -> CheckpointRecord:
    return CheckpointRecord(
        sequence=sequence,
        transaction_id=os.urandom(16),
        epoch=epoch,
        file_name=f"ckpt-{sequence:010d}-e{epoch}.bin",
    )


def encoded(op: Op, sequence: int, payload: bytes = b"", txn: bytes = bytes(16)) -> bytes:
    return wal_format.encode_header(op, sequence, txn, 3, payload) + payload


def commit_records(directory: Path, count: int) -> list[CheckpointRecord]:
    records = []
    with_log = WriteAheadLog(directory, SPEC)
    try:
        for epoch in range(count):
            record = record_for(with_log.next_sequence, epoch)
            with_log.begin(record)
            with_log.commit(record)
            records.append(record)
    finally:
        with_log.close()
    return records


# -- layout ------------------------------------------------------------------------------------


@pytest.mark.req("R6.3")
def test_record_header_is_256_little_endian_bytes_in_the_documented_layout() -> None:
    txn = bytes(range(16))
    header = wal_format.encode_header(Op.COMMIT, 7, txn, 9, b"abc")
    assert len(header) == HEADER_BYTES == 256
    assert header[0:8] == b"ESPERWAL"
    assert struct.unpack_from("<HHIQ", header, 8) == (1, 2, 0, 7)
    assert header[24:40] == txn
    assert struct.unpack_from("<QQI", header, 40) == (9, 3, crc32c(b"abc"))
    zeroed = bytearray(header)
    zeroed[60:64] = bytes(4)
    assert struct.unpack_from("<I", header, 60)[0] == crc32c(zeroed)
    assert header[64:] == bytes(192)


@pytest.mark.req("R6.3")
@given(
    op=st.sampled_from(list(Op)),
    sequence=st.integers(1, 2**64 - 1),
    txn=transaction_ids(),
    epoch=st.integers(0, 2**64 - 1),
    payload=st.binary(max_size=512),
)
def test_record_header_round_trips(
    op: Op, sequence: int, txn: bytes, epoch: int, payload: bytes
) -> None:
    header = wal_format.decode_header(wal_format.encode_header(op, sequence, txn, epoch, payload))
    assert header == wal_format.RecordHeader(
        op, sequence, txn, epoch, len(payload), crc32c(payload)
    )


@pytest.mark.req("R6.3")
@given(records=st.lists(checkpoint_records(), min_size=1, max_size=5))
def test_commit_payloads_round_trip_through_a_scan(records: list[CheckpointRecord]) -> None:
    data = b"".join(
        encoded(Op.COMMIT, i + 1, r.SerializeToString(), r.transaction_id)
        for i, r in enumerate(records)
    )
    result = wal_format.scan(data)
    assert result.clean and result.valid_bytes == len(data)
    assert [CheckpointRecord.FromString(r.payload) for r in result.records] == records


@pytest.mark.req("R6.3")
@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(record=checkpoint_records())
def test_a_committed_record_survives_reopening(record: CheckpointRecord, tmp_path: Path) -> None:
    directory = tmp_path / os.urandom(6).hex()
    log = WriteAheadLog(directory, SPEC)
    record.sequence = log.next_sequence
    log.commit(record)
    log.close()
    reopened = WriteAheadLog(directory, SPEC)
    assert reopened.live() == [record] and reopened.scan.clean
    reopened.close()


# -- damage is always detected (R6.4) ------------------------------------------------------------


@pytest.mark.req("R6.4")
@given(offset=st.integers(0, HEADER_BYTES - 1), mask=st.integers(1, 255))
def test_any_flipped_header_byte_is_detected(offset: int, mask: int) -> None:
    raw = bytearray(wal_format.encode_header(Op.COMMIT, 5, os.urandom(16), 2, b"payload"))
    raw[offset] ^= mask
    with pytest.raises(WalRecordInvalid):
        wal_format.decode_header(raw)


@pytest.mark.req("R6.4")
@given(data=st.data(), payload=st.binary(min_size=1, max_size=300))
def test_any_flipped_payload_byte_is_detected(data: st.DataObject, payload: bytes) -> None:
    raw = bytearray(encoded(Op.ABORT, 1, payload))
    raw[HEADER_BYTES + data.draw(st.integers(0, len(payload) - 1))] ^= data.draw(
        st.integers(1, 255)
    )
    result = wal_format.scan(bytes(raw))
    assert result.records == () and [d.reason[:13] for d in result.damage] == ["payload crc32"]


# -- replay ------------------------------------------------------------------------------------


@pytest.mark.req("R6.3")
def test_a_damaged_record_mid_log_hides_none_of_the_records_after_it(wal_dir: Path) -> None:
    records = commit_records(wal_dir, 3)
    path = wal_dir / wal_format.WAL_NAME
    raw = bytearray(path.read_bytes())
    clean = wal_format.scan(bytes(raw))
    second_commit = clean.records[3]  # BEGIN, COMMIT, BEGIN, COMMIT(1), ...
    raw[second_commit.offset + 20] ^= 0xFF
    path.write_bytes(raw)

    log = WriteAheadLog(wal_dir, SPEC)
    assert log.live() == [records[0], records[2]]
    assert [r.transaction_id for r in log.in_doubt()] == [records[1].transaction_id]
    assert log.scan.mid_log and not log.scan.torn_tail
    assert [(d.offset, d.length) for d in log.scan.damage] == [
        (second_commit.offset, second_commit.end - second_commit.offset)
    ]
    assert log.scan.reason.startswith(f"byte {second_commit.offset}: header crc32c")
    assert path.read_bytes() == raw, "opening never cuts or rewrites by itself"
    log.close()


@pytest.mark.req("R6.3")
def test_a_damaged_log_refuses_appends_until_it_is_repaired(wal_dir: Path) -> None:
    records = commit_records(wal_dir, 2)
    path = wal_dir / wal_format.WAL_NAME
    raw = bytearray(path.read_bytes())
    raw[HEADER_BYTES + 3] ^= 0x10  # the first BEGIN's payload
    path.write_bytes(raw)
    log = WriteAheadLog(wal_dir, SPEC)
    with pytest.raises(WalUnavailable, match="not repaired"):
        log.begin(record_for(log.next_sequence))
    preserved = log.rewrite(list(zip([2, 4], records, strict=True)), preserve=True)
    assert preserved == "wal.log.damaged-1"
    assert (wal_dir / preserved).read_bytes() == raw
    log.begin(record_for(log.next_sequence))
    log.close()
    reopened = WriteAheadLog(wal_dir, SPEC)
    assert reopened.scan.clean and reopened.live() == records
    reopened.close()


@pytest.mark.req("R6.3")
def test_a_preserved_copy_is_never_overwritten(wal_dir: Path) -> None:
    commit_records(wal_dir, 1)
    (wal_dir / "wal.log.damaged-1").write_bytes(b"an earlier damaged log")
    (wal_dir / "wal.log.damaged-3").write_bytes(b"and another")
    log = WriteAheadLog(wal_dir, SPEC)
    assert log.rewrite([], preserve=True) == "wal.log.damaged-4"
    log.close()
    assert (wal_dir / "wal.log.damaged-1").read_bytes() == b"an earlier damaged log"
    assert (wal_dir / "wal.log.damaged-3").read_bytes() == b"and another"


@pytest.mark.req("R6.3")
@settings(max_examples=40)
@given(data=st.data())
def test_a_torn_tail_of_any_length_is_found_after_the_last_whole_record(
    data: st.DataObject,
) -> None:
    payload = CheckpointRecord(transaction_id=bytes(16), file_name="x" * 40).SerializeToString()
    first = encoded(Op.COMMIT, 1, payload)
    second = encoded(Op.COMMIT, 2, payload)
    cut = data.draw(st.integers(0, len(second) - 1))
    result = wal_format.scan(first + second[:cut])
    assert len(result.records) == 1 and result.valid_bytes == len(first)
    assert result.damaged_bytes == cut
    assert result.torn_tail == (cut > 0) and not result.mid_log and not result.garbage


@pytest.mark.req("R6.3")
def test_a_torn_tail_is_reported_and_cut_on_request(wal_dir: Path) -> None:
    commit_records(wal_dir, 1)
    path = wal_dir / wal_format.WAL_NAME
    whole = path.stat().st_size
    with path.open("ab") as f:
        f.write(encoded(Op.BEGIN, 99, b"z" * 40)[: HEADER_BYTES + 10])
    log = WriteAheadLog(wal_dir, SPEC)
    assert log.scan.torn_tail and log.scan.damaged_bytes == HEADER_BYTES + 10
    assert "short payload" in log.scan.reason
    log.cut_torn_tail()
    assert path.stat().st_size == whole
    log.close()


@pytest.mark.req("R6.3")
def test_a_short_header_at_the_end_is_a_torn_tail() -> None:
    result = wal_format.scan(encoded(Op.RETIRE, 1) + b"ESPERWAL\x01")
    assert len(result.records) == 1 and result.torn_tail
    assert result.reason == "byte 256: short header: 9 of 256 bytes"


@pytest.mark.req("R6.3")
def test_sequences_must_strictly_increase() -> None:
    data = encoded(Op.RETIRE, 1) + encoded(Op.RETIRE, 3) + encoded(Op.RETIRE, 3)
    result = wal_format.scan(data)
    assert [r.header.sequence for r in result.records] == [1, 3]
    assert result.reason == "byte 512: sequence 3 after 3: not increasing"
    assert not result.torn_tail, "a whole record out of order is not an unfinished append"


@pytest.mark.req("R6.3")
def test_a_whole_record_of_another_version_is_refused_not_cut(wal_dir: Path) -> None:
    commit_records(wal_dir, 1)
    path = wal_dir / wal_format.WAL_NAME
    raw = bytearray(path.read_bytes())
    struct.pack_into("<H", raw, 8, 2)
    raw[60:64] = bytes(4)
    struct.pack_into("<I", raw, 60, crc32c(bytes(raw[:HEADER_BYTES])))
    path.write_bytes(raw)
    with pytest.raises(WalVersionUnsupported, match="version 2 != 1"):
        WriteAheadLog(wal_dir, SPEC)
    assert path.read_bytes() == raw


@pytest.mark.req("R6.3")
def test_a_begin_without_commit_or_abort_is_an_aborted_transaction(wal_dir: Path) -> None:
    log = WriteAheadLog(wal_dir, SPEC)
    record = record_for(log.next_sequence)
    log.begin(record)
    log.close()
    reopened = WriteAheadLog(wal_dir, SPEC)
    assert reopened.live() == [] and reopened.in_doubt() == [record]
    reopened.close()


@pytest.mark.req("R6.3")
def test_abort_and_retire_end_a_transaction(wal_dir: Path) -> None:
    log = WriteAheadLog(wal_dir, SPEC)
    failed, kept, retired = (record_for(log.next_sequence + i) for i in range(3))
    log.begin(failed)
    log.abort(failed, CheckpointFailure(error="ENOSPC"))
    for record in (kept, retired):
        log.begin(record)
        log.commit(record)
    log.retire(retired)
    log.close()
    reopened = WriteAheadLog(wal_dir, SPEC)
    assert reopened.live() == [kept] and reopened.in_doubt() == []
    reopened.close()


# -- appends -----------------------------------------------------------------------------------


@pytest.mark.req("R6.3")
def test_sequences_continue_across_reopening(wal_dir: Path) -> None:
    commit_records(wal_dir, 2)
    log = WriteAheadLog(wal_dir, SPEC)
    assert log.next_sequence == 5
    log.close()


@pytest.mark.req("R6.3")
def test_each_append_is_timed_against_the_wal_budget(wal_dir: Path) -> None:
    log = WriteAheadLog(wal_dir, CheckpointSpec(wal_append_ms=600_000.0))
    record = record_for(log.next_sequence)
    log.begin(record)
    log.commit(record)
    assert log.appends == 2 and 0 < log.last_append_ns <= log.worst_append_ns
    assert log.appends_over_budget == 0
    log.close()


@pytest.mark.req("R6.3")
@pytest.mark.parametrize(
    "point", ["wal.append.after_header", "wal.append.after_payload", "wal.append.after_sync"]
)
def test_a_failed_append_is_cut_back_so_later_records_survive(wal_dir: Path, point: str) -> None:
    faults = Faults()
    log = WriteAheadLog(wal_dir, SPEC, faults=faults)
    kept = record_for(log.next_sequence)
    log.begin(kept)
    faults.fail_at(point, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError, match="No space left"):
        log.commit(kept)
    log.commit(kept)
    log.close()
    reopened = WriteAheadLog(wal_dir, SPEC)
    assert reopened.scan.clean and reopened.live() == [kept]
    assert faults.fired == {point: 1}
    reopened.close()


# -- compaction --------------------------------------------------------------------------------


@pytest.mark.req("R6.3")
def test_compaction_keeps_only_live_commits_and_sequences_keep_increasing(wal_dir: Path) -> None:
    spec = CheckpointSpec(wal_rotate_bytes=64 * 1024)
    log = WriteAheadLog(wal_dir, spec)
    committed = []
    while not log.needs_compaction:
        record = record_for(log.next_sequence)
        log.begin(record)
        log.commit(record)
        committed.append(record)
        if len(committed) > 3:
            log.retire(committed[-4])
    before = log.next_sequence
    log.compact()
    assert log.live() == committed[-3:] and log.size_bytes < spec.wal_rotate_bytes
    assert log.next_sequence == before + 1
    log.close()

    reopened = WriteAheadLog(wal_dir, spec)
    assert reopened.live() == committed[-3:] and reopened.next_sequence == before + 1
    assert [r.header.op for r in reopened.scan.records] == [Op.COMMIT] * 3 + [Op.COMPACTED]
    reopened.close()


@pytest.mark.req("R6.3")
def test_a_leftover_compaction_file_is_removed_at_open(wal_dir: Path) -> None:
    records = commit_records(wal_dir, 1)
    (wal_dir / wal_format.COMPACT_NAME).write_bytes(b"half a compaction")
    log = WriteAheadLog(wal_dir, SPEC)
    assert log.live() == records and not (wal_dir / wal_format.COMPACT_NAME).exists()
    log.close()


@pytest.mark.req("R6.3")
@pytest.mark.parametrize("point", [p for p in wal.WRITE_POINTS if p.startswith("wal.compact")])
def test_a_crash_during_compaction_keeps_every_live_commit(wal_dir: Path, point: str) -> None:
    records = commit_records(wal_dir, 3)
    faults = Faults()
    faults.crash_at(point)
    log = WriteAheadLog(wal_dir, SPEC, faults=faults)
    log.retire(records[0])
    with pytest.raises(InjectedCrash):
        log.compact()
    log.close()
    reopened = WriteAheadLog(wal_dir, SPEC)
    assert reopened.live() == records[1:] and faults.fired == {point: 1}
    assert not (wal_dir / wal_format.COMPACT_NAME).exists()
    reopened.close()


# -- one writer per directory ------------------------------------------------------------------


@pytest.mark.req("R6.3")
def test_a_second_log_on_the_same_directory_is_refused_naming_it(wal_dir: Path) -> None:
    first = WriteAheadLog(wal_dir, SPEC)
    with pytest.raises(CheckpointDirectoryLocked, match=str(wal_dir)) as refused:
        WriteAheadLog(wal_dir, SPEC)
    assert refused.value.directory == wal_dir
    first.close()
    WriteAheadLog(wal_dir, SPEC).close()


@pytest.mark.req("R6.3")
def test_the_lock_holds_across_compaction(wal_dir: Path) -> None:
    log = WriteAheadLog(wal_dir, SPEC)
    record = record_for(log.next_sequence)
    log.begin(record)
    log.commit(record)
    log.compact()
    with pytest.raises(CheckpointDirectoryLocked):
        WriteAheadLog(wal_dir, SPEC)
    log.close()
