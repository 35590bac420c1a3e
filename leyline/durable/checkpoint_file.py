"""The checkpoint file format: header encode/decode and verifying one file on its own.

The sidecar's `DurableStore` writes these files and loads them (through its own file-system
seam, hence the `Readable` parameter); recovery at open, `inspect_directory`, `tolaria
checkpoints` and `tolaria run --resume` verify them without the WAL. Each file is
self-describing and verifiable alone: its header carries its own checksum, the lengths and the
xxh3 of the manifest and of the data, and its manifest (a Leyline `SnapshotManifest`) names the
run instance, lineage, step, epoch and training section it was captured from. Nothing here
writes, and nothing here unpickles.

Checkpoint file (little-endian)::

    0    8s   magic b"TOLCKPT1"
    8    u32  format version (1)
    12   u32  header bytes (256)
    16   u64  manifest length
    24   u64  data length
    32   u64  xxh3-64 of the manifest
    40   u64  xxh3-64 of the data
    48   u64  sequence
    56   16s  transaction id
    72   u64  epoch
    80   u64  global step
    88   u64  snapshot generation
    96   u64  xxh3-64 of all 256 header bytes, computed with bytes 96..103 set to zero
    104  152 zero bytes
    256  manifest bytes (a serialized Leyline `SnapshotManifest`)
    ...  data bytes; the file ends exactly here

A file is named `ckpt-<sequence:010d>-e<epoch>.bin`; the name must agree with the header, so a
file copied or renamed over another is refused. The WAL's `CheckpointRecord` repeats the data
length (`payload_bytes`) and the data xxh3 (`payload_checksum`, 8 little-endian bytes), so a
load through the WAL refuses a file swapped for another as well (`check_against_record`).
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import xxhash
from google.protobuf.message import DecodeError

from leyline.checksum import DATA_ALGORITHM, digest_bytes, digest_int, xxh3
from leyline.v1.resilience_pb2 import CheckpointRecord, SnapshotManifest

MAGIC = b"TOLCKPT1"
FORMAT_VERSION = 1
HEADER_BYTES = 256
RECORD_VERSION = 1
"""`CheckpointRecord.version` of the records a store commits (and recovery adopts)."""
CHUNK_BYTES = 16 << 20
"""Read in 16 MiB pieces: full disk bandwidth, and the piece just read is hashed from cache."""

HEADER = struct.Struct("<8sIIQQQQQ16sQQQQ")
HEADER_SUM_AT = 96
FILE_NAME = re.compile(r"ckpt-(\d{10})(?:-e(\d+)\.bin|\.tmp)")
"""`ckpt-<sequence>-e<epoch>.bin` (committed or about to be) and `ckpt-<sequence>.tmp`."""


def file_name(sequence: int, epoch: int) -> str:
    return f"ckpt-{sequence:010d}-e{epoch}.bin"


def temp_name(sequence: int) -> str:
    return f"ckpt-{sequence:010d}.tmp"


def name_sequence(name: str) -> int | None:
    """The sequence in a checkpoint or temp file name, or None for any other name."""
    match = FILE_NAME.fullmatch(name)
    return None if match is None else int(match.group(1))


class Readable(Protocol):
    """A file open for reading at its current offset (`io.FileIO`, or a store's seam)."""

    def readinto(self, buffer: memoryview, /) -> int | None:
        """Reads up to `len(buffer)` bytes into `buffer`; 0 (or None) at the end of the file."""
        ...


@dataclass(frozen=True)
class CheckpointHeader:
    """The fixed header of a checkpoint file, as written."""

    manifest_length: int
    data_length: int
    manifest_xxh3: int
    data_xxh3: int
    sequence: int
    transaction_id: bytes
    epoch: int
    global_step: int
    snapshot_generation: int


class CheckpointFileInvalid(ValueError):
    """A checkpoint file does not verify; `what` names the check, with expected and found."""

    def __init__(self, path: Path, what: str, expected: object, found: object) -> None:
        super().__init__(f"{path}: {what}: expected {expected}, found {found}")
        self.path = path
        self.what = what
        self.expected = expected
        self.found = found


def encode_header(
    *,
    manifest: bytes,
    data_length: int,
    data_xxh3: int,
    sequence: int,
    transaction_id: bytes,
    epoch: int,
    global_step: int,
    snapshot_generation: int,
) -> bytes:
    """The 256-byte header of a checkpoint file."""
    header = bytearray(HEADER_BYTES)
    HEADER.pack_into(
        header,
        0,
        MAGIC,
        FORMAT_VERSION,
        HEADER_BYTES,
        len(manifest),
        data_length,
        xxh3(manifest),
        data_xxh3,
        sequence,
        transaction_id,
        epoch,
        global_step,
        snapshot_generation,
        0,
    )
    struct.pack_into("<Q", header, HEADER_SUM_AT, xxh3(header))
    return bytes(header)


def decode_header(raw: bytes, *, path: Path, file_size: int) -> CheckpointHeader:
    """Checks and parses a header; raises `CheckpointFileInvalid` naming the failed check."""
    if len(raw) < HEADER_BYTES:
        raise CheckpointFileInvalid(path, "header length", HEADER_BYTES, len(raw))
    (
        magic,
        version,
        header_bytes,
        manifest_length,
        data_length,
        manifest_sum,
        data_sum,
        sequence,
        txn,
        epoch,
        step,
        generation,
        stored,
    ) = HEADER.unpack_from(raw, 0)
    if magic != MAGIC:
        raise CheckpointFileInvalid(path, "magic", MAGIC, bytes(magic))
    zeroed = bytearray(raw[:HEADER_BYTES])
    struct.pack_into("<Q", zeroed, HEADER_SUM_AT, 0)
    if (computed := xxh3(zeroed)) != stored:
        raise CheckpointFileInvalid(path, "header xxh3", f"{stored:#018x}", f"{computed:#018x}")
    for what, expected, found in (
        ("format version", FORMAT_VERSION, version),
        ("header bytes", HEADER_BYTES, header_bytes),
        ("file size", HEADER_BYTES + manifest_length + data_length, file_size),
    ):
        if expected != found:
            raise CheckpointFileInvalid(path, what, expected, found)
    return CheckpointHeader(
        manifest_length=manifest_length,
        data_length=data_length,
        manifest_xxh3=manifest_sum,
        data_xxh3=data_sum,
        sequence=sequence,
        transaction_id=bytes(txn),
        epoch=epoch,
        global_step=step,
        snapshot_generation=generation,
    )


def check_file_name(header: CheckpointHeader, path: Path) -> None:
    """Refuses a file whose name does not carry its header's sequence and epoch (a file
    copied or renamed over another); a name outside the pattern is not checked."""
    match = FILE_NAME.fullmatch(path.name)
    if match is None or match.group(2) is None:
        return
    for what, expected, found in (
        ("sequence (file name)", int(match.group(1)), header.sequence),
        ("epoch (file name)", int(match.group(2)), header.epoch),
    ):
        if expected != found:
            raise CheckpointFileInvalid(path, what, expected, found)


def check_against_record(header: CheckpointHeader, record: CheckpointRecord, path: Path) -> None:
    """Refuses a file that is not the one the WAL's `record` describes (swapped, stale)."""
    if len(record.payload_checksum) != 8:
        raise CheckpointFileInvalid(
            path, "WAL record checksum length", 8, len(record.payload_checksum)
        )
    for what, expected, found in (
        ("sequence (WAL record)", record.sequence, header.sequence),
        ("transaction id (WAL record)", record.transaction_id.hex(), header.transaction_id.hex()),
        ("epoch (WAL record)", record.epoch, header.epoch),
        ("data length (WAL record)", record.payload_bytes, header.data_length),
        ("data xxh3 (WAL record)", digest_int(record.payload_checksum), header.data_xxh3),
    ):
        if expected != found:
            raise CheckpointFileInvalid(path, what, expected, found)


def read_exactly(f: Readable, n: int, path: Path, what: str) -> bytes:
    """`n` bytes from `f`; raises `CheckpointFileInvalid` naming `what` when the file ends."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        read = f.readinto(view[got:])
        if not read:
            raise CheckpointFileInvalid(path, f"{what} length", n, got)
        got += read
    return bytes(buf)


def check_manifest(raw: bytes, header: CheckpointHeader, path: Path) -> None:
    """Refuses manifest bytes whose xxh3 is not the header's."""
    if (found := xxh3(raw)) != header.manifest_xxh3:
        raise CheckpointFileInvalid(
            path, "manifest xxh3", f"{header.manifest_xxh3:#018x}", f"{found:#018x}"
        )


def parse_manifest(raw: bytes, path: Path) -> SnapshotManifest:
    """The manifest as a Leyline `SnapshotManifest` (never unpickled)."""
    try:
        return SnapshotManifest.FromString(raw)
    except DecodeError as err:
        raise CheckpointFileInvalid(path, "manifest", "a SnapshotManifest", err) from err


def _pieces(length: int, into: memoryview | None) -> Iterator[memoryview]:
    """Where each piece of the data goes: `into` piece by piece, or one reused scratch buffer."""
    if into is not None:
        for start in range(0, length, CHUNK_BYTES):
            yield into[start : start + min(CHUNK_BYTES, length - start)]
        return
    scratch = memoryview(bytearray(min(CHUNK_BYTES, max(length, 1))))
    for start in range(0, length, CHUNK_BYTES):
        yield scratch[: min(CHUNK_BYTES, length - start)]


def hash_data(f: Readable, length: int, path: Path, into: memoryview | None = None) -> int:
    """Reads `length` data bytes from `f` (into `into` when given, else through a scratch
    buffer) and returns their xxh3-64; raises `CheckpointFileInvalid` when the file ends."""
    hasher = xxhash.xxh3_64()
    done = 0
    for piece in _pieces(length, into):
        got = 0
        while got < len(piece):
            read = f.readinto(piece[got:])
            if not read:
                raise CheckpointFileInvalid(path, "data length", length, done + got)
            got += read
        hasher.update(piece)
        done += got
    return int(hasher.intdigest())


def check_data(digest: int, header: CheckpointHeader, path: Path) -> None:
    if digest != header.data_xxh3:
        raise CheckpointFileInvalid(
            path, "data xxh3", f"{header.data_xxh3:#018x}", f"{digest:#018x}"
        )


@dataclass(frozen=True)
class CheckpointFile:
    """One checkpoint file as read alone: header and manifest, and whether the data verified.

    `error` is empty when every check passed (or, with `verify_data=False`, every check but
    the data hash); otherwise it names the first failed check. `header`/`manifest` are None
    when the failure came before they could be read.
    """

    path: Path
    header: CheckpointHeader | None
    manifest: SnapshotManifest | None
    data_verified: bool
    error: str

    @property
    def ok(self) -> bool:
        return not self.error


def verify_stream(
    f: Readable, size: int, path: Path, *, verify_data: bool = True
) -> CheckpointFile:
    """Checks one checkpoint file read from `f` (positioned at 0, `size` bytes long) on its
    own: header, name, manifest, data. Never raises for a bad file: the result says why."""
    header: CheckpointHeader | None = None
    manifest: SnapshotManifest | None = None
    try:
        header = decode_header(
            read_exactly(f, HEADER_BYTES, path, "header"), path=path, file_size=size
        )
        check_file_name(header, path)
        raw = read_exactly(f, header.manifest_length, path, "manifest")
        check_manifest(raw, header, path)
        manifest = parse_manifest(raw, path)
        if not verify_data:
            return CheckpointFile(path, header, manifest, False, "")
        check_data(hash_data(f, header.data_length, path), header, path)
    except CheckpointFileInvalid as err:
        return CheckpointFile(path, header, manifest, False, str(err))
    except OSError as err:
        return CheckpointFile(path, header, manifest, False, f"{path}: unreadable: {err}")
    return CheckpointFile(path, header, manifest, True, "")


def read_checkpoint_file(path: Path, *, verify_data: bool = True) -> CheckpointFile:
    """Reads and checks one checkpoint file on its own (no WAL needed); never raises for a bad
    or unreadable file (the result says what is wrong), only for a programming error."""
    try:
        with io.FileIO(path, "r") as f:
            size = f.seek(0, io.SEEK_END)
            f.seek(0)
            return verify_stream(f, size, path, verify_data=verify_data)
    except OSError as err:
        return CheckpointFile(path, None, None, False, f"{path}: unreadable: {err}")


def record_from_file(checked: CheckpointFile) -> CheckpointRecord:
    """The `CheckpointRecord` recovery adopts for a file that verified alone.

    Built only from the file: its header (sequence, transaction, epoch, step, generation,
    data length and xxh3) and its manifest (run, instance, lineage, training digest), with
    `recovered_from_file` set and no commit time (the WAL that knew it is gone). Raises
    `ValueError` for a file that did not verify: only a whole file may be adopted.
    """
    header, manifest = checked.header, checked.manifest
    if not checked.ok or not checked.data_verified or header is None or manifest is None:
        raise ValueError(f"{checked.path}: only a verified file is adopted ({checked.error})")
    return CheckpointRecord(
        version=RECORD_VERSION,
        checkpoint_id=f"{manifest.run_id}/{header.sequence:010d}",
        sequence=header.sequence,
        transaction_id=header.transaction_id,
        epoch=header.epoch,
        global_step=header.global_step,
        file_name=checked.path.name,
        payload_bytes=header.data_length,
        checksum_algorithm=DATA_ALGORITHM,
        payload_checksum=digest_bytes(header.data_xxh3),
        snapshot_generation=header.snapshot_generation,
        run_id=manifest.run_id,
        instance_id=manifest.instance_id,
        lineage_id=manifest.lineage_id,
        manifest_digest=manifest.manifest_digest,
        recovered_from_file=True,
    )


def checkpoint_files(directory: Path) -> list[Path]:
    """The `ckpt-*.bin` files in `directory`, newest sequence first (none if it is absent)."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = FILE_NAME.fullmatch(path.name)
        if match is not None and path.suffix == ".bin":
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found, reverse=True)]


def newest_valid_checkpoint(directory: Path) -> CheckpointFile | None:
    """The newest checkpoint file in `directory` that verifies alone, or None."""
    for path in checkpoint_files(directory):
        checked = read_checkpoint_file(path)
        if checked.ok:
            return checked
    return None
