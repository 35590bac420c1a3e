"""What a checkpoint directory holds, read without the sidecar: `inspect_directory`.

`tolaria checkpoints DIR` prints it; tests compare it with what a store recovers. READ-ONLY:
it never writes, truncates, deletes, renames or locks anything, so it is safe beside a running
sidecar (it may then see a write in progress) and on a directory kept for forensics. It
verifies every checkpoint file alone (every byte), checks committed ones against their WAL
record too, and says what the sidecar's next open would do with each file (the same rules,
`leyline.durable.recovery`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from leyline.durable.checkpoint_file import (
    CheckpointFile,
    CheckpointFileInvalid,
    check_against_record,
    read_checkpoint_file,
)
from leyline.durable.recovery import Fate, WalState, plan_recovery, settle
from leyline.durable.wal_format import DAMAGED_PREFIX, WAL_NAME, WalDamage, WalVersionUnknown, scan
from leyline.v1.resilience_pb2 import WalRecovery


@dataclass(frozen=True)
class FileReport:
    """One checkpoint or temp file."""

    name: str
    sequence: int
    size_bytes: int
    global_step: int | None
    epoch: int | None
    instance_id: str
    lineage_id: str
    wal_state: WalState
    fate: Fate
    """What the sidecar's next open does with it (or keeps doing)."""
    verified: bool
    """Every byte verified alone, and against its WAL record when it is committed."""
    why: str
    """The failed check when not verified, else how the fate was decided."""

    @property
    def is_damage(self) -> bool:
        """A file that should load and would not: kept damaged, or committed and failing."""
        return self.fate is Fate.DAMAGED or (self.fate is Fate.COMMITTED and not self.verified)

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "sequence": self.sequence,
            "size_bytes": self.size_bytes,
            "global_step": self.global_step,
            "epoch": self.epoch,
            "instance_id": self.instance_id,
            "lineage_id": self.lineage_id,
            "wal_state": self.wal_state.value,
            "fate": self.fate.value,
            "verified": self.verified,
            "why": self.why,
        }


@dataclass(frozen=True)
class DirectoryReport:
    """Every checkpoint file of a directory, and the state of its WAL."""

    directory: Path
    files: tuple[FileReport, ...]
    wal_present: bool
    wal_bytes: int
    wal_records: int
    wal_damage: tuple[WalDamage, ...]
    wal_error: str
    """Why the WAL could not be read at all (another version, unreadable), else ""."""
    missing: tuple[str, ...]
    """Files the WAL lists as committed that are not there."""
    preserved_logs: tuple[str, ...]
    """Damaged logs an earlier recovery moved aside (`wal.log.damaged-<n>`)."""
    recovery: WalRecovery
    """What the next open would report (`at` unset)."""
    wal_damaged: bool
    """Real WAL damage, or no WAL beside checkpoint files (a torn tail, what a normal crash
    leaves, is not)."""

    @property
    def torn_tail(self) -> bool:
        return self.recovery.torn_tail

    @property
    def is_damaged(self) -> bool:
        """Any damage: a file that would not load, a missing committed file, or a damaged or
        unreadable WAL. A torn tail and leftover temp files are what a crash leaves: not."""
        return bool(
            self.wal_damaged
            or self.wal_error
            or self.missing
            or any(f.is_damage for f in self.files)
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "directory": str(self.directory),
            "damaged": self.is_damaged,
            "wal": {
                "present": self.wal_present,
                "bytes": self.wal_bytes,
                "records": self.wal_records,
                "valid_bytes": self.recovery.valid_bytes,
                "damaged_bytes": self.recovery.damaged_bytes,
                "torn_tail": self.torn_tail,
                "damaged": self.wal_damaged,
                "error": self.wal_error,
                "reason": self.recovery.reason,
                "damage": [
                    {"offset": d.offset, "length": d.length, "reason": d.reason}
                    for d in self.wal_damage
                ],
                "preserved_logs": list(self.preserved_logs),
            },
            "missing": list(self.missing),
            "files": [f.to_dict() for f in self.files],
        }


class NotADirectory(ValueError):
    """`inspect_directory` was given something that is not a directory."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path}: not a directory")
        self.path = path


def _read_wal(path: Path) -> tuple[bool, bytes, str]:
    try:
        return True, path.read_bytes(), ""
    except FileNotFoundError:
        return False, b"", ""
    except OSError as err:
        return True, b"", f"unreadable: {err}"


def inspect_directory(directory: Path) -> DirectoryReport:
    """Reports every checkpoint file in `directory` and its WAL; writes nothing, locks nothing.

    Reads every byte of every checkpoint file (seconds for large ones). Raises
    `NotADirectory` when `directory` is not one.
    """
    if not directory.is_dir():
        raise NotADirectory(directory)
    names = sorted(p.name for p in directory.iterdir())
    wal_present, raw, wal_error = _read_wal(directory / WAL_NAME)
    try:
        log = scan(raw)
    except WalVersionUnknown as err:
        wal_error = f"{err} (written by another Tolaria version)"
        log = scan(b"")
    plan = plan_recovery(log, names, wal_existed=wal_present and not wal_error)
    checked: dict[str, CheckpointFile] = {
        f.name: read_checkpoint_file(directory / f.name)
        for f in plan.files
        if f.name.endswith(".bin")
    }
    outcome = settle(plan, checked)
    files = []
    for fate in outcome.files:
        path = directory / fate.name
        check = checked.get(fate.name)
        verified, why = False, fate.why
        if check is not None:
            verified, why = check.ok and check.data_verified, check.error or fate.why
            if verified and fate.fate is Fate.COMMITTED and fate.record is not None:
                try:
                    if check.header is not None:
                        check_against_record(check.header, fate.record, path)
                except CheckpointFileInvalid as err:
                    verified, why = False, str(err)
        header = None if check is None else check.header
        manifest = None if check is None else check.manifest
        try:
            size = path.stat().st_size
        except OSError:
            size = 0
        files.append(
            FileReport(
                name=fate.name,
                sequence=fate.sequence,
                size_bytes=size,
                global_step=None if header is None else header.global_step,
                epoch=None if header is None else header.epoch,
                instance_id="" if manifest is None else manifest.instance_id,
                lineage_id="" if manifest is None else manifest.lineage_id,
                wal_state=fate.wal_state,
                fate=fate.fate,
                verified=verified,
                why=why,
            )
        )
    return DirectoryReport(
        directory=directory,
        files=tuple(files),
        wal_present=wal_present,
        wal_bytes=len(raw),
        wal_records=len(log.records),
        wal_damage=log.damage,
        wal_error=wal_error,
        missing=tuple(r.file_name for r in plan.missing),
        preserved_logs=tuple(n for n in names if n.startswith(DAMAGED_PREFIX)),
        recovery=outcome.message(log),
        wal_damaged=bool((log.damage and not log.torn_tail) or plan.wal_lost),
    )
