"""The on-disk checkpoint file format, and reading a checkpoint directory without the sidecar.

The sidecar writes checkpoint files (`tolaria_sidecar.checkpoints`); `tolaria checkpoints`,
`tolaria run --resume` and the tests read them. Each file is self-describing and verifiable
alone: its header carries its own checksum, the lengths and the xxh3 of the manifest and of
the data, and its manifest (a Leyline `SnapshotManifest`) names the run instance, lineage,
step, epoch and training section it was captured from. Nothing here writes, and nothing here
unpickles.

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
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash
from google.protobuf.message import DecodeError

from leyline.checksum import xxh3
from leyline.v1.resilience_pb2 import SnapshotManifest

MAGIC = b"TOLCKPT1"
FORMAT_VERSION = 1
HEADER_BYTES = 256
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


def read_exactly(f: io.FileIO, n: int, path: Path, what: str) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        read = f.readinto(view[got:])
        if not read:
            raise CheckpointFileInvalid(path, f"{what} length", n, got)
        got += read
    return bytes(buf)


def _data_chunks(f: io.FileIO, length: int, path: Path) -> Iterator[memoryview]:
    buf = bytearray(min(CHUNK_BYTES, max(length, 1)))
    view = memoryview(buf)
    left = length
    while left:
        piece = view[: min(left, len(buf))]
        got = 0
        while got < len(piece):
            read = f.readinto(piece[got:])
            if not read:
                raise CheckpointFileInvalid(path, "data length", length, length - left + got)
            got += read
        left -= len(piece)
        yield piece


def read_checkpoint_file(path: Path, *, verify_data: bool = True) -> CheckpointFile:
    """Reads and checks one checkpoint file on its own (no WAL needed); never raises for a bad
    file (the result says what is wrong), only for a programming error."""
    header: CheckpointHeader | None = None
    manifest: SnapshotManifest | None = None
    try:
        with io.FileIO(path, "r") as f:
            size = f.seek(0, io.SEEK_END)
            f.seek(0)
            header = decode_header(
                read_exactly(f, HEADER_BYTES, path, "header"), path=path, file_size=size
            )
            raw = read_exactly(f, header.manifest_length, path, "manifest")
            if (found := xxh3(raw)) != header.manifest_xxh3:
                raise CheckpointFileInvalid(
                    path, "manifest xxh3", f"{header.manifest_xxh3:#018x}", f"{found:#018x}"
                )
            try:
                manifest = SnapshotManifest.FromString(raw)
            except DecodeError as err:
                raise CheckpointFileInvalid(path, "manifest", "a SnapshotManifest", err) from err
            if not verify_data:
                return CheckpointFile(path, header, manifest, False, "")
            hasher = xxhash.xxh3_64()
            for chunk in _data_chunks(f, header.data_length, path):
                hasher.update(chunk)
            if (digest := hasher.intdigest()) != header.data_xxh3:
                raise CheckpointFileInvalid(
                    path, "data xxh3", f"{header.data_xxh3:#018x}", f"{digest:#018x}"
                )
    except CheckpointFileInvalid as err:
        return CheckpointFile(path, header, manifest, False, str(err))
    except OSError as err:
        return CheckpointFile(path, header, manifest, False, f"{path}: unreadable: {err}")
    return CheckpointFile(path, header, manifest, True, "")


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
