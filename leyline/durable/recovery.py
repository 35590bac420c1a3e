"""What a checkpoint directory's WAL and files prove, and what recovery may do about it.

Pure decisions, no I/O: `LogState` folds WAL records into per-transaction state (the sidecar's
`WriteAheadLog` keeps one, record by record); `plan_recovery` sorts every checkpoint file by
what the log proves about it; `settle` turns that plan plus the files verified alone into the
outcome (what is adopted, kept as damaged, removed, which log is written). The sidecar's
`DurableStore` executes the outcome at open; `inspect_directory` only reports it. The rules are
in the package docstring (`leyline.durable`); they are written once, here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from google.protobuf.message import DecodeError

from leyline.durable.checkpoint_file import (
    FILE_NAME,
    CheckpointFile,
    file_name,
    record_from_file,
)
from leyline.durable.wal_format import Op, RecordHeader, WalScan
from leyline.v1.resilience_pb2 import CheckpointFailure, CheckpointRecord, WalRecovery


class WalState(Enum):
    """What the WAL says about one checkpoint file."""

    COMMITTED = "committed"
    RETIRED = "retired"
    ABORTED = "aborted"
    IN_DOUBT = "in doubt"
    """A BEGIN with no COMMIT, ABORT or RETIRE after it."""
    NOT_IN_WAL = "not in the WAL"


class Action(Enum):
    """What recovery does with one checkpoint file."""

    KEEP = "keep"
    """Committed in the WAL: listed, verified against its record at every load."""
    REMOVE = "remove"
    """Proven never committed or already retired: deleted."""
    VERIFY = "verify alone"
    """The WAL cannot say: adopted if the file verifies alone, else kept as damaged."""


@dataclass
class Transaction:
    """One checkpoint's records in the log (offsets are where each record starts)."""

    transaction_id: bytes
    begin: CheckpointRecord | None = None
    begin_offset: int = -1
    commit: CheckpointRecord | None = None
    commit_sequence: int = 0
    failure: CheckpointFailure | None = None
    retired: bool = False

    @property
    def record(self) -> CheckpointRecord | None:
        """The fullest description the log holds: the COMMIT's, else the BEGIN's."""
        return self.commit if self.commit is not None else self.begin

    @property
    def state(self) -> WalState:
        if self.retired:
            return WalState.RETIRED
        if self.failure is not None:
            return WalState.ABORTED
        if self.commit is not None:
            return WalState.COMMITTED
        return WalState.IN_DOUBT


def abort_failure(payload: bytes) -> CheckpointFailure:
    """An ABORT payload; an unreadable one still counts as a failure with no detail."""
    try:
        return CheckpointFailure.FromString(payload)
    except DecodeError:
        return CheckpointFailure(error="unreadable ABORT payload")


@dataclass
class LogState:
    """The transactions a log's records describe, folded in file order.

    Checkpoint behavior: rebuilt from the log at every open; nothing else persists it.
    """

    transactions: dict[bytes, Transaction] = field(default_factory=dict)
    high_water: int = 0
    """The highest sequence any record (or a COMPACTED marker) used."""
    failures: list[CheckpointFailure] = field(default_factory=list)
    """ABORT payloads, oldest first (a restarted sidecar reports them too)."""

    def apply(self, header: RecordHeader, payload: bytes, offset: int) -> None:
        """Folds one valid record (at byte `offset`) into the state."""
        self.high_water = max(self.high_water, header.sequence)
        if header.op is Op.COMPACTED:
            return
        txn = self.transactions.setdefault(
            header.transaction_id, Transaction(header.transaction_id)
        )
        if header.op is Op.BEGIN:
            txn.begin = CheckpointRecord.FromString(payload)
            txn.begin_offset = offset
            self.high_water = max(self.high_water, txn.begin.sequence)
        elif header.op is Op.COMMIT:
            txn.commit = CheckpointRecord.FromString(payload)
            txn.commit_sequence = header.sequence
            self.high_water = max(self.high_water, txn.commit.sequence)
        elif header.op is Op.ABORT:
            txn.failure = abort_failure(payload)
            self.failures.append(txn.failure)
        elif header.op is Op.RETIRE:
            txn.retired = True

    def live(self) -> list[tuple[int, CheckpointRecord]]:
        """Committed and not retired or aborted, as (commit sequence, record), oldest first."""
        return sorted(
            (
                (t.commit_sequence, t.commit)
                for t in self.transactions.values()
                if t.commit is not None and t.state is WalState.COMMITTED
            ),
            key=lambda item: item[0],
        )

    def in_doubt(self) -> list[CheckpointRecord]:
        """BEGIN records with no COMMIT, ABORT or RETIRE, oldest first."""
        return [
            t.begin
            for t in sorted(self.transactions.values(), key=lambda t: t.begin_offset)
            if t.begin is not None and t.state is WalState.IN_DOUBT
        ]

    @classmethod
    def of(cls, scan: WalScan) -> LogState:
        state = cls()
        for record in scan.records:
            state.apply(record.header, record.payload, record.offset)
        return state


@dataclass(frozen=True)
class FilePlan:
    """One checkpoint or temp file: what the log says about it and what recovery does."""

    name: str
    sequence: int
    wal_state: WalState
    action: Action
    why: str
    record: CheckpointRecord | None
    """The log's description (COMMIT, else BEGIN), None when it has none."""


@dataclass(frozen=True)
class RecoveryPlan:
    """Every checkpoint file sorted by what the log proves, before any file is verified."""

    scan: WalScan
    state: LogState
    files: tuple[FilePlan, ...]
    missing: tuple[CheckpointRecord, ...]
    """Committed in the log, not retired, and no file: deleted behind the store's back."""
    wal_lost: str
    """Why the log cannot describe the files at all ("" when it can)."""
    high_water: int

    def to_verify(self) -> list[FilePlan]:
        return [f for f in self.files if f.action is Action.VERIFY]


def plan_recovery(scan: WalScan, names: Iterable[str], *, wal_existed: bool) -> RecoveryPlan:
    """Sorts the directory's checkpoint files (`names`: every entry of the directory) by what
    the log `scan` proves; `wal_existed` is False when there was no `wal.log` at all."""
    state = LogState.of(scan)
    by_name: dict[str, Transaction] = {}
    for txn in sorted(state.transactions.values(), key=lambda t: t.begin_offset):
        record = txn.record
        if record is not None and record.file_name:
            by_name[record.file_name] = txn
    present = {n for n in names if FILE_NAME.fullmatch(n)}
    sequences = {n: _sequence(n) for n in present}
    # A file the log does not name was begun after a BEGIN the log holds only if the log lost
    # that file's BEGIN: records after the earlier BEGIN are gone even where no damage shows
    # (a log cut at a record boundary, a disk that dropped an acknowledged write).
    described = {t.record.sequence for t in state.transactions.values() if t.record is not None}
    lost_after = max((q for q in sequences.values() if q not in described), default=0)
    plans = sorted(
        (
            _plan_file(name, sequences[name], by_name.get(name), scan, lost_after)
            for name in present
        ),
        key=lambda p: (p.sequence, p.name),
    )
    missing = tuple(r for _, r in state.live() if r.file_name not in present)
    bins = [p for p in plans if p.name.endswith(".bin")]
    wal_lost = ""
    if bins and not wal_existed:
        wal_lost = f"wal.log is missing but {len(bins)} checkpoint file(s) exist"
    elif bins and scan.size == 0:
        wal_lost = f"wal.log is empty but {len(bins)} checkpoint file(s) exist"
    high_water = max([state.high_water, *(p.sequence for p in plans)])
    return RecoveryPlan(scan, state, tuple(plans), missing, wal_lost, high_water)


def _sequence(name: str) -> int:
    match = FILE_NAME.fullmatch(name)
    return 0 if match is None else int(match.group(1))


def _plan_file(
    name: str, sequence: int, txn: Transaction | None, scan: WalScan, lost_after: int
) -> FilePlan:
    record = None if txn is None else txn.record
    wal_state = WalState.NOT_IN_WAL if txn is None else txn.state
    if name.endswith(".tmp"):
        return FilePlan(
            name, sequence, wal_state, Action.REMOVE, "temporary file of an unfinished write", None
        )
    if txn is None:
        return FilePlan(
            name, sequence, wal_state, Action.VERIFY, "the WAL does not describe it", None
        )
    if wal_state is WalState.RETIRED:
        return FilePlan(name, sequence, wal_state, Action.REMOVE, "retired by retention", record)
    if wal_state is WalState.ABORTED:
        return FilePlan(name, sequence, wal_state, Action.REMOVE, "its write was aborted", record)
    if wal_state is WalState.COMMITTED:
        return FilePlan(name, sequence, wal_state, Action.KEEP, "committed", record)
    if lost_after > sequence:
        return FilePlan(
            name,
            sequence,
            wal_state,
            Action.VERIFY,
            f"BEGIN at byte {txn.begin_offset} has no COMMIT, and a later file the log does not "
            "name proves records after it were lost",
            record,
        )
    if scan.damage_after(txn.begin_offset):
        return FilePlan(
            name,
            sequence,
            wal_state,
            Action.VERIFY,
            f"BEGIN at byte {txn.begin_offset} has no COMMIT, and damage after it may hide one",
            record,
        )
    return FilePlan(
        name,
        sequence,
        wal_state,
        Action.REMOVE,
        "BEGIN without COMMIT or ABORT and an intact log after it: never committed",
        record,
    )


class Fate(Enum):
    """What recovery leaves of one checkpoint file."""

    COMMITTED = "committed"
    """Listed by the log's COMMIT; verified against that record at every load."""
    ADOPTED = "adopted"
    """The log could not describe it and it verified alone: listed as committed."""
    DAMAGED = "damaged"
    """The log could not describe it and it does not verify: kept on disk, never restored."""
    REMOVED = "removed"
    """Proven never committed, or retired: deleted."""


@dataclass(frozen=True)
class FileFate:
    """One file's fate, and why."""

    name: str
    sequence: int
    wal_state: WalState
    fate: Fate
    why: str
    record: CheckpointRecord | None
    """The record it is listed with (COMMITTED, ADOPTED), else the log's description."""


@dataclass(frozen=True)
class RecoveryOutcome:
    """What recovery leaves: the live set, and each file's fate."""

    files: tuple[FileFate, ...]
    live: tuple[tuple[int, CheckpointRecord], ...]
    """(commit sequence, record), oldest first: the log's commits whose file exists, and the
    adopted files (commit sequence = their own sequence + 1, where their COMMIT would be)."""
    rewrite: bool
    """Write a fresh compacted log of `live` (the log cannot be kept as it is)."""
    preserve: bool
    """Move the old log aside first (it holds damage worth inspecting)."""
    cut_torn_tail: bool
    """Cut the log back to its last valid record (a torn tail, nothing else to fix)."""
    high_water: int
    """Every sequence in use is at most this: the next record gets a higher one."""
    reason: str
    """The first thing found, "" when nothing was."""
    is_damage: bool
    """Real damage (logged at ERROR), not only what a crash leaves (a torn tail, leftovers)."""

    def named(self, fate: Fate) -> list[str]:
        return [f.name for f in self.files if f.fate is fate]

    @property
    def adopted(self) -> list[CheckpointRecord]:
        return [f.record for f in self.files if f.fate is Fate.ADOPTED and f.record is not None]

    @property
    def anything(self) -> bool:
        """Whether recovery found anything to report."""
        return bool(self.reason or self.named(Fate.REMOVED))

    def message(self, scan: WalScan, preserved_copy: str = "") -> WalRecovery:
        """The Leyline report of this outcome (the caller stamps `at`)."""
        return WalRecovery(
            valid_bytes=scan.valid_bytes,
            damaged_bytes=scan.damaged_bytes,
            reason=self.reason,
            torn_tail=scan.torn_tail,
            adopted_files=self.named(Fate.ADOPTED),
            removed_files=self.named(Fate.REMOVED),
            damaged_files=self.named(Fate.DAMAGED),
            preserved_copy=preserved_copy,
        )


def _decide(
    item: FilePlan, checked: CheckpointFile | None, state: LogState
) -> tuple[Fate, str, CheckpointRecord | None]:
    if item.action is Action.KEEP:
        return Fate.COMMITTED, item.why, item.record
    if item.action is Action.REMOVE:
        return Fate.REMOVED, item.why, item.record
    if checked is None:
        raise KeyError(f"{item.name} was to be verified alone")
    header = checked.header
    if header is not None and file_name(header.sequence, header.epoch) == item.name:
        # The header verified (its own xxh3) and the name is its own, so this is the file that
        # transaction wrote: a RETIRE or ABORT of it proves the file dead even when the log
        # lost the records that named it.
        txn = state.transactions.get(header.transaction_id)
        if txn is not None and txn.state in (WalState.RETIRED, WalState.ABORTED):
            return Fate.REMOVED, f"its transaction is {txn.state.value} in the WAL", item.record
    if checked.ok and checked.data_verified:
        return Fate.ADOPTED, f"{item.why}; verified alone", record_from_file(checked)
    return Fate.DAMAGED, f"{item.why}; does not verify: {checked.error}", item.record


def settle(plan: RecoveryPlan, verified: Mapping[str, CheckpointFile]) -> RecoveryOutcome:
    """The outcome of `plan` once each file it could not decide was verified alone
    (`verified[name]` for every `plan.to_verify()`; raises `KeyError` for a missing one)."""
    live = {r.transaction_id: (seq, r) for seq, r in plan.state.live()}
    for gone in plan.missing:
        live.pop(gone.transaction_id, None)
    files: list[FileFate] = []
    for item in plan.files:
        fate, why, record = _decide(item, verified.get(item.name), plan.state)
        if fate is Fate.ADOPTED and record is not None:
            if record.transaction_id in live:
                other = live[record.transaction_id][1].file_name
                fate, why = Fate.DAMAGED, f"its transaction is already committed as {other}"
            else:
                live[record.transaction_id] = (record.sequence + 1, record)
        files.append(FileFate(item.name, item.sequence, item.wal_state, fate, why, record))
    scan = plan.scan
    log_damage = bool(scan.damage) and not scan.torn_tail
    adopted = [f for f in files if f.fate is Fate.ADOPTED]
    damaged = [f for f in files if f.fate is Fate.DAMAGED]
    # A file kept or adopted because damage followed its BEGIN must not meet that BEGIN again
    # in a log whose damage is gone (cut or repaired): there it would read as never committed.
    rewrite = bool(
        log_damage
        or plan.wal_lost
        or plan.missing
        or adopted
        or any(f.wal_state is WalState.IN_DOUBT for f in damaged)
    )
    reasons = [
        scan.reason if log_damage else "",
        plan.wal_lost,
        *(f"committed checkpoint {r.file_name} is missing" for r in plan.missing),
        *(f"{f.name}: {f.why}" for f in damaged),
        *(f"{f.name}: {f.why}" for f in adopted if f.wal_state is WalState.NOT_IN_WAL),
        f"torn tail at {scan.reason}" if scan.torn_tail else "",
        *(f"{f.name}: {f.why}" for f in adopted),
    ]
    return RecoveryOutcome(
        files=tuple(files),
        live=tuple(sorted(live.values(), key=lambda item: item[0])),
        rewrite=rewrite,
        preserve=log_damage,
        cut_torn_tail=scan.torn_tail and not rewrite,
        high_water=max([plan.high_water, *(seq for seq, _ in live.values())]),
        reason=next((r for r in reasons if r), ""),
        is_damage=bool(
            log_damage
            or plan.wal_lost
            or plan.missing
            or damaged
            or any(f.wal_state is WalState.NOT_IN_WAL for f in adopted)
        ),
    )
