"""Durable checkpoints (R6.3): checkpoint files committed through the WAL, verified on load.

The sidecar's persist thread calls `DurableStore.write` with a snapshot's manifest and data
(off the training hot path: a write takes seconds), and the full rollback tier calls
`load_latest` to bring the last committed checkpoint back, every byte verified. A store never
unpickles, never uses `O_DSYNC` for bulk data, never serves a checkpoint that does not verify,
and never deletes a file unless the WAL proves it uncommitted or retired. Every file operation
goes through the `FileSystem` seam (`fs.OsFileSystem` in production), so the power-loss tests
can drop whatever was not yet durable. The file and record formats are Leyline's
(`leyline.durable`).

Write protocol, each step durable before the next::

    WAL BEGIN (CheckpointRecord: file name, epoch, step, transaction id)
    ckpt-<sequence:010d>.tmp   written from the caller's buffer in 16 MiB pieces, hashed as
                               it goes, header written last, fdatasync
    rename -> ckpt-<sequence:010d>-e<epoch>.bin, fsync the directory
    WAL COMMIT (the full CheckpointRecord)          <- the checkpoint exists from here on
    retention: WAL RETIRE for each checkpoint past `spec.keep`, then unlink, fsync directory
    compaction when the WAL is past `spec.wal_rotate_bytes`

Recovery at open (the rules, exactly, are in `leyline.durable`'s docstring; the decisions are
`leyline.durable.recovery`, executed here in this order, each step idempotent):

1. the WAL opens and locks `wal.log` and scans it, resynchronising past damage;
2. every checkpoint file is sorted by what the log proves; the ones it cannot decide (not in
   the log, or damage after their BEGIN) are verified alone, every byte;
3. proven-dead files are deleted (`.tmp`; ABORTed or RETIREd transactions; a BEGIN with no
   end, an intact log after it and no later file the log fails to name), then the directory
   is fsynced;
4. files that verified alone are adopted (`recovered_from_file=True`); the others are kept,
   listed in `recovery.damaged_files` (on every open) and never restored;
5. the log is repaired: a torn tail alone is cut; anything else (other damage, a missing or
   empty log beside checkpoint files, an adoption, a damaged in-doubt file, a missing
   committed file) links a damaged log aside as `wal.log.damaged-<n>` and installs a fresh
   compacted log of the live set, so the next open reads the same live set from an intact
   log;
6. `recovery` (a Leyline `WalRecovery`) says what happened; real damage is logged at ERROR, a
   torn tail at WARNING.

Deletion happens before the log is rewritten: a rewrite drops the ABORT and RETIRE records
that prove a file dead, and a crash between the two must not leave such a file undescribed
(it would be verified alone and adopted back).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import xxhash

from leyline.checksum import DATA_ALGORITHM, digest_bytes
from leyline.durable.checkpoint_file import (
    CHUNK_BYTES,
    HEADER_BYTES,
    RECORD_VERSION,
    CheckpointFile,
    CheckpointFileInvalid,
    check_against_record,
    check_data,
    check_manifest,
    decode_header,
    encode_header,
    file_name,
    hash_data,
    read_exactly,
    temp_name,
    verify_stream,
)
from leyline.durable.recovery import Fate, plan_recovery, settle
from leyline.spec.resilience import CheckpointSpec
from leyline.v1.resilience_pb2 import CheckpointFailure, CheckpointRecord, WalRecovery
from tolaria_sidecar.errors import (
    BufferTooSmall,
    CheckpointCorrupt,
    CheckpointSkipped,
    CheckpointWriteFailed,
    NoCheckpoint,
    WalUnavailable,
)
from tolaria_sidecar.faults import Faults
from tolaria_sidecar.fs import OS_FILESYSTEM
from tolaria_sidecar.protocols import FileSystem
from tolaria_sidecar.wal import WriteAheadLog

logger = logging.getLogger(__name__)

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

WRITE_POINTS: tuple[str, ...] = (
    "checkpoint.after_data_write",
    "checkpoint.after_header_write",
    "checkpoint.after_fdatasync",
    "checkpoint.after_rename",
    "checkpoint.after_dir_fsync",
    "checkpoint.after_retire_unlink",
)
RECOVERY_POINTS: tuple[str, ...] = ("checkpoint.recovery.after_remove",)
"""Write points reached only by recovery at open (with `wal.RECOVERY_POINTS`)."""


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


def _byte_view(buffer: memoryview) -> memoryview:
    if buffer.ndim == 1 and buffer.format in ("B", "b", "c"):
        return buffer
    return buffer.cast("B")


class _Reader:
    """A descriptor of the seam as a Leyline `Readable`."""

    def __init__(self, fs: FileSystem, fd: int) -> None:
        self._fs = fs
        self._fd = fd

    def readinto(self, buffer: memoryview, /) -> int:
        return self._fs.readinto(self._fd, buffer)


def _write_all(fs: FileSystem, fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[fs.write(fd, view) :]


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
        fs: FileSystem | None = None,
    ) -> None:
        """Opens the directory (created if absent), locks and scans its WAL, and recovers.

        Raises `CheckpointDirectoryLocked` when another store holds the directory, `OSError`
        when the directory or WAL cannot be opened or repaired, `WalVersionUnsupported` for a
        WAL of another version. WAL damage is not raised: it is repaired as the module
        docstring says and reported in `self.recovery`.
        """
        self.directory = directory
        self.spec = spec
        self.run_id = run_id
        self.instance_id = instance_id
        """Recorded in every checkpoint this store writes (R13.1)."""
        self.lineage_id = lineage_id or instance_id
        self.fs: FileSystem = fs or OS_FILESYSTEM
        self._faults = faults or Faults()
        self._lock = threading.Lock()
        self.last_rejections: list[tuple[CheckpointRecord, CheckpointCorrupt | str]] = []
        """Checkpoints the last `load_latest` refused, newest first, with why."""
        self.last_durable_ns = 0
        """Last `write`, from its call until the COMMIT record was durable (M6)."""
        self.last_write_ns = 0
        """Last `write`, the whole call: durable commit plus retention and compaction."""
        self.wal = WriteAheadLog(directory, spec, faults=self._faults, fs=self.fs)
        try:
            recovery = self._recover()
        except BaseException:
            self.wal.close()
            raise
        self.recovery: WalRecovery = recovery
        """What opening found and did (R13.5); `recovery_found` says whether it is news."""

    def close(self) -> None:
        self.wal.close()

    def __enter__(self) -> DurableStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- recovery ----------------------------------------------------------------------------

    @property
    def recovery_found(self) -> bool:
        """Whether opening found anything (damage, a torn tail, adopted, removed or damaged
        files): only then does the sidecar put `recovery` into its answers."""
        r = self.recovery
        return bool(
            r.reason or r.torn_tail or r.removed_files or r.adopted_files or r.damaged_files
        )

    def _recover(self) -> WalRecovery:
        """Recovery at open, in the order of the module docstring; each step idempotent, so a
        crash anywhere in it leaves a directory the next open recovers the same way."""
        plan = plan_recovery(
            self.wal.scan, self.fs.listdir(self.directory), wal_existed=self.wal.existed
        )
        verified = {f.name: self._verify_alone(f.name) for f in plan.to_verify()}
        outcome = settle(plan, verified)
        removed = outcome.named(Fate.REMOVED)
        for name in removed:
            with contextlib.suppress(FileNotFoundError):
                self.fs.unlink(self.directory / name)
            self._faults.hit("checkpoint.recovery.after_remove")
        if removed:
            self.fs.fsync_directory(self.directory)
        self.wal.skip_to(outcome.high_water)
        preserved = ""
        if outcome.rewrite:
            preserved = self.wal.rewrite(outcome.live, preserve=outcome.preserve)
        elif outcome.cut_torn_tail:
            self.wal.cut_torn_tail()
        report = outcome.message(self.wal.scan, preserved)
        report.at.FromNanoseconds(time.time_ns())
        self._log_recovery(report, is_damage=outcome.is_damage)
        return report

    def _verify_alone(self, name: str) -> CheckpointFile:
        path = self.directory / name
        try:
            fd = self.fs.open(path, os.O_RDONLY | _CLOEXEC)
        except OSError as err:
            return CheckpointFile(path, None, None, False, f"{path}: unreadable: {err}")
        try:
            return verify_stream(_Reader(self.fs, fd), self.fs.size(fd), path)
        except OSError as err:
            return CheckpointFile(path, None, None, False, f"{path}: unreadable: {err}")
        finally:
            self.fs.close(fd)

    def _log_recovery(self, report: WalRecovery, *, is_damage: bool) -> None:
        if not (report.reason or report.removed_files):
            return
        args = (
            self.directory,
            report.reason or "leftovers of an unfinished write",
            report.valid_bytes,
            report.damaged_bytes,
            list(report.adopted_files),
            list(report.damaged_files),
            list(report.removed_files),
            report.preserved_copy or "-",
        )
        text = (
            "%s: checkpoint recovery: %s; WAL %d B valid, %d B damaged; adopted %s; damaged "
            "(kept, never restored) %s; removed %s; damaged log kept as %s"
        )
        if is_damage:
            logger.error(text, *args)
        elif report.torn_tail:
            logger.warning(text, *args)
        else:
            logger.info(text, *args)

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
        fs = self.fs
        tmp = self.directory / temp_name(record.sequence)
        fd = fs.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC, 0o644)
        try:
            # The header goes last: until then the file has no magic and can never verify.
            _write_all(fs, fd, bytes(HEADER_BYTES))
            _write_all(fs, fd, manifest)
            hasher = xxhash.xxh3_64()
            for start in range(0, len(data), CHUNK_BYTES):
                chunk = data[start : start + CHUNK_BYTES]
                hasher.update(chunk)
                _write_all(fs, fd, chunk)
            self._faults.hit("checkpoint.after_data_write")
            digest = int(hasher.intdigest())
            header = encode_header(
                manifest=manifest,
                data_length=len(data),
                data_xxh3=digest,
                sequence=record.sequence,
                transaction_id=record.transaction_id,
                epoch=record.epoch,
                global_step=record.global_step,
                snapshot_generation=record.snapshot_generation,
            )
            if (written := fs.pwrite(fd, header, 0)) != len(header):
                raise OSError(errno.EIO, f"short header write: {written} of {len(header)} B")
            self._faults.hit("checkpoint.after_header_write")
            fs.fdatasync(fd)
            self._faults.hit("checkpoint.after_fdatasync")
        finally:
            fs.close(fd)
        fs.rename(tmp, self.directory / record.file_name)
        self._faults.hit("checkpoint.after_rename")
        fs.fsync_directory(self.directory)
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
                with contextlib.suppress(FileNotFoundError):
                    self.fs.unlink(self.directory / name)
            self.fs.fsync_directory(self.directory)
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
                with contextlib.suppress(FileNotFoundError):
                    self.fs.unlink(self.directory / record.file_name)
                self._faults.hit("checkpoint.after_retire_unlink")
            if excess:
                self.fs.fsync_directory(self.directory)
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
        return [r for r in reversed(live) if self.fs.exists(self.directory / r.file_name)]

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
            fd = self.fs.open(path, os.O_RDONLY | _CLOEXEC)
        except OSError as err:
            raise CheckpointCorrupt(path, "readable file", "readable", f"{err}") from err
        try:
            self.fs.advise_sequential(fd)
            reader = _Reader(self.fs, fd)
            raw = read_exactly(reader, HEADER_BYTES, path, "header")
            header = decode_header(raw, path=path, file_size=self.fs.size(fd))
            check_against_record(header, record, path)
            if header.data_length > len(target):
                raise BufferTooSmall(path, header.data_length, len(target))
            manifest = read_exactly(reader, header.manifest_length, path, "manifest")
            check_manifest(manifest, header, path)
            if accept is not None and (why := accept(record, manifest)) is not None:
                raise CheckpointSkipped(path, why)
            digest = hash_data(reader, header.data_length, path, target[: header.data_length])
            check_data(digest, header, path)
        except CheckpointFileInvalid as err:
            raise CheckpointCorrupt(path, err.what, err.expected, err.found) from err
        except OSError as err:
            raise CheckpointCorrupt(path, "readable file", "readable", f"{err}") from err
        finally:
            self.fs.close(fd)
        return manifest, header.data_length

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
