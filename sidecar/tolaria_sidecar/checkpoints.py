"""Durable checkpoints (R6.3): checkpoint files committed through the WAL, verified on load.

The sidecar's persist thread calls `DurableStore.write` with a snapshot's manifest and data
(off the training hot path: a write takes seconds), and the full rollback tier calls
`load_latest` to bring the last committed checkpoint back, every byte verified. A store never
unpickles, never uses `O_DSYNC` for bulk data, never serves a checkpoint that does not verify,
and never deletes a file the WAL still lists as committed.

Write protocol, each step durable before the next::

    WAL BEGIN (CheckpointRecord: file name, epoch, step, transaction id)
    ckpt-<sequence:010d>.tmp   written from the caller's buffer in 16 MiB pieces, hashed as
                               it goes, header written last, fdatasync
    rename -> ckpt-<sequence:010d>-e<epoch>.bin, fsync the directory
    WAL COMMIT (the full CheckpointRecord)          <- the checkpoint exists from here on
    retention: WAL RETIRE for each checkpoint past `spec.keep`, then unlink, fsync directory
    compaction when the WAL is past `spec.wal_rotate_bytes`

Opening replays the WAL and removes what a crash left behind: `.tmp` files, files of BEGINs
that never committed, files already retired. A `.bin` file the WAL does not know (its records
were cut as corrupt) is left in place and logged, never deleted.

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
    256  manifest bytes (a serialized Leyline `SnapshotManifest`, opaque here)
    ...  data bytes; the file ends exactly here

The WAL's `CheckpointRecord` repeats the data length (`payload_bytes`) and the data xxh3
(`payload_checksum`, 8 little-endian bytes), so a file swapped for another is refused too.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import xxhash

from leyline.checksum import DATA_ALGORITHM, digest_bytes, digest_int, xxh3
from leyline.spec.resilience import CheckpointSpec
from leyline.v1.resilience_pb2 import CheckpointFailure, CheckpointRecord
from tolaria_sidecar.errors import (
    BufferTooSmall,
    CheckpointCorrupt,
    CheckpointSkipped,
    CheckpointWriteFailed,
    NoCheckpoint,
    WalUnavailable,
)
from tolaria_sidecar.faults import Faults
from tolaria_sidecar.wal import WriteAheadLog, fsync_directory

logger = logging.getLogger(__name__)

MAGIC = b"TOLCKPT1"
FORMAT_VERSION = 1
HEADER_BYTES = 256
RECORD_VERSION = 1
CHUNK_BYTES = 16 << 20
"""Write and read in 16 MiB pieces: large enough for full disk bandwidth, small enough that
the piece just hashed is still in cache when it is written."""

_HEADER = struct.Struct("<8sIIQQQQQ16sQQQQ")
_HEADER_SUM_AT = 96
_FDATASYNC = getattr(os, "fdatasync", os.fsync)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_FILE_NAME = re.compile(r"ckpt-(\d{10})(?:-e(\d+)\.bin|\.tmp)")

WRITE_POINTS: tuple[str, ...] = (
    "checkpoint.after_data_write",
    "checkpoint.after_header_write",
    "checkpoint.after_fdatasync",
    "checkpoint.after_rename",
    "checkpoint.after_dir_fsync",
    "checkpoint.after_retire_unlink",
)


def file_name(sequence: int, epoch: int) -> str:
    return f"ckpt-{sequence:010d}-e{epoch}.bin"


def temp_name(sequence: int) -> str:
    return f"ckpt-{sequence:010d}.tmp"


def drop_page_cache(path: Path) -> bool:
    """Evicts a file's clean pages, so the next read comes from the disk (for benchmarks).

    Returns False where `posix_fadvise` does not exist. Dirty pages are not dropped: fsync
    first (every committed checkpoint already is).
    """
    fadvise = getattr(os, "posix_fadvise", None)
    if fadvise is None:
        return False
    fd = os.open(path, os.O_RDONLY | _CLOEXEC)
    try:
        fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def encode_header(
    record: CheckpointRecord, *, manifest: bytes, data_length: int, data_checksum: int
) -> bytes:
    """The 256-byte file header for `record`."""
    header = bytearray(HEADER_BYTES)
    _HEADER.pack_into(
        header,
        0,
        MAGIC,
        FORMAT_VERSION,
        HEADER_BYTES,
        len(manifest),
        data_length,
        xxh3(manifest),
        data_checksum,
        record.sequence,
        record.transaction_id,
        record.epoch,
        record.global_step,
        record.snapshot_generation,
        0,
    )
    struct.pack_into("<Q", header, _HEADER_SUM_AT, xxh3(header))
    return bytes(header)


def _byte_view(buffer: memoryview) -> memoryview:
    if buffer.ndim == 1 and buffer.format in ("B", "b", "c"):
        return buffer
    return buffer.cast("B")


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


CheckpointFilter = Callable[[CheckpointRecord, bytes], "str | None"]
"""Decides, from a checkpoint's WAL record and its (verified) manifest bytes, whether a load may
use it: None, or the reason it is skipped (another instance, another layout)."""


class DurableStore:
    """Checkpoints of one run in one directory; one writer, loads from any thread."""

    def __init__(
        self,
        directory: Path,
        spec: CheckpointSpec,
        *,
        run_id: str,
        instance_id: str = "",
        lineage_id: str = "",
        faults: Faults | None = None,
    ) -> None:
        """Opens the directory (created if absent), replays the WAL, removes crash leftovers.

        Raises `OSError` when the directory or WAL cannot be opened, `WalVersionUnsupported`
        for a WAL of another version; a damaged WAL tail is cut, not raised, and reported in
        `self.wal.replay`.
        """
        self.directory = directory
        self.spec = spec
        self.run_id = run_id
        self.instance_id = instance_id
        """Recorded in every checkpoint this store writes (R13.1)."""
        self.lineage_id = lineage_id or instance_id
        self._faults = faults or Faults()
        self._lock = threading.Lock()
        self.wal = WriteAheadLog(directory, spec, faults=self._faults)
        self.last_rejections: list[tuple[CheckpointRecord, CheckpointCorrupt | str]] = []
        """Checkpoints the last `load_latest` refused, newest first, with why."""
        self.unknown_files: list[Path] = []
        """Checkpoint files the WAL does not list (kept; a cut WAL may have described them)."""
        self.last_durable_ns = 0
        """Last `write`, from its call until the COMMIT record was durable (M6)."""
        self.last_write_ns = 0
        """Last `write`, the whole call: durable commit plus retention and compaction."""
        self._clean_directory()

    def close(self) -> None:
        self.wal.close()

    def __enter__(self) -> DurableStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- recovery ----------------------------------------------------------------------------

    def _clean_directory(self) -> None:
        live = {record.file_name for record in self.wal.live()}
        high_water = self.wal.next_sequence - 1
        removed = False
        for path in sorted(self.directory.iterdir()):
            match = _FILE_NAME.fullmatch(path.name)
            if match is None or path.name in live:
                continue
            sequence = int(match.group(1))
            if path.suffix == ".tmp" or sequence <= high_water:
                path.unlink()
                removed = True
                logger.info("%s: removed %s left by an unfinished write", self.directory, path.name)
            else:
                self.unknown_files.append(path)
                self.wal.skip_to(sequence)
                logger.warning(
                    "%s: %s is not in the WAL (sequence %d > last %d); kept, not restorable",
                    self.directory,
                    path.name,
                    sequence,
                    high_water,
                )
        if removed:
            fsync_directory(self.directory)

    # -- writing -----------------------------------------------------------------------------

    def write(
        self,
        *,
        manifest: bytes,
        data: memoryview,
        epoch: int,
        global_step: int,
        snapshot_generation: int,
        manifest_digest: str = "",
    ) -> CheckpointRecord:
        """Writes one checkpoint; it is durable and committed when this returns.

        Seconds for a large state: call from the persist thread, never from the training loop.
        `data` is read in place (no copy is made) and must not change during the call. Raises
        `CheckpointWriteFailed` (cause chained) after removing the partial file; the previous
        checkpoint then stays the latest. Retention and WAL compaction follow the commit; their
        I/O errors are logged, not raised, because the new checkpoint is already durable.
        """
        start_ns = time.perf_counter_ns()
        view = _byte_view(data)
        with self._lock:
            sequence = self.wal.next_sequence
            planned = CheckpointRecord(
                version=RECORD_VERSION,
                checkpoint_id=f"{self.run_id}/{sequence:010d}",
                sequence=sequence,
                transaction_id=os.urandom(16),
                epoch=epoch,
                global_step=global_step,
                file_name=file_name(sequence, epoch),
                payload_bytes=len(view),
                checksum_algorithm=DATA_ALGORITHM,
                snapshot_generation=snapshot_generation,
                run_id=self.run_id,
                instance_id=self.instance_id,
                lineage_id=self.lineage_id,
                manifest_digest=manifest_digest,
            )
            try:
                self.wal.begin(planned)
            except (OSError, WalUnavailable) as err:
                raise self._failed(planned, err) from err
            try:
                digest = self._write_file(planned, manifest, view)
                record = CheckpointRecord()
                record.CopyFrom(planned)
                record.payload_checksum = digest_bytes(digest)
                record.committed_at.FromNanoseconds(time.time_ns())
                self.wal.commit(record)
            except (OSError, WalUnavailable) as err:
                raise self._abandon(planned, err) from err
            self.last_durable_ns = time.perf_counter_ns() - start_ns
            self._retire_beyond_keep()
            self._compact_if_due()
            self.last_write_ns = time.perf_counter_ns() - start_ns
            return record

    def _write_file(self, record: CheckpointRecord, manifest: bytes, data: memoryview) -> int:
        tmp = self.directory / temp_name(record.sequence)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC, 0o644)
        try:
            # The header goes last: until then the file has no magic and can never verify.
            _write_all(fd, bytes(HEADER_BYTES))
            _write_all(fd, manifest)
            hasher = xxhash.xxh3_64()
            for start in range(0, len(data), CHUNK_BYTES):
                chunk = data[start : start + CHUNK_BYTES]
                hasher.update(chunk)
                _write_all(fd, chunk)
            self._faults.hit("checkpoint.after_data_write")
            digest = int(hasher.intdigest())
            header = encode_header(
                record, manifest=manifest, data_length=len(data), data_checksum=digest
            )
            if (written := os.pwrite(fd, header, 0)) != len(header):
                raise OSError(errno.EIO, f"short header write: {written} of {len(header)} B")
            self._faults.hit("checkpoint.after_header_write")
            _FDATASYNC(fd)
            self._faults.hit("checkpoint.after_fdatasync")
        finally:
            os.close(fd)
        os.rename(tmp, self.directory / record.file_name)
        self._faults.hit("checkpoint.after_rename")
        fsync_directory(self.directory)
        self._faults.hit("checkpoint.after_dir_fsync")
        return digest

    def _failed(self, record: CheckpointRecord, err: BaseException) -> CheckpointWriteFailed:
        failure = CheckpointFailure(
            epoch=record.epoch,
            global_step=record.global_step,
            error=f"{type(err).__name__}: {err}",
            snapshot_generation=record.snapshot_generation,
        )
        failure.at.FromNanoseconds(time.time_ns())
        return CheckpointWriteFailed(self.directory / record.file_name, failure)

    def _abandon(self, record: CheckpointRecord, err: BaseException) -> CheckpointWriteFailed:
        """Removes the partial files and records ABORT; returns the error to raise."""
        error = self._failed(record, err)
        try:
            for name in (temp_name(record.sequence), record.file_name):
                (self.directory / name).unlink(missing_ok=True)
            fsync_directory(self.directory)
            self.wal.abort(record, error.failure)
        except (OSError, WalUnavailable) as cleanup:
            # The BEGIN without an end already marks the transaction aborted; the next open
            # removes whatever file is left.
            logger.warning("%s: cleanup after a failed write: %s", self.directory, cleanup)
        logger.error("%s", error)
        return error

    def _retire_beyond_keep(self) -> None:
        live = self.wal.live()
        excess = live[: max(0, len(live) - self.spec.keep)]
        try:
            for record in excess:
                self.wal.retire(record)
                (self.directory / record.file_name).unlink(missing_ok=True)
                self._faults.hit("checkpoint.after_retire_unlink")
            if excess:
                fsync_directory(self.directory)
        except (OSError, WalUnavailable) as err:
            logger.warning("%s: retention stopped: %s", self.directory, err)

    def _compact_if_due(self) -> None:
        if not self.wal.needs_compaction:
            return
        try:
            self.wal.compact()
        except (OSError, WalUnavailable) as err:
            logger.warning("%s: WAL compaction failed: %s", self.directory, err)

    # -- reading -----------------------------------------------------------------------------

    def committed(self) -> list[CheckpointRecord]:
        """Committed checkpoints whose file exists, newest first."""
        with self._lock:
            live = self.wal.live()
        return [r for r in reversed(live) if (self.directory / r.file_name).exists()]

    def latest(self) -> CheckpointRecord | None:
        committed = self.committed()
        return committed[0] if committed else None

    def load(
        self,
        record: CheckpointRecord,
        into: memoryview,
        accept: CheckpointFilter | None = None,
    ) -> tuple[bytes, int]:
        """Reads `record`'s checkpoint, data straight into `into`; returns (manifest, length).

        Every byte is verified: header checksum, the header against `record`, the manifest and
        data xxh3. Raises `CheckpointCorrupt` naming the file and expected vs found (an
        unreadable or missing file included), `BufferTooSmall` when `into` cannot hold the
        data. On an error `into` holds partial data: use it only after a successful return.
        """
        path = self.directory / record.file_name
        target = _byte_view(into)
        try:
            with io.FileIO(path, "r") as f:
                fadvise = getattr(os, "posix_fadvise", None)
                if fadvise is not None:
                    fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                size = os.fstat(f.fileno()).st_size
                raw = _read_exactly(f, HEADER_BYTES, path, "header")
                manifest_length, data_length, manifest_sum, data_sum = _check_header(
                    raw, record, path, size
                )
                if data_length > len(target):
                    raise BufferTooSmall(path, data_length, len(target))
                manifest = _read_exactly(f, manifest_length, path, "manifest")
                if (found := xxh3(manifest)) != manifest_sum:
                    raise CheckpointCorrupt(
                        path, "manifest xxh3", f"{manifest_sum:#018x}", f"{found:#018x}"
                    )
                if accept is not None and (why := accept(record, manifest)) is not None:
                    raise CheckpointSkipped(path, why)
                found = _read_hashed(f, target[:data_length], path)
        except OSError as err:
            raise CheckpointCorrupt(path, "readable file", "readable", f"{err}") from err
        if found != data_sum:
            raise CheckpointCorrupt(path, "data xxh3", f"{data_sum:#018x}", f"{found:#018x}")
        return manifest, data_length

    def load_latest(
        self,
        into: memoryview,
        *,
        accept: CheckpointFilter | None = None,
        max_step: int | None = None,
    ) -> tuple[CheckpointRecord, bytes, int]:
        """The newest committed checkpoint at or below `max_step` that verifies and that
        `accept` takes, loaded into `into`.

        Corrupt or refused ones are skipped (logged, and kept in `last_rejections` with why)
        and the next older is tried. Raises `NoCheckpoint` (with the rejections) when none
        qualifies, `BufferTooSmall` when `into` is too small for one.
        """
        rejected: list[tuple[CheckpointRecord, CheckpointCorrupt | str]] = []
        self.last_rejections = rejected
        for record in self.committed():
            if max_step is not None and record.global_step > max_step:
                continue
            try:
                manifest, length = self.load(record, into, accept)
            except CheckpointSkipped as err:
                logger.warning("%s; trying the next older checkpoint", err)
                rejected.append((record, err.reason))
                continue
            except CheckpointCorrupt as err:
                logger.error("%s; trying the next older checkpoint", err)
                rejected.append((record, err))
                continue
            return record, manifest, length
        raise NoCheckpoint(self.directory, rejected)

    def drop_page_cache(self) -> None:
        """Evicts every committed checkpoint and the WAL from the page cache (benchmarks)."""
        for record in self.committed():
            with contextlib.suppress(FileNotFoundError):
                drop_page_cache(self.directory / record.file_name)
        drop_page_cache(self.wal.path)


def _read_exactly(f: io.FileIO, n: int, path: Path, what: str) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        read = f.readinto(view[got:])
        if not read:
            raise CheckpointCorrupt(path, f"{what} length", n, got)
        got += read
    return bytes(buf)


def _read_hashed(f: io.FileIO, target: memoryview, path: Path) -> int:
    hasher = xxhash.xxh3_64()
    for start in range(0, len(target), CHUNK_BYTES):
        chunk = target[start : start + CHUNK_BYTES]
        got = 0
        while got < len(chunk):
            read = f.readinto(chunk[got:])
            if not read:
                raise CheckpointCorrupt(path, "data length", len(target), start + got)
            got += read
        hasher.update(chunk)
    return int(hasher.intdigest())


def _check_header(
    raw: bytes, record: CheckpointRecord, path: Path, size: int
) -> tuple[int, int, int, int]:
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
        _step,
        _generation,
        stored,
    ) = _HEADER.unpack_from(raw, 0)
    if magic != MAGIC:
        raise CheckpointCorrupt(path, "magic", MAGIC, bytes(magic))
    zeroed = bytearray(raw)
    struct.pack_into("<Q", zeroed, _HEADER_SUM_AT, 0)
    if (computed := xxh3(zeroed)) != stored:
        raise CheckpointCorrupt(path, "header xxh3", f"{stored:#018x}", f"{computed:#018x}")
    if len(record.payload_checksum) != 8:
        raise CheckpointCorrupt(path, "WAL record checksum length", 8, len(record.payload_checksum))
    checks: tuple[tuple[str, object, object], ...] = (
        ("format version", FORMAT_VERSION, version),
        ("header bytes", HEADER_BYTES, header_bytes),
        ("file size", HEADER_BYTES + manifest_length + data_length, size),
        ("sequence (WAL record)", record.sequence, sequence),
        ("transaction id (WAL record)", record.transaction_id.hex(), bytes(txn).hex()),
        ("epoch (WAL record)", record.epoch, epoch),
        ("data length (WAL record)", record.payload_bytes, data_length),
        ("data xxh3 (WAL record)", digest_int(record.payload_checksum), data_sum),
    )
    for what, expected, found in checks:
        if expected != found:
            raise CheckpointCorrupt(path, what, expected, found)
    return manifest_length, data_length, manifest_sum, data_sum
