"""The checkpoint WAL's record format (R6.3): encode and decode records, and scan a whole log.

The sidecar's `WriteAheadLog` appends these records to `wal.log` and scans the log at open;
`inspect_directory` and `tolaria checkpoints` scan it read-only. Pure: nothing here opens,
writes or truncates a file.

Record layout (little-endian; a 256-byte header, then `payload length` bytes)::

    0    8s   magic b"ESPERWAL"
    8    u16  version (1)
    10   u16  op: BEGIN 1, COMMIT 2, ABORT 3, RETIRE 4, COMPACTED 5
    12   u32  reserved, 0
    16   u64  sequence, strictly increasing through the file
    24   16s  transaction id (shared by a checkpoint's BEGIN, COMMIT/ABORT and RETIRE)
    40   u64  epoch
    48   u64  payload length
    56   u32  CRC32C of the payload
    60   u32  CRC32C of all 256 header bytes, computed with bytes 60..63 set to zero
    64   192 zero bytes
    256  payload: BEGIN and COMMIT a serialized Leyline `CheckpointRecord` (BEGIN's without
         checksum and commit time), ABORT a `CheckpointFailure`, RETIRE and COMPACTED none

CRC32C detects every error burst of up to 32 bits, so any one damaged byte in a header or a
payload is always caught. A whole record (both CRCs hold) of another version is not damage:
the log belongs to another build, and `scan` refuses it (`WalVersionUnknown`) instead of
treating it as damage. COMPACTED ends a compacted log and carries the high-water sequence.

`scan` reads every record it can: at a bad record it resynchronises on the next offset where a
whole valid record starts (magic, header CRC, payload CRC, a sequence above the last one), so
one damaged record never hides the records after it. One damaged run at the very end, no longer
than one record can be and not a whole record out of sequence, is a *torn tail* (an unfinished
append; a normal crash) when records precede it or it looks like the start of an append (a
prefix of the magic, or zeros). Any other
damage is *mid-log damage* when valid records follow it, and *garbage* when the log holds no
valid record at all. What recovery does with each is `leyline.durable.recovery`'s job.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from google.protobuf.message import DecodeError

from leyline.checksum import crc32c
from leyline.v1.resilience_pb2 import CheckpointRecord

WAL_NAME = "wal.log"
COMPACT_NAME = "wal.log.compact"
"""A compacted or rewritten log being written; renamed over `wal.log` once durable."""
DAMAGED_PREFIX = "wal.log.damaged-"
"""`wal.log.damaged-<n>`: a damaged log moved aside by recovery; never overwritten."""
MAGIC = b"ESPERWAL"
VERSION = 1
HEADER_BYTES = 256
MAX_PAYLOAD_BYTES = 1 << 20
"""A record payload is a small Leyline message; anything larger is a damaged length."""

_FIELDS = struct.Struct("<8sHHIQ16sQQII")
_CRC_AT = 60


class Op(IntEnum):
    BEGIN = 1
    COMMIT = 2
    ABORT = 3
    RETIRE = 4
    COMPACTED = 5


_OPS = frozenset(int(op) for op in Op)


class WalRecordInvalid(ValueError):
    """Bytes at `offset` are not a valid record; `reason` says which check failed."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"bad WAL record at byte {offset}: {reason}")
        self.offset = offset
        self.reason = reason


class WalOutOfOrder(WalRecordInvalid):
    """A whole record whose sequence does not increase: not an unfinished append, so never
    part of a torn tail."""


class WalVersionUnknown(WalRecordInvalid):
    """A whole record (its CRCs hold) of another WAL version: the log belongs to another
    build; refuse it rather than treat it as damage."""


@dataclass(frozen=True)
class RecordHeader:
    op: Op
    sequence: int
    transaction_id: bytes
    epoch: int
    payload_length: int
    payload_crc: int


@dataclass(frozen=True)
class WalRecord:
    header: RecordHeader
    payload: bytes
    offset: int

    @property
    def end(self) -> int:
        return self.offset + HEADER_BYTES + len(self.payload)


@dataclass(frozen=True)
class WalDamage:
    """A run of bytes no record could be read from: `length` bytes at `offset`."""

    offset: int
    length: int
    reason: str


@dataclass(frozen=True)
class WalScan:
    """Every valid record of a log, in file order, and every damaged run between them."""

    records: tuple[WalRecord, ...]
    damage: tuple[WalDamage, ...]
    size: int
    torn_tail: bool
    """The only damage is one run at the end, left by an unfinished append."""

    @property
    def valid_bytes(self) -> int:
        return sum(r.end - r.offset for r in self.records)

    @property
    def damaged_bytes(self) -> int:
        return sum(d.length for d in self.damage)

    @property
    def clean(self) -> bool:
        return not self.damage

    @property
    def mid_log(self) -> bool:
        """Some damage has a valid record after it."""
        return (
            bool(self.damage)
            and bool(self.records)
            and self.damage[0].offset < self.records[-1].offset
        )

    @property
    def garbage(self) -> bool:
        """Not empty, no valid record, and not a torn first append."""
        return bool(self.damage) and not self.records and not self.torn_tail

    @property
    def reason(self) -> str:
        """The first damage, with its offset, or "" for a clean log."""
        if not self.damage:
            return ""
        first = self.damage[0]
        return f"byte {first.offset}: {first.reason}"

    def damage_after(self, offset: int) -> bool:
        """Whether any damage lies after byte `offset` (it may hide a later record)."""
        return any(d.offset + d.length > offset for d in self.damage)


def encode_header(
    op: Op, sequence: int, transaction_id: bytes, epoch: int, payload: bytes
) -> bytes:
    """The 256-byte header of a record carrying `payload`."""
    if len(transaction_id) != 16:
        raise ValueError(f"a transaction id is 16 bytes, got {len(transaction_id)}")
    header = bytearray(HEADER_BYTES)
    _FIELDS.pack_into(
        header,
        0,
        MAGIC,
        VERSION,
        int(op),
        0,
        sequence,
        transaction_id,
        epoch,
        len(payload),
        crc32c(payload),
        0,
    )
    struct.pack_into("<I", header, _CRC_AT, crc32c(header))
    return bytes(header)


def encode_record(
    op: Op, sequence: int, transaction_id: bytes, epoch: int, payload: bytes
) -> bytes:
    """A whole record: header and payload."""
    return encode_header(op, sequence, transaction_id, epoch, payload) + payload


def decode_header(raw: bytes | bytearray | memoryview, *, offset: int = 0) -> RecordHeader:
    """Parses and checks one header; raises `WalRecordInvalid` naming what is wrong, or
    `WalVersionUnknown` for a sound header of another version."""
    if len(raw) < HEADER_BYTES:
        raise WalRecordInvalid(offset, f"short header: {len(raw)} of {HEADER_BYTES} bytes")
    header = bytearray(raw[:HEADER_BYTES])
    magic, version, op, _, sequence, txn, epoch, length, payload_crc, stored = _FIELDS.unpack_from(
        header, 0
    )
    if magic != MAGIC:
        raise WalRecordInvalid(offset, f"magic {bytes(magic)!r} != {MAGIC!r}")
    struct.pack_into("<I", header, _CRC_AT, 0)
    computed = crc32c(header)
    if computed != stored:
        raise WalRecordInvalid(offset, f"header crc32c {computed:#010x} != stored {stored:#010x}")
    if version != VERSION:
        raise WalVersionUnknown(
            offset, f"version {version} != {VERSION} (this build reads only {VERSION})"
        )
    if op not in _OPS:
        raise WalRecordInvalid(offset, f"unknown op {op}")
    if length > MAX_PAYLOAD_BYTES:
        raise WalRecordInvalid(offset, f"payload length {length} > {MAX_PAYLOAD_BYTES}")
    return RecordHeader(Op(op), sequence, bytes(txn), epoch, length, payload_crc)


def checkpoint_record(record: WalRecord) -> CheckpointRecord:
    """The `CheckpointRecord` a BEGIN or COMMIT carries (`scan` already checked it parses)."""
    return CheckpointRecord.FromString(record.payload)


def _check_payload(header: RecordHeader, payload: bytes, offset: int) -> None:
    if header.op in (Op.BEGIN, Op.COMMIT):
        try:
            record = CheckpointRecord.FromString(payload)
        except DecodeError as err:
            raise WalRecordInvalid(offset, f"{header.op.name} payload: {err}") from err
        if record.transaction_id != header.transaction_id:
            raise WalRecordInvalid(
                offset,
                f"{header.op.name} payload transaction {record.transaction_id.hex()} != "
                f"header {header.transaction_id.hex()}",
            )


def read_record(data: bytes, offset: int, previous_sequence: int) -> WalRecord:
    """The whole valid record at `offset`, or `WalRecordInvalid` naming the failed check
    (`WalVersionUnknown` for a whole record of another version)."""
    header = decode_header(data[offset : offset + HEADER_BYTES], offset=offset)
    start = offset + HEADER_BYTES
    payload = data[start : start + header.payload_length]
    if len(payload) < header.payload_length:
        raise WalRecordInvalid(
            offset, f"short payload: {len(payload)} of {header.payload_length} B"
        )
    if (found := crc32c(payload)) != header.payload_crc:
        raise WalRecordInvalid(
            offset, f"payload crc32c {found:#010x} != {header.payload_crc:#010x}"
        )
    if header.sequence <= previous_sequence:
        raise WalOutOfOrder(
            offset, f"sequence {header.sequence} after {previous_sequence}: not increasing"
        )
    _check_payload(header, payload, offset)
    return WalRecord(header, payload, offset)


def _resynchronise(raw: bytes, start: int, previous_sequence: int) -> int:
    """The first offset at or after `start` where a whole valid record begins, else the end."""
    at = raw.find(MAGIC, start)
    while at >= 0:
        try:
            read_record(raw, at, previous_sequence)
        except WalVersionUnknown:
            return at
        except WalRecordInvalid:
            at = raw.find(MAGIC, at + 1)
            continue
        return at
    return len(raw)


def _looks_like_an_append(tail: bytes) -> bool:
    """A torn first append starts as a record does (a prefix of the magic), or reads as zeros
    (a file system that extended the file but had not written the block)."""
    head = tail[: len(MAGIC)]
    return MAGIC.startswith(head) or not tail.strip(b"\0")


def scan(data: bytes | memoryview) -> WalScan:
    """Every valid record and every damaged run of a whole log. Pure: touches no file.

    Raises `WalVersionUnknown` for a whole record of another version: that log belongs to
    another build and must be neither cut nor rewritten.
    """
    raw = bytes(data)
    records: list[WalRecord] = []
    damage: list[WalDamage] = []
    offset = 0
    previous = 0
    whole_record_at_tail = False
    while offset < len(raw):
        try:
            record = read_record(raw, offset, previous)
        except WalVersionUnknown:
            raise
        except WalRecordInvalid as err:
            resume = _resynchronise(raw, offset + 1, previous)
            damage.append(WalDamage(offset, resume - offset, err.reason))
            whole_record_at_tail = isinstance(err, WalOutOfOrder)
            offset = resume
            continue
        records.append(record)
        previous = record.header.sequence
        offset = record.end
    torn = False
    if (
        len(damage) == 1
        and damage[0].offset + damage[0].length == len(raw)
        and damage[0].length <= HEADER_BYTES + MAX_PAYLOAD_BYTES
        and not whole_record_at_tail
    ):
        torn = bool(records) or _looks_like_an_append(raw[damage[0].offset :])
    return WalScan(tuple(records), tuple(damage), len(raw), torn)
