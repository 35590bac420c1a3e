"""The shared-memory layout shared by the trainer and the sidecar (layout version 2).

Two kinds of segment live in `/dev/shm` (a memory-backed emptyDir in a pod),
named from the run *instance* (R13.1): one control block,
`tolaria-<instance>-ctl`, and N snapshot slots, `tolaria-<instance>-slot-<i>`.
An instance is one local `tolaria run` or one pod attempt, so runs with the
same name, or names that are prefixes of each other, never meet; nothing is
ever found by a name prefix. The sidecar creates and owns the segments, so
they outlive a trainer crash; the trainer maps them.

Segments are created with `O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0600, and mapped
again only when they are regular files owned by this user, not readable or
writable by anyone else, and their header names this instance
(`ForeignSegment` otherwise): another local user cannot plant or swap a
segment, and one instance never maps another's.

All integers are little-endian; every multi-field record that another process
reads while it may change is written under a seqlock (sequence odd while
writing) AND carries an xxh3 checksum, so a torn read is detected on any
memory model. Single 8-byte words (acks, heartbeats, slot states) are written
with one aligned store by their single owner.

Control block (4096 bytes)::

    0     magic "TOLCTL02" | u32 layout version | u32 size | u32 participants
          | u32 slot count | u64 created ns | 48 B instance id (ASCII, NUL padded)
          | u64 xxh3 of bytes 0..80
    128   emergency record (writer: sidecar): u64 seq | u64 generation | u32 level
          | u32 action | u32 kind | u32 state | u64 raised ns | u64 step | u32 source
          | u32 reason length | 120 B reason | u64 xxh3 of 136..304
    512   8 participant lines x 64 B (writer: that participant): u64 ack generation
          | u64 acked ns | u32 acked level | u32 flags | u64 heartbeat ns
          | u64 heartbeat step | u32 pid | u32 attempt | u64 heartbeat epoch
    1024  32 slot-state lines x 32 B (writer: sidecar): u64 verified generation
          | u64 rejected generation | u64 pinned generation | u64 durable generation
    2048  rollback record (writer: trainer): u64 seq | u64 rollback id | u32 tier
          | u32 phase | u64 started ns | u64 deadline ns | u64 from step | u64 to step
          | u64 xxh3 of 2056..2104

Slot (header 4096 bytes, then the manifest region, then the data region)::

    0     magic "TOLSLOT2" | u32 layout version | u32 index | u64 data capacity
          | u64 manifest capacity | u64 manifest offset | u64 data offset
          | 48 B instance id | u64 xxh3 of 0..96
    128   dynamic header (writer: trainer, or the sidecar loading a checkpoint):
          u64 seq | u64 generation | u32 committed | u32 checksum algorithm
          | u64 manifest length | u64 data length | u64 step | u32 epoch | u32 flags
          | u64 manifest xxh3 | u64 data xxh3 | u64 committed ns | u64 xxh3 of 136..208

A slot is visible only when committed with a non-zero generation and its
manifest and data checksums are written. A reader refuses an unknown magic or
layout version (`LayoutMismatch`) and a header it cannot read consistently
(`TornHeader`); both name the segment and what was found. Times are
`time.monotonic_ns()` (CLOCK_MONOTONIC: one clock for every process on a host).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import re
import secrets
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from leyline.checksum import xxh3

LAYOUT_VERSION = 2
CONTROL_MAGIC = b"TOLCTL02"
SLOT_MAGIC = b"TOLSLOT2"
PAGE = 4096
CONTROL_SIZE = 4096
SLOT_HEADER_SIZE = 4096
MAX_PARTICIPANTS = 8
MAX_SLOTS = 32
REASON_BYTES = 120
INSTANCE_BYTES = 48
INSTANCE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9-]{7,47}$"
"""An instance id: a pod UID (36 characters) or a local random id; safe in a file name."""
_INSTANCE_RE = re.compile(INSTANCE_PATTERN)
SEQLOCK_RETRIES = 1000
SEQLOCK_SPINS = 100
SEQLOCK_TIMEOUT_S = 0.05

SLOT_FLAG_EPOCH_BOUNDARY = 1
SLOT_FLAG_FROM_CHECKPOINT = 2
PARTICIPANT_FLAG_FROZEN = 1
PARTICIPANT_FLAG_ATTACHED = 2

_STATIC = struct.Struct(f"<8sIIIIQ{INSTANCE_BYTES}s")  # magic .. created, instance
_EMERGENCY = struct.Struct(f"<QIIIIQQII{REASON_BYTES}s")  # after seq: generation..reason
_PARTICIPANT = struct.Struct("<QQIIQQIIQ")
_SLOT_STATE = struct.Struct("<QQQQ")
_ROLLBACK = struct.Struct("<QIIQQQQ")  # after seq: id, tier, phase, started, deadline, from, to
_SLOT_STATIC = struct.Struct(f"<8sIIQQQQ{INSTANCE_BYTES}s")
_SLOT_DYNAMIC = struct.Struct("<QIIQQQIIQQQ")  # after seq: generation..committed ns

_STATIC_SUM_AT = _STATIC.size  # 80
_SLOT_STATIC_SUM_AT = _SLOT_STATIC.size  # 96
_EMERGENCY_AT = 128
_PARTICIPANTS_AT = 512
_PARTICIPANT_STRIDE = 64
_SLOT_STATES_AT = 1024
_SLOT_STATE_STRIDE = 32
_ROLLBACK_AT = 2048
SLOT_DYNAMIC_AT = 128
"""Where the dynamic (seqlock) header of a slot starts."""
_SLOT_DYNAMIC_AT = SLOT_DYNAMIC_AT


class ShmError(RuntimeError):
    """Base of shared-memory layout errors."""


class LayoutMismatch(ShmError):
    """The segment is not ours or was written by another layout version: never read it."""


class TornHeader(ShmError):
    """A header could not be read consistently (checksum or seqlock): treat it as absent."""


class ForeignSegment(ShmError):
    """The segment belongs to another instance or user, or is not a plain 0600 file: never
    map it (R13.1)."""


class ShmFull(ShmError):
    """The shared-memory filesystem cannot hold a segment: says how much was needed and how
    much was free, so the fix (a larger /dev/shm, fewer or smaller slots) is obvious."""

    def __init__(self, path: Path, needed_bytes: int, available_bytes: int) -> None:
        self.path = path
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes
        super().__init__(
            f"{path.parent} is full: {path.name} needs {needed_bytes} bytes "
            f"({needed_bytes / 2**20:.1f} MiB), {available_bytes} bytes "
            f"({available_bytes / 2**20:.1f} MiB) are available; enlarge /dev/shm "
            "(docker --shm-size, the pod's shm sizeLimit) or lower spec.snapshots.slots "
            "or spec.snapshots.maxBytes"
        )


def new_instance_id() -> str:
    """A fresh local instance id: 64 random bits as 16 hex characters."""
    return secrets.token_hex(8)


def check_instance_id(value: str) -> str:
    """Returns `value` when it is a valid instance id; raises `ValueError` naming the rule."""
    if not _INSTANCE_RE.fullmatch(value):
        raise ValueError(
            f"instance id {value!r} must be 8-48 letters, digits or '-', starting with a "
            "letter or digit"
        )
    return value


def available_bytes(directory: Path) -> int:
    """Free bytes of the filesystem holding `directory` (for `ShmFull`)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return 0
    return int(st.f_bavail * st.f_frsize)


def shm_dir() -> Path:
    """Where segments live: `$TOLARIA_SHM_DIR` or /dev/shm."""
    return Path(os.environ.get("TOLARIA_SHM_DIR", "/dev/shm"))  # noqa: S108 - the shared tmpfs


def control_name(instance_id: str) -> str:
    return f"tolaria-{check_instance_id(instance_id)}-ctl"


def slot_name(instance_id: str, index: int) -> str:
    if not 0 <= index < MAX_SLOTS:
        raise ValueError(f"slot index must be 0..{MAX_SLOTS - 1}, got {index}")
    return f"tolaria-{check_instance_id(instance_id)}-slot-{index}"


def instance_segments(instance_id: str, directory: Path | None = None) -> list[Path]:
    """Every segment of one instance that exists now, by exact name (never by prefix)."""
    base = directory or shm_dir()
    names = [control_name(instance_id)] + [slot_name(instance_id, i) for i in range(MAX_SLOTS)]
    return [base / name for name in names if (base / name).exists()]


def unlink_own(path: Path) -> None:
    """Removes `path` if it is a regular file of this user; absent is fine. Raises
    `ForeignSegment` (and removes nothing) for a symlink, a directory or another user's file."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        raise ForeignSegment(f"{path} exists and is not a segment of this user: left alone")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def remove_instance_segments(instance_id: str, directory: Path | None = None) -> list[Path]:
    """Unlinks the instance's segments that are regular files owned by this user; returns
    what was removed. A planted symlink or another user's file is left alone."""
    removed = []
    for path in instance_segments(instance_id, directory):
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def monotonic_ns() -> int:
    return time.monotonic_ns()


class Segment:
    """One mapped file in the shared-memory directory."""

    def __init__(self, path: Path, mm: mmap.mmap) -> None:
        self.path = path
        self.mm = mm
        self.buf = memoryview(mm)

    @classmethod
    def create(cls, path: Path, size: int, *, prefault: bool) -> Segment:
        """Creates a new segment of `size` bytes (mode 0600), pages allocated up front if asked.

        Never opens an existing file or follows a symlink (`FileExistsError`; the caller
        removes its own stale segment first). A full filesystem raises `ShmFull` and leaves
        nothing behind.
        """
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, size)
            if prefault:
                os.posix_fallocate(fd, 0, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as err:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            if err.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                raise ShmFull(path, size, available_bytes(path.parent)) from err
            raise
        os.close(fd)
        seg = cls(path, mm)
        if prefault:
            seg.prefault()
        return seg

    @classmethod
    def attach(cls, path: Path) -> Segment:
        """Maps an existing segment read-write; raises `FileNotFoundError` if absent and
        `ForeignSegment` unless it is a regular file of this user with mode 0600."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise ForeignSegment(f"{path}: a symbolic link, never followed") from err
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ForeignSegment(f"{path}: not a regular file")
            if st.st_uid != os.geteuid():
                raise ForeignSegment(f"{path}: owned by uid {st.st_uid}, not {os.geteuid()}")
            if stat.S_IMODE(st.st_mode) & 0o077:
                raise ForeignSegment(
                    f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets others in (must be 0600)"
                )
            if st.st_size == 0:
                raise LayoutMismatch(f"{path}: empty segment")
            mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return cls(path, mm)

    def prefault(self) -> None:
        """Touches every page now, so no page fault lands in a snapshot or a rollback.

        MADV_POPULATE_WRITE (Linux 5.14+) when available, else one write per page.
        """
        populate_write = getattr(mmap, "MADV_POPULATE_WRITE", 23)
        try:
            self.mm.madvise(populate_write)
            return
        except (OSError, ValueError, AttributeError):
            pass
        for offset in range(0, len(self.mm), PAGE):
            self.buf[offset] = self.buf[offset]

    def u64(self, offset: int) -> ctypes.c_uint64:
        """An aligned 8-byte word: one store, one load (single-writer words)."""
        return ctypes.c_uint64.from_buffer(self.mm, offset)

    def close(self) -> None:
        self.buf.release()
        # Views (e.g. torch tensors over the slot) may still exist: the mapping
        # then stays until they are garbage collected, which is harmless.
        with contextlib.suppress(BufferError):
            self.mm.close()

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


_T = TypeVar("_T")


class _Seqlock:
    """Seqlock over `[at, at+8)` (sequence) protecting a record that follows it."""

    def __init__(self, seg: Segment, at: int) -> None:
        self._seg = seg
        self._word = seg.u64(at)

    def write(self, fill: Callable[[], None]) -> None:
        seq = self._word.value
        if seq & 1:
            seq += 1  # a writer died mid-write: restore the parity before writing again
        self._word.value = seq + 1  # odd: writing
        try:
            fill()
        finally:
            self._word.value = seq + 2  # even: stable

    def read(self, fetch: Callable[[], _T]) -> _T:
        """A consistent read, yielding to a descheduled writer; `TornHeader` after a while.

        Bounded by time, not by spins: on a busy 2-core host the writer may be
        off-CPU for milliseconds. A sequence that stays odd means the writer
        died mid-write; the record is then torn and reported as such.
        """
        deadline = time.monotonic() + SEQLOCK_TIMEOUT_S
        spins = 0
        while True:
            before = self._word.value
            if not before & 1:
                value = fetch()
                if self._word.value == before:
                    return value
            spins += 1
            if spins > SEQLOCK_SPINS:
                if time.monotonic() > deadline:
                    waited_ms = SEQLOCK_TIMEOUT_S * 1e3
                    raise TornHeader(f"{self._seg.path}: still changing after {waited_ms:.0f} ms")
                time.sleep(0)  # let the writer run


def _check_static(seg: Segment, magic: bytes, fields: tuple[Any, ...]) -> None:
    found = fields[0]
    if found != magic:
        raise LayoutMismatch(f"{seg.path}: magic {found!r} != {magic!r}: not a Tolaria segment")
    if fields[1] != LAYOUT_VERSION:
        raise LayoutMismatch(
            f"{seg.path}: layout version {fields[1]} != {LAYOUT_VERSION} (this build reads only "
            f"version {LAYOUT_VERSION})"
        )


def _encode_instance(instance_id: str) -> bytes:
    return check_instance_id(instance_id).encode("ascii")


def _decode_instance(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("ascii", errors="replace")


def _check_instance(seg: Segment, found: str, expected: str | None) -> None:
    if expected is not None and found != expected:
        raise ForeignSegment(f"{seg.path}: belongs to instance {found!r}, not {expected!r}")


# -- control block -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EmergencyRecord:
    generation: int = 0
    level: int = 0
    action: int = 0
    kind: int = 0
    state: int = 0
    raised_ns: int = 0
    global_step: int = 0
    source: int = 0
    reason: str = ""


@dataclass(frozen=True)
class ParticipantRecord:
    ack_generation: int
    acked_ns: int
    acked_level: int
    flags: int
    heartbeat_ns: int
    heartbeat_step: int
    pid: int
    attempt: int
    heartbeat_epoch: int

    @property
    def frozen(self) -> bool:
        return bool(self.flags & PARTICIPANT_FLAG_FROZEN)


@dataclass(frozen=True)
class SlotState:
    verified_generation: int
    rejected_generation: int
    pinned_generation: int
    durable_generation: int


@dataclass(frozen=True)
class RollbackRecord:
    rollback_id: int = 0
    tier: int = 0
    phase: int = 0
    started_ns: int = 0
    deadline_ns: int = 0
    from_step: int = 0
    to_step: int = 0


class ControlBlock:
    """The run's control block; see the module docstring for the layout."""

    def __init__(self, seg: Segment, *, instance_id: str | None) -> None:
        self.seg = seg
        if len(seg.buf) < CONTROL_SIZE:
            raise LayoutMismatch(f"{seg.path}: {len(seg.buf)} bytes < {CONTROL_SIZE}")
        fields = _STATIC.unpack_from(seg.buf, 0)
        stored = struct.unpack_from("<Q", seg.buf, _STATIC_SUM_AT)[0]
        _check_static(seg, CONTROL_MAGIC, fields)
        if xxh3(seg.buf[0:_STATIC_SUM_AT]) != stored:
            raise TornHeader(f"{seg.path}: control block header checksum mismatch")
        self.instance_id = _decode_instance(fields[6])
        _check_instance(seg, self.instance_id, instance_id)
        if not 0 < int(fields[4]) <= MAX_SLOTS:
            raise LayoutMismatch(f"{seg.path}: slot count {fields[4]} outside 1..{MAX_SLOTS}")
        self.slot_count = int(fields[4])
        self._emergency = _Seqlock(seg, _EMERGENCY_AT)
        self._rollback = _Seqlock(seg, _ROLLBACK_AT)

    @classmethod
    def create(cls, path: Path, slot_count: int, *, instance_id: str) -> ControlBlock:
        if not 0 < slot_count <= MAX_SLOTS:
            raise ValueError(f"slot count must be 1..{MAX_SLOTS}, got {slot_count}")
        instance = _encode_instance(instance_id)
        seg = Segment.create(path, CONTROL_SIZE, prefault=True)
        seg.buf[:CONTROL_SIZE] = bytes(CONTROL_SIZE)
        _STATIC.pack_into(
            seg.buf,
            0,
            CONTROL_MAGIC,
            LAYOUT_VERSION,
            CONTROL_SIZE,
            MAX_PARTICIPANTS,
            slot_count,
            monotonic_ns(),
            instance,
        )
        struct.pack_into("<Q", seg.buf, _STATIC_SUM_AT, xxh3(seg.buf[0:_STATIC_SUM_AT]))
        return cls(seg, instance_id=instance_id)

    @classmethod
    def attach(cls, path: Path, *, instance_id: str | None) -> ControlBlock:
        """Maps an existing control block; `instance_id` None accepts any instance (tools)."""
        seg = Segment.attach(path)
        try:
            return cls(seg, instance_id=instance_id)
        except ShmError:
            seg.close()
            raise

    # emergency record (single writer: the sidecar)
    def write_emergency(self, record: EmergencyRecord) -> None:
        reason = record.reason.encode("utf-8")[:REASON_BYTES]

        def fill() -> None:
            _EMERGENCY.pack_into(
                self.seg.buf,
                _EMERGENCY_AT + 8,
                record.generation,
                record.level,
                record.action,
                record.kind,
                record.state,
                record.raised_ns,
                record.global_step,
                record.source,
                len(reason),
                reason,
            )
            body = self.seg.buf[_EMERGENCY_AT + 8 : _EMERGENCY_AT + 8 + _EMERGENCY.size]
            struct.pack_into("<Q", self.seg.buf, _EMERGENCY_AT + 8 + _EMERGENCY.size, xxh3(body))

        self._emergency.write(fill)

    def read_emergency(self) -> EmergencyRecord:
        def fetch() -> tuple[tuple[Any, ...], int, int]:
            fields = _EMERGENCY.unpack_from(self.seg.buf, _EMERGENCY_AT + 8)
            body = self.seg.buf[_EMERGENCY_AT + 8 : _EMERGENCY_AT + 8 + _EMERGENCY.size]
            stored = struct.unpack_from("<Q", self.seg.buf, _EMERGENCY_AT + 8 + _EMERGENCY.size)[0]
            return fields, xxh3(body), stored

        for _ in range(SEQLOCK_RETRIES):
            fields, computed, stored = self._emergency.read(fetch)
            if fields[0] == 0 and stored == 0:
                return EmergencyRecord()
            if computed == stored:
                gen, level, action, kind, state, raised, step, source, n, reason = fields
                return EmergencyRecord(
                    gen,
                    level,
                    action,
                    kind,
                    state,
                    raised,
                    step,
                    source,
                    bytes(reason[:n]).decode("utf-8", errors="replace"),
                )
        raise TornHeader(f"{self.seg.path}: emergency record checksum never matched")

    def emergency_generation(self) -> int:
        """The generation word alone: a cheap poll for "something changed"."""
        return int(self.seg.u64(_EMERGENCY_AT + 8).value)

    # participants (each writes only its own line)
    def _participant_at(self, participant: int) -> int:
        if not 0 < participant < MAX_PARTICIPANTS:
            raise ValueError(f"participant must be 1..{MAX_PARTICIPANTS - 1}, got {participant}")
        return _PARTICIPANTS_AT + participant * _PARTICIPANT_STRIDE

    def ack(self, participant: int, generation: int, level: int, *, frozen: bool) -> int:
        """Acknowledges `generation`; returns the ack time (monotonic ns)."""
        at = self._participant_at(participant)
        now = monotonic_ns()
        flags = self.seg.u64(at + 16)
        attached = flags.value & (PARTICIPANT_FLAG_ATTACHED << 32)
        frozen_bits = (PARTICIPANT_FLAG_FROZEN << 32) if frozen else 0
        flags.value = (level & 0xFFFFFFFF) | attached | frozen_bits
        self.seg.u64(at + 8).value = now
        self.seg.u64(at).value = generation  # last: the generation word publishes the ack
        return now

    def heartbeat(self, participant: int, step: int, epoch: int) -> None:
        at = self._participant_at(participant)
        self.seg.u64(at + 32).value = step
        self.seg.u64(at + 48).value = epoch
        self.seg.u64(at + 24).value = monotonic_ns()

    def register(self, participant: int, pid: int, attempt: int) -> None:
        at = self._participant_at(participant)
        self.seg.u64(at + 40).value = (attempt << 32) | pid
        flags = self.seg.u64(at + 16)
        flags.value = flags.value | (PARTICIPANT_FLAG_ATTACHED << 32)

    def participant(self, participant: int) -> ParticipantRecord:
        return ParticipantRecord(
            *_PARTICIPANT.unpack_from(self.seg.buf, self._participant_at(participant))
        )

    # slot states (single writer: the sidecar)
    def _slot_at(self, index: int) -> int:
        if not 0 <= index < self.slot_count:
            raise ValueError(f"slot index must be 0..{self.slot_count - 1}, got {index}")
        return _SLOT_STATES_AT + index * _SLOT_STATE_STRIDE

    def slot_state(self, index: int) -> SlotState:
        return SlotState(*_SLOT_STATE.unpack_from(self.seg.buf, self._slot_at(index)))

    def set_verified(self, index: int, generation: int) -> None:
        self.seg.u64(self._slot_at(index)).value = generation

    def set_rejected(self, index: int, generation: int) -> None:
        self.seg.u64(self._slot_at(index) + 8).value = generation

    def set_pinned(self, index: int, generation: int) -> None:
        self.seg.u64(self._slot_at(index) + 16).value = generation

    def set_durable(self, index: int, generation: int) -> None:
        self.seg.u64(self._slot_at(index) + 24).value = generation

    # rollback record (single writer: the trainer)
    def write_rollback(self, record: RollbackRecord) -> None:
        def fill() -> None:
            _ROLLBACK.pack_into(
                self.seg.buf,
                _ROLLBACK_AT + 8,
                record.rollback_id,
                record.tier,
                record.phase,
                record.started_ns,
                record.deadline_ns,
                record.from_step,
                record.to_step,
            )
            body = self.seg.buf[_ROLLBACK_AT + 8 : _ROLLBACK_AT + 8 + _ROLLBACK.size]
            struct.pack_into("<Q", self.seg.buf, _ROLLBACK_AT + 8 + _ROLLBACK.size, xxh3(body))

        self._rollback.write(fill)

    def read_rollback(self) -> RollbackRecord:
        def fetch() -> tuple[tuple[Any, ...], int, int]:
            body = self.seg.buf[_ROLLBACK_AT + 8 : _ROLLBACK_AT + 8 + _ROLLBACK.size]
            stored = struct.unpack_from("<Q", self.seg.buf, _ROLLBACK_AT + 8 + _ROLLBACK.size)[0]
            return _ROLLBACK.unpack_from(body, 0), xxh3(body), stored

        for _ in range(SEQLOCK_RETRIES):
            fields, computed, stored = self._rollback.read(fetch)
            if stored == 0 and not any(fields):
                return RollbackRecord()
            if computed == stored:
                return RollbackRecord(*fields)
        raise TornHeader(f"{self.seg.path}: rollback record checksum never matched")

    def close(self) -> None:
        self.seg.close()


# -- snapshot slots ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotHeader:
    """The dynamic header of a slot, as last published."""

    index: int
    generation: int
    committed: bool
    checksum_algorithm: int
    manifest_length: int
    data_length: int
    global_step: int
    epoch: int
    flags: int
    manifest_checksum: int
    data_checksum: int
    committed_ns: int

    @property
    def visible(self) -> bool:
        return self.committed and self.generation > 0


class Slot:
    """One snapshot slot: header, manifest region, data region."""

    def __init__(self, seg: Segment, *, instance_id: str | None) -> None:
        self.seg = seg
        if len(seg.buf) < SLOT_HEADER_SIZE:
            raise LayoutMismatch(f"{seg.path}: {len(seg.buf)} bytes < {SLOT_HEADER_SIZE}")
        fields = _SLOT_STATIC.unpack_from(seg.buf, 0)
        stored = struct.unpack_from("<Q", seg.buf, _SLOT_STATIC_SUM_AT)[0]
        _check_static(seg, SLOT_MAGIC, fields)
        if xxh3(seg.buf[0:_SLOT_STATIC_SUM_AT]) != stored:
            raise TornHeader(f"{seg.path}: slot static header checksum mismatch")
        self.instance_id = _decode_instance(fields[7])
        _check_instance(seg, self.instance_id, instance_id)
        self.index = int(fields[2])
        self.capacity = int(fields[3])
        self.manifest_capacity = int(fields[4])
        self.manifest_offset = int(fields[5])
        self.data_offset = int(fields[6])
        if (
            self.manifest_offset < SLOT_HEADER_SIZE
            or self.manifest_offset + self.manifest_capacity > self.data_offset
            or self.data_offset + self.capacity > len(seg.mm)
        ):
            raise LayoutMismatch(
                f"{seg.path}: regions (manifest {self.manifest_offset}+"
                f"{self.manifest_capacity}, data {self.data_offset}+{self.capacity}) do not fit "
                f"the {len(seg.mm)}-byte segment"
            )
        self._lock = _Seqlock(seg, _SLOT_DYNAMIC_AT)

    @staticmethod
    def size_for(capacity: int, manifest_capacity: int) -> int:
        manifest = -(-manifest_capacity // PAGE) * PAGE
        return SLOT_HEADER_SIZE + manifest + -(-capacity // PAGE) * PAGE

    @classmethod
    def create(
        cls,
        path: Path,
        index: int,
        capacity: int,
        manifest_capacity: int,
        *,
        prefault: bool,
        instance_id: str,
    ) -> Slot:
        instance = _encode_instance(instance_id)
        manifest = -(-manifest_capacity // PAGE) * PAGE
        seg = Segment.create(path, cls.size_for(capacity, manifest), prefault=prefault)
        seg.buf[:SLOT_HEADER_SIZE] = bytes(SLOT_HEADER_SIZE)
        _SLOT_STATIC.pack_into(
            seg.buf,
            0,
            SLOT_MAGIC,
            LAYOUT_VERSION,
            index,
            capacity,
            manifest,
            SLOT_HEADER_SIZE,
            SLOT_HEADER_SIZE + manifest,
            instance,
        )
        struct.pack_into("<Q", seg.buf, _SLOT_STATIC_SUM_AT, xxh3(seg.buf[0:_SLOT_STATIC_SUM_AT]))
        return cls(seg, instance_id=instance_id)

    @classmethod
    def attach(cls, path: Path, *, instance_id: str | None) -> Slot:
        """Maps an existing slot; `instance_id` None accepts any instance (tools)."""
        seg = Segment.attach(path)
        try:
            return cls(seg, instance_id=instance_id)
        except ShmError:
            seg.close()
            raise

    @property
    def data(self) -> memoryview:
        return self.seg.buf[self.data_offset : self.data_offset + self.capacity]

    @property
    def manifest_region(self) -> memoryview:
        return self.seg.buf[self.manifest_offset : self.manifest_offset + self.manifest_capacity]

    def invalidate(self) -> None:
        """Hides the slot before its bytes are overwritten (generation 0, not committed)."""

        def fill() -> None:
            _SLOT_DYNAMIC.pack_into(
                self.seg.buf, _SLOT_DYNAMIC_AT + 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
            )
            struct.pack_into("<Q", self.seg.buf, _SLOT_DYNAMIC_AT + 8 + _SLOT_DYNAMIC.size, 0)

        self._lock.write(fill)

    def publish(
        self,
        *,
        generation: int,
        manifest: bytes,
        data_length: int,
        data_checksum: int,
        checksum_algorithm: int,
        global_step: int,
        epoch: int,
        flags: int,
    ) -> None:
        """Writes the manifest, then commits the header: the slot becomes visible last."""
        if generation <= 0:
            raise ValueError("a published slot needs a generation > 0")
        if len(manifest) > self.manifest_capacity:
            raise ValueError(
                f"slot {self.index}: manifest of {len(manifest)} B exceeds "
                f"{self.manifest_capacity} B"
            )
        if data_length > self.capacity:
            raise ValueError(
                f"slot {self.index}: {data_length} B exceeds capacity {self.capacity} B"
            )
        self.manifest_region[: len(manifest)] = manifest
        manifest_checksum = xxh3(manifest)

        def fill() -> None:
            _SLOT_DYNAMIC.pack_into(
                self.seg.buf,
                _SLOT_DYNAMIC_AT + 8,
                generation,
                1,
                checksum_algorithm,
                len(manifest),
                data_length,
                global_step,
                epoch,
                flags,
                manifest_checksum,
                data_checksum,
                monotonic_ns(),
            )
            body = self.seg.buf[_SLOT_DYNAMIC_AT + 8 : _SLOT_DYNAMIC_AT + 8 + _SLOT_DYNAMIC.size]
            struct.pack_into(
                "<Q", self.seg.buf, _SLOT_DYNAMIC_AT + 8 + _SLOT_DYNAMIC.size, xxh3(body)
            )

        self._lock.write(fill)

    def header(self) -> SlotHeader:
        """The current header; raises `TornHeader` when it cannot be read consistently."""

        def fetch() -> tuple[tuple[Any, ...], int, int]:
            body = self.seg.buf[_SLOT_DYNAMIC_AT + 8 : _SLOT_DYNAMIC_AT + 8 + _SLOT_DYNAMIC.size]
            stored = struct.unpack_from(
                "<Q", self.seg.buf, _SLOT_DYNAMIC_AT + 8 + _SLOT_DYNAMIC.size
            )[0]
            return _SLOT_DYNAMIC.unpack_from(body, 0), xxh3(body), stored

        fields, computed, stored = self._lock.read(fetch)
        if stored == 0 and not any(fields):
            return SlotHeader(self.index, 0, False, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        if computed != stored:
            raise TornHeader(f"{self.seg.path}: slot header checksum {computed:#x} != {stored:#x}")
        (gen, committed, algo, mlen, dlen, step, epoch, flags, mck, dck, at) = fields
        if mlen > self.manifest_capacity or dlen > self.capacity:
            raise TornHeader(f"{self.seg.path}: header lengths exceed the slot's regions")
        return SlotHeader(
            self.index, gen, bool(committed), algo, mlen, dlen, step, epoch, flags, mck, dck, at
        )

    def manifest_bytes(self, header: SlotHeader) -> bytes:
        """The manifest of `header`, verified against its checksum."""
        data = bytes(self.manifest_region[: header.manifest_length])
        if xxh3(data) != header.manifest_checksum:
            raise TornHeader(
                f"{self.seg.path}: manifest checksum mismatch (generation {header.generation})"
            )
        return data

    def close(self) -> None:
        self.seg.close()
