"""The sidecar's typed errors, one base class, each named for what the caller does next.

Raised by the WAL (`wal.py`) and the durable checkpoint store (`checkpoints.py`); caught by the
sidecar's service and thread boundaries. Every error carries its context as attributes and in
its message (expected against found), with the cause chained. Never raise a bare `Exception`
from sidecar code, and never catch `InjectedCrash` outside a test.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from leyline.v1.resilience_pb2 import CheckpointFailure, CheckpointRecord


class SidecarError(Exception):
    """Base of every error the sidecar raises on purpose."""


class WalCorrupt(SidecarError):
    """A WAL record failed validation (R6.3). Opening a store reports damage in its
    `recovery` instead of raising; only the subclass below refuses an open."""

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        super().__init__(f"{path}: bad WAL record at byte {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


class WalVersionUnsupported(WalCorrupt):
    """A whole record (its CRC holds) written by another WAL version: refuse to open rather
    than cut a newer sidecar's log; run the matching sidecar version."""


class CheckpointDirectoryLocked(SidecarError):
    """Another store (another sidecar on the same checkpoint volume) holds this directory's
    WAL: two writers would interleave records; give each run its own directory."""

    def __init__(self, directory: Path, detail: str = "") -> None:
        super().__init__(
            f"{directory}: another process holds the checkpoint WAL's lock"
            + (f" ({detail})" if detail else "")
            + "; one writer per checkpoint directory"
        )
        self.directory = directory
        self.detail = detail


class WalUnavailable(SidecarError):
    """The WAL refuses appends (a failed append could not be cut back, or damage found at open
    is not repaired yet): reopen the store."""

    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(f"{path}: WAL refuses appends until reopened: {detail}")
        self.path = path
        self.detail = detail


class CheckpointCorrupt(SidecarError):
    """A checkpoint file does not verify: never restore it; try the next older one."""

    def __init__(self, path: Path, what: str, expected: object, found: object) -> None:
        super().__init__(f"{path}: {what}: expected {expected}, found {found}")
        self.path = path
        self.what = what
        self.expected = expected
        self.found = found


class CheckpointSkipped(SidecarError):
    """An intact checkpoint this load must not use (another instance, layout or step)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: skipped: {reason}")
        self.path = path
        self.reason = reason


class NoCheckpoint(SidecarError):
    """No committed checkpoint verifies: the full tier cannot restore; escalate (R6.5)."""

    def __init__(
        self,
        directory: Path,
        rejected: Sequence[tuple[CheckpointRecord, CheckpointCorrupt | str]] = (),
    ) -> None:
        detail = (
            "; ".join(f"{r.file_name}: {e if isinstance(e, str) else e.what}" for r, e in rejected)
            or "none committed"
        )
        super().__init__(f"{directory}: no restorable checkpoint ({detail})")
        self.directory = directory
        self.rejected = list(rejected)


class CheckpointWriteFailed(SidecarError):
    """A durable write failed and was rolled back; the previous checkpoint stays the latest.

    `failure` is the Leyline `CheckpointFailure` also recorded in the WAL's ABORT record.
    """

    def __init__(self, path: Path, failure: CheckpointFailure) -> None:
        super().__init__(
            f"{path}: checkpoint for epoch {failure.epoch} (step {failure.global_step}) not "
            f"written: {failure.error}"
        )
        self.path = path
        self.failure = failure


class BufferTooSmall(SidecarError):
    """The destination buffer cannot hold a checkpoint's data: allocate a larger one."""

    def __init__(self, path: Path, needed: int, capacity: int) -> None:
        super().__init__(f"{path}: data needs {needed} B, destination holds {capacity} B")
        self.path = path
        self.needed = needed
        self.capacity = capacity


class InjectedCrash(BaseException):
    """A crash injected by `Faults` at a named write point (tests only).

    A `BaseException`, like `KeyboardInterrupt`, so that no `except Exception` or
    `except SidecarError` boundary catches it and runs recovery a real crash would not run.
    """

    def __init__(self, point: str, nth: int) -> None:
        super().__init__(f"injected crash at {point} (hit {nth})")
        self.point = point
        self.nth = nth


# -- requests, slots and emergencies (boundary.py, the slot jobs, emergency.py, config.py) ----
# Each names the request or manifest field it is about, so servicers and the CLI can say which
# field broke which rule; servicers map the classes to gRPC status codes one to one.


class RequestInvalid(SidecarError):
    """A request field breaks a rule: refuse it (INVALID_ARGUMENT), naming the field."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class PreconditionFailed(SidecarError):
    """A well-formed request the sidecar's state refuses now (FAILED_PRECONDITION): call in the
    right order (Attach first) or retry with fresh state."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class NotFound(SidecarError):
    """The request names something that does not exist (NOT_FOUND): an unknown generation."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class AckTimeout(SidecarError):
    """No acknowledgement within the level's response budget (DEADLINE_EXCEEDED): escalation
    is already under way in the emergency machine; the caller reports the miss."""

    def __init__(self, generation: int, participant: str, budget_ms: float) -> None:
        super().__init__(
            f"generation {generation}: no acknowledgement from {participant} within "
            f"{budget_ms:g} ms"
        )
        self.generation = generation
        self.participant = participant
        self.budget_ms = budget_ms


class SlotBudgetTooSmall(PreconditionFailed):
    """`spec.snapshots.maxBytes` cannot hold one slot of the requested size: raise the budget
    or lower the state size."""

    def __init__(self, max_bytes: int, slot_bytes: int) -> None:
        super().__init__(
            "spec.snapshots.maxBytes",
            f"{max_bytes} B holds no slot of {slot_bytes} B (state + headroom + manifest)",
        )
        self.max_bytes = max_bytes
        self.slot_bytes = slot_bytes


class SharedMemoryFull(SidecarError):
    """The shared-memory filesystem cannot hold the slots (RESOURCE_EXHAUSTED): the message
    names the bytes needed and available; enlarge /dev/shm or lower the slot count or size."""

    def __init__(self, needed_bytes: int, available_bytes: int, detail: str) -> None:
        super().__init__(detail)
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes


class ForeignSegmentFound(PreconditionFailed):
    """A segment with this instance's exact name exists but is not ours (another user, a
    symlink, wrong mode or instance): refuse, never map or delete it (R13.1)."""

    def __init__(self, detail: str) -> None:
        super().__init__("instance_id", detail)


class PersistFailed(SidecarError):
    """A slot could not be made durable; the previous checkpoint stays the latest (emit
    `checkpoint_failed`, keep training)."""

    def __init__(self, index: int, generation: int, reason: str) -> None:
        super().__init__(f"persist of slot {index} generation {generation} failed: {reason}")
        self.index = index
        self.generation = generation
        self.reason = reason


class CheckpointLoadFailed(SidecarError):
    """The full tier could not put a checkpoint into a slot: the trainer escalates (R6.5)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"full rollback: {reason}")
        self.reason = reason


class ConfigInvalid(SidecarError):
    """A flag or manifest field the sidecar cannot start with: exit 2, naming it."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class TokenRequired(ConfigInvalid):
    """The TCP control server never starts unauthenticated (R10.5): give the run token."""

    def __init__(self) -> None:
        super().__init__(
            "--token-file",
            "the control server needs the run token: pass --token-file PATH or set "
            "TOLARIA_SIDECAR_TOKEN",
        )
