"""The sidecar's seams, as `typing.Protocol`s, so tests pass fakes without inheritance.

`Clock` drives every budget of the emergency machine; `DurableStore` is the checkpoint
store (`checkpoints.DurableStore` in production) as the slot jobs use it; `EventSink` is
where components report what happened (`events.EventLog` in production); `FileSystem` is every
file operation of the WAL and the checkpoint store (`fs.OsFileSystem` in production), so a test
can cut the power between any two of them. `ServicedSidecar` is what the gRPC servicers need
of one run's sidecar (`sidecar.Sidecar` in production), with the narrow views of its parts
they call (`SlotDesk`, `EmergencyDesk`, `EventFeed`, `VerifyQueue`, `PersistQueue`): the
servicers import these, never the concrete sidecar. Components receive their collaborators
in their constructors and never build their own.

This module names only Leyline types, the sidecar's config and plain values (`values`), so
every module may import it without an import cycle.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, Protocol

from google.protobuf.message import Message

from leyline import (
    CheckpointRecord,
    CheckpointRejection,
    EmergencyAck,
    EmergencyLevel,
    EmergencyResolution,
    EmergencySignal,
    RollbackReport,
    RollbackRequest,
    RunPhase,
    WalRecovery,
)
from leyline.v1 import sidecar_pb2 as pb
from tolaria_sidecar.config import SidecarConfig
from tolaria_sidecar.values import Feasibility, LoadedCheckpoint, PersistOutcome, SlotEntry

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


# -- what the servicers need ------------------------------------------------------------------


class SlotDesk(Protocol):
    """The run's slots as the servicers use them (`slots.SlotManager` in production)."""

    def attach(self, *, state_bytes: int, manifest_bytes: int) -> Feasibility:
        """Creates or re-uses the slots for `state_bytes`; pre-faults new ones (Attach only)."""
        ...

    def infos(self) -> list[pb.SlotInfo]:
        """Every slot, by index."""
        ...

    def resume_slot(self, layout_fingerprint: str) -> pb.SlotInfo | None:
        """The newest committed, non-rejected slot whose manifest has `layout_fingerprint`."""
        ...

    def commit(self, index: int, generation: int) -> pb.SlotInfo:
        """Accepts a commit after one header read; must not hash or touch disk (the trainer
        waits). Raises `PreconditionFailed` naming `generation` when the header disagrees."""
        ...

    def committed_generation(self, index: int) -> int:
        """The generation slot `index` holds committed now (0: none)."""
        ...

    def newest_persistable(self) -> SlotEntry | None:
        """The newest committed slot that is not rejected."""
        ...

    def load_checkpoint(
        self, *, deadline_ns: int, max_step: int | None = None, layout_fingerprint: str = ""
    ) -> LoadedCheckpoint:
        """Loads the newest usable checkpoint into a slot, each phase timed against
        `deadline_ns`; never unpickles, never publishes bytes that do not verify."""
        ...

    @property
    def last_rejections(self) -> Sequence[CheckpointRejection]:
        """Checkpoints the last `load_checkpoint` refused, with why."""
        ...


class EmergencyDesk(Protocol):
    """The emergency machine as the servicers use it (`emergency.EmergencyMachine`)."""

    def active(self) -> EmergencySignal | None:
        """The unresolved incident's current signal (a copy), or None."""
        ...

    def raise_signal(self, signal: EmergencySignal) -> tuple[int, EmergencyLevel.ValueType]:
        """Raises `signal`; returns (generation, effective level). Never waits for an ack."""
        ...

    def resolve(
        self, generation: int, by: str, reason: str, *, incident_id: str = ""
    ) -> EmergencyResolution:
        """Resolves the active incident if `generation` is its current one."""
        ...

    def wait_for_ack(
        self, generation: int, participant: int, timeout_s: float
    ) -> EmergencyAck | None:
        """The ack of `participant` for `generation`, waiting no longer than `timeout_s`."""
        ...

    def start_rollback_deadline(self, rollback_id: str) -> int:
        """Arms the full-rollback deadline; returns it (monotonic ns)."""
        ...


class EventStream(Protocol):
    """One reader's position in the event log; not shared between threads."""

    def next_batch(self, timeout_s: float) -> list[pb.SidecarEvent]:
        """The next events in order, waiting no longer than `timeout_s`; empty on timeout."""
        ...

    @property
    def closed(self) -> bool:
        """The log is closed for good (shutdown): stop reading."""
        ...


class EventFeed(Protocol):
    """Where event streams start (`events.EventLog` in production)."""

    def subscribe(self, after_sequence: int) -> EventStream:
        """A reader that starts after `after_sequence` (0: everything still buffered)."""
        ...


class VerifyQueue(Protocol):
    """Background verification of committed slots (`workers.Verifier` in production)."""

    def submit(self, index: int, generation: int) -> None:
        """Queues one slot generation for hashing; returns at once."""
        ...


class PersistQueue(Protocol):
    """Background durable writes (`workers.Persister` in production)."""

    def schedule(self, index: int, generation: int) -> tuple[bool, str]:
        """Queues one slot generation for a durable write; returns (scheduled, why not) at
        once, never waiting for the write."""
        ...

    def wait(self, generation: int, timeout_s: float) -> PersistOutcome | None:
        """The outcome of `generation`'s write, waiting no longer than `timeout_s`; None on
        timeout (the write goes on)."""
        ...


class ServicedSidecar(Protocol):
    """One run's sidecar as the gRPC servicers use it (`sidecar.Sidecar` in production).

    Servicer threads call these concurrently. None of them waits on the trainer or the disk,
    except through the parts' own bounded waits (`PersistQueue.wait`,
    `EmergencyDesk.wait_for_ack`, `SlotDesk.load_checkpoint`), each given its deadline.
    """

    @property
    def config(self) -> SidecarConfig: ...

    @property
    def clock(self) -> Clock: ...

    @property
    def slots(self) -> SlotDesk: ...

    @property
    def machine(self) -> EmergencyDesk: ...

    @property
    def store(self) -> DurableStore: ...

    @property
    def events(self) -> EventFeed: ...

    @property
    def verifier(self) -> VerifyQueue: ...

    @property
    def persister(self) -> PersistQueue: ...

    @property
    def wal_recovery(self) -> WalRecovery | None:
        """What opening the checkpoint directory found (R13.5), when it found anything."""
        ...

    @property
    def stop_requested(self) -> bool:
        """The trainer is asked to stop (checkpoint-then-stop)."""
        ...

    @property
    def stop_reason(self) -> str: ...

    def trainer_attached(self, *, pid: int, attempt: int) -> None:
        """The trainer attached: it is required for CRITICAL and its heartbeat is watched."""
        ...

    def trainer_detached(self, phase: RunPhase.ValueType, reason: str) -> None: ...

    def heartbeat(self, request: pb.HeartbeatRequest) -> None:
        """Records the trainer's progress; publishes a progress event at most once per
        interval."""
        ...

    def rollback_started(self, request: RollbackRequest) -> None: ...

    def rollback_finished(self, report: RollbackReport) -> None:
        """Clears the full-rollback deadline and counts the rollback by tier and outcome."""
        ...

    def checkpoint_done(self, stop_after: bool, reason: str) -> None:
        """A requested checkpoint is durable; with `stop_after` the trainer is asked to stop."""
        ...

    def checkpoints_rejected(self, rejections: Sequence[CheckpointRejection]) -> None: ...

    def checkpoint_of(self, generation: int) -> CheckpointRecord | None:
        """The committed checkpoint of snapshot `generation`, if one is kept."""
        ...

    def status(self) -> pb.SidecarStatus:
        """Everything the sidecar knows, for `GetStatus` (reads only)."""
        ...
