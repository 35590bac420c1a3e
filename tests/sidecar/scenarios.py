"""Shared crash scenarios for the durable store: deterministic content, seeded directories, checks.

Used in-process (`test_checkpoints.py`) and by child processes (`crash_child.py`), so it imports
no test framework. Content is a pure function of (seed, index): a parent can regenerate, bit for
bit, what a killed child wrote.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from leyline.spec.resilience import CheckpointSpec
from leyline.v1.resilience_pb2 import CheckpointFailure, CheckpointRecord, SnapshotManifest
from tolaria_sidecar.checkpoints import DurableStore
from tolaria_sidecar.faults import Faults
from tolaria_sidecar.wal import WriteAheadLog

RUN_ID = "crash-run"
INSTANCE_ID = "crash-run-instance"
LINEAGE_ID = "crash-run-lineage"
SPEC = CheckpointSpec(keep=3, wal_rotate_bytes=64 * 1024)
"""Three kept (R6.3) and the smallest WAL rotation the spec allows, so compaction happens often."""
SEEDED_EPOCHS = (4, 5, 6)
ANNOUNCE = 1
"""About to write `index`: it may be what survives if the crash lands now."""
DONE = 2
"""`index` is committed: it must never be lost."""
NEW_EPOCH = 7


def content(seed: int, index: int, *, max_bytes: int = 48 * 1024) -> tuple[bytes, bytes]:
    """(manifest, data) of checkpoint or snapshot `index`: random, sized 0..max_bytes.

    The manifest is a real `SnapshotManifest` (as the sidecar persists), so a file whose WAL
    record is lost can be verified alone and adopted with its instance and lineage.
    """
    rng = random.Random(seed * 1_000_003 + index)
    data = rng.randbytes(rng.randrange(max_bytes + 1))
    manifest = SnapshotManifest(
        version=1,
        run_id=RUN_ID,
        generation=index,
        global_step=index,
        epoch=index,
        data_bytes=len(data),
        layout_fingerprint=f"seed-{seed}",
        instance_id=INSTANCE_ID,
        lineage_id=LINEAGE_ID,
        manifest_digest=f"{seed:016x}",
    ).SerializeToString()
    return manifest, data


def write_index(store: DurableStore, seed: int, index: int) -> CheckpointRecord:
    """Writes checkpoint `index` (epoch and step = index) of the content stream `seed`."""
    manifest, data = content(seed, index)
    return store.write(
        manifest=manifest,
        data=memoryview(data),
        epoch=index,
        global_step=index,
        snapshot_generation=index,
        manifest_digest=f"{seed:016x}",
    )


def pad_wal_past_rotation(directory: Path, spec: CheckpointSpec = SPEC) -> None:
    """Appends aborted transactions (as failed writes leave) until the WAL is due compaction."""
    wal = WriteAheadLog(directory, spec)
    try:
        while not wal.needs_compaction:
            record = CheckpointRecord(
                sequence=wal.next_sequence, transaction_id=os.urandom(16), epoch=0
            )
            wal.begin(record)
            wal.abort(record, CheckpointFailure(error="ENOSPC: " + "x" * 4000))
    finally:
        wal.close()


def seed_full_write(directory: Path, seed: int) -> None:
    """A directory where writing `NEW_EPOCH` reaches every write point.

    Epochs 4, 5, 6 committed (`keep` is 3, so the next commit retires epoch 4) and a WAL past
    its rotation size (so the next write compacts it).
    """
    with DurableStore(directory, SPEC, run_id=RUN_ID) as store:
        for epoch in SEEDED_EPOCHS:
            write_index(store, seed, epoch)
    pad_wal_past_rotation(directory)


def write_new_epoch(directory: Path, seed: int, faults: Faults) -> None:
    """The write under test: `NEW_EPOCH` into a seeded directory, with `faults` armed."""
    store = DurableStore(directory, SPEC, run_id=RUN_ID, faults=faults)
    try:
        write_index(store, seed, NEW_EPOCH)
    finally:
        store.close()


@dataclass(frozen=True)
class Reopened:
    """What a reopened directory offers after a crash."""

    restored_epoch: int
    restored_ok: bool
    committed_epochs: tuple[int, ...]
    all_committed_verify: bool
    leftover_files: tuple[str, ...]


def reopen_and_inspect(directory: Path, seed: int) -> Reopened:
    """Reopens `directory`, restores the latest and verifies every committed checkpoint."""
    buffer = memoryview(bytearray(64 * 1024))
    with DurableStore(directory, SPEC, run_id=RUN_ID) as store:
        record, manifest, length = store.load_latest(buffer)
        restored_ok = (manifest, bytes(buffer[:length])) == content(seed, record.epoch)
        committed = store.committed()
        verify = True
        for each in committed:
            got_manifest, got_length = store.load(each, buffer)
            verify &= (got_manifest, bytes(buffer[:got_length])) == content(seed, each.epoch)
        expected_files = {r.file_name for r in committed} | {"wal.log"}
        leftovers = tuple(
            sorted(p.name for p in directory.iterdir() if p.name not in expected_files)
        )
    return Reopened(
        record.epoch,
        restored_ok,
        tuple(r.epoch for r in committed),
        verify,
        leftovers,
    )


@dataclass
class Ledger:
    """What a writer reported (a child over a pipe, or the power-loss harness directly),
    across all trials of one test."""

    done: set[int] = field(default_factory=set)
    next_index: int = 1
    in_flight: int | None = None
    trials: int = 0
    torn: int = 0
    lost: int = 0
    in_flight_survived: int = 0
    killed_before_first_report: int = 0
    refused: int = 0

    def record(self, kind: int, index: int) -> None:
        """`kind` 1: about to write `index` (ANNOUNCE); 2: `index` committed (DONE)."""
        if kind == ANNOUNCE:
            self.in_flight = index
            self.next_index = max(self.next_index, index + 1)
        elif kind == DONE:
            self.done.add(index)
            self.in_flight = None

    def settle(self, survived: set[int]) -> None:
        """The in-flight write's fate is decided: it either survived whole or never will."""
        if self.in_flight is not None and self.in_flight in survived:
            self.done.add(self.in_flight)
            self.in_flight_survived += 1
        self.in_flight = None

    @property
    def candidates(self) -> set[int]:
        return self.done | ({self.in_flight} if self.in_flight is not None else set())

    def summary(self, kind: str) -> str:
        return (
            f"{kind}: {self.trials} SIGKILL trials, {len(self.done)} commits reported, "
            f"{self.in_flight_survived} in-flight writes survived whole, "
            f"{self.killed_before_first_report} kills before the first report, "
            f"{self.refused} torn candidates refused by checksum; "
            f"torn restores {self.torn}, lost commits {self.lost}"
        )


WHOLE_OUTCOMES = {(6, 5, 4), (7, 6, 5, 4), (7, 6, 5)}
"""Committed epochs, newest first, after a crash while writing epoch 7: before its COMMIT, after
its COMMIT but before epoch 4's RETIRE, or after both."""
