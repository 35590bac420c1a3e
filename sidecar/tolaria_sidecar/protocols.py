"""The sidecar's seams, as `typing.Protocol`s, so tests pass fakes without inheritance.

`Clock` drives every budget of the emergency machine; `DurableStore` is the checkpoint
store (`checkpoints.DurableStore` in production) as the slot manager uses it; `EventSink` is
where components report what happened (`events.EventLog` in production); `FileSystem` is every
file operation of the WAL and the checkpoint store (`fs.OsFileSystem` in production), so a test
can cut the power between any two of them. Components receive these in their constructors and
never build their own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, Protocol

from google.protobuf.message import Message

from leyline import CheckpointRecord

EventKind = Literal[
    "progress",
    "snapshot",
    "checkpoint",
    "rollback_started",
    "rollback_finished",
    "emergency",
    "ack",
    "resolution",
    "snapshot_rejected",
    "checkpoint_failed",
]
"""The `SidecarEvent.event` oneof's field names."""


class Clock(Protocol):
    """Monotonic time in nanoseconds on CLOCK_MONOTONIC, the clock of the control block."""

    def now_ns(self) -> int:
        """Current monotonic time; never goes backwards."""
        ...


class MonotonicClock:
    """`time.monotonic_ns`: the same clock the trainer stamps acks and heartbeats with."""

    def now_ns(self) -> int:
        return time.monotonic_ns()


class EventSink(Protocol):
    """Receives the sidecar's events (`SidecarEvent` oneof members)."""

    def publish(self, kind: EventKind, message: Message) -> int:
        """Records one event and returns its sequence; never blocks on a subscriber."""
        ...


class DurableStore(Protocol):
    """Durable, WAL-protected checkpoints (R6.3), as the slot manager uses them.

    Calls are made from the persister thread (`write`) and from a `PrepareFullRollback`
    servicer thread (`load_latest`); neither is on the trainer's hot path. The store bounds
    its own I/O; the sidecar abandons a write that outlives shutdown.
    """

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
        """Writes, fsyncs and commits one checkpoint; returns its WAL record.

        Raises `CheckpointWriteFailed` after rolling back a failed write; the previous
        checkpoint then stays the latest. Must not keep a reference to `data` afterwards.
        """
        ...

    def latest(self) -> CheckpointRecord | None:
        """The newest committed checkpoint, or None."""
        ...

    def committed(self) -> Sequence[CheckpointRecord]:
        """Committed checkpoints still kept, newest first."""
        ...

    def load_latest(
        self,
        into: memoryview,
        *,
        accept: Callable[[CheckpointRecord, bytes], str | None] | None = None,
        max_step: int | None = None,
    ) -> tuple[CheckpointRecord, bytes, int]:
        """Reads and verifies the newest restorable checkpoint's data into `into`: at or below
        `max_step`, and one `accept` (given the record and the manifest bytes) does not refuse.

        Returns (record, manifest bytes, data length). Raises `NoCheckpoint` when none
        qualifies and `BufferTooSmall` when `into` cannot hold the data. The refused ones are
        in `last_rejections` afterwards.
        """
        ...

    @property
    def last_rejections(self) -> Sequence[tuple[CheckpointRecord, object]]:
        """What the last `load_latest` refused, newest first, with the error or reason."""
        ...


class FileSystem(Protocol):
    """The file operations of the WAL and the checkpoint store, one call each.

    Production is `fs.OsFileSystem` (plain `os` calls); tests pass a double that models what
    survives a power cut. Calls go to the kernel and are bounded by it (no deadline: a store
    whose disk hangs is abandoned by the sidecar, not interrupted). Each raises `OSError` as
    `os` does; none retries, logs or buffers, so what the caller sequenced is what happens.
    """

    def open(self, path: Path, flags: int, mode: int = 0o644) -> int:
        """`os.open`: a descriptor."""
        ...

    def close(self, fd: int) -> None: ...

    def write(self, fd: int, data: bytes | memoryview) -> int:
        """`os.write`: bytes written (maybe fewer than asked)."""
        ...

    def pwrite(self, fd: int, data: bytes, offset: int) -> int: ...

    def readinto(self, fd: int, buffer: memoryview) -> int:
        """Reads at the descriptor's offset into `buffer`; 0 at the end of the file."""
        ...

    def size(self, fd: int) -> int:
        """The open file's size in bytes."""
        ...

    def fsync(self, fd: int) -> None: ...

    def fdatasync(self, fd: int) -> None:
        """Data and the size needed to read it back are durable on return."""
        ...

    def ftruncate(self, fd: int, length: int) -> None: ...

    def try_lock(self, fd: int) -> bool:
        """An exclusive `flock`, not waiting: False when another open file holds it."""
        ...

    def is_path_of(self, fd: int, path: Path) -> bool:
        """Whether `path` still names the file `fd` has open (a rename may have replaced it)."""
        ...

    def rename(self, source: Path, target: Path) -> None:
        """`os.replace`: atomic, replacing `target`."""
        ...

    def link(self, source: Path, target: Path) -> None:
        """A hard link; `FileExistsError` when `target` exists (it is never replaced)."""
        ...

    def unlink(self, path: Path) -> None: ...

    def exists(self, path: Path) -> bool: ...

    def listdir(self, directory: Path) -> list[str]: ...

    def mkdir(self, path: Path) -> None:
        """Creates `path` and its missing parents."""
        ...

    def fsync_directory(self, directory: Path) -> None:
        """Makes every create, rename, link and unlink in `directory` so far durable."""
        ...

    def advise_sequential(self, fd: int) -> None:
        """Hints a whole-file sequential read (a no-op where the kernel has no such hint)."""
        ...
