"""Power cuts (R6.3, R13.5): the store's files after a machine loses power mid-operation.

The store and its WAL run on `PowerLossFileSystem` (see `powerloss.py` for the ext4 model:
unsynced data lost or torn at the end, names durable only after a directory fsync, a random
prefix of pending name changes kept). The power is cut at one operation, anywhere: during a
write, its retention and the WAL compaction, during recovery at open, during a load. The
directory is then opened again, on a copy, by a store on the real file system, and checked:

* no torn restore: whatever is listed or restored is exactly what was written for its index;
* no lost commit: every `write()` that returned is still loadable unless retention retired it
  after a later commit;
* recovery is idempotent: a second open finds nothing new and lists the same checkpoints;
* sequences only grow; no file is ever reported damaged (power cuts tear nothing a sync
  covered); `inspect_directory` (read-only) predicts exactly what the open does.

`TOLARIA_SLOW=1` runs 1000 random trials instead of 200.
"""

from __future__ import annotations

import os
import random
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from leyline.durable import inspect_directory
from leyline.durable.wal_format import WAL_NAME
from leyline.spec.resilience import CheckpointSpec
from tests.sidecar.powerloss import PowerLossFileSystem, PowerLost
from tests.sidecar.scenarios import (
    ANNOUNCE,
    DONE,
    NEW_EPOCH,
    RUN_ID,
    SPEC,
    WHOLE_OUTCOMES,
    Ledger,
    content,
    seed_full_write,
    write_index,
)
from tolaria_sidecar.checkpoints import DurableStore
from tolaria_sidecar.errors import InjectedCrash, NoCheckpoint
from tolaria_sidecar.faults import Faults

SLOW = os.environ.get("TOLARIA_SLOW") == "1"
TRIALS = 1000 if SLOW else 200
SEED = 13
HARNESS_SPEC = SPEC.model_copy(update={"wal_rotate_bytes": 8 * 1024})
"""Below the manifest's 64 KiB minimum (a test-only spec), so compaction comes every few
writes and the random cuts land in it too."""
BUFFER_BYTES = 64 * 1024


class Where(Faults):
    """Names where the store is when the power goes: the harness's phase, the step inside a
    write (from the write points it passed) or inside recovery (from the operation cut)."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = ""
        self.step = ""

    def enter(self, phase: str) -> None:
        self.phase = phase
        self.step = {"write": "BEGIN append", "open": "read, scan, verify"}.get(phase, "")

    def hit(self, point: str) -> None:
        if self.phase == "write":
            self.step = _WRITE_STEPS.get((self.step, point), self.step)
        elif self.phase == "open":
            self.step = _OPEN_STEPS.get(point, self.step)
        super().hit(point)

    def label(self, operation: str) -> str:
        step = self.step
        if self.phase == "open" and step == "read, scan, verify":
            step = _OPEN_OPERATIONS.get(operation, step)
        return f"{self.phase}: {step}" if step else self.phase


Body = Callable[[DurableStore, "Where", PowerLossFileSystem], None]
"""What a trial does with the opened store (recovery at open has already run)."""

_WRITE_STEPS = {
    ("BEGIN append", "wal.append.after_sync"): "checkpoint file",
    ("checkpoint file", "checkpoint.after_fdatasync"): "rename + directory fsync",
    ("rename + directory fsync", "checkpoint.after_dir_fsync"): "COMMIT append",
    ("COMMIT append", "wal.append.after_sync"): "retention",
    ("retention", "wal.compact.before_write"): "compaction",
    ("COMMIT append", "wal.compact.before_write"): "compaction",
}
_OPEN_STEPS = {
    "checkpoint.recovery.after_remove": "remove leftovers",
    "wal.recovery.after_preserve": "rewrite the log",
    "wal.compact.before_write": "rewrite the log",
    "wal.compact.after_dir_sync": "repaired",
    "wal.recovery.after_cut": "repaired",
}
_OPEN_OPERATIONS = {
    "unlink": "remove leftovers",
    "link": "rewrite the log",
    "ftruncate": "cut a torn tail",
}


@dataclass
class Checked:
    """Violations found over all trials of one test (each must stay 0)."""

    torn: int = 0
    lost: int = 0
    not_idempotent: int = 0
    mispredicted: int = 0
    damaged: int = 0
    sequence_reuse: int = 0
    max_sequence: int = 0
    notes: list[str] = field(default_factory=list)

    def violations(self) -> dict[str, int]:
        return {
            "torn restores": self.torn,
            "lost commits": self.lost,
            "recoveries not idempotent": self.not_idempotent,
            "inspect mispredicted": self.mispredicted,
            "files reported damaged": self.damaged,
            "sequences reused": self.sequence_reuse,
        }


def copy_tree(source: Path, target: Path) -> Path:
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    return target


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def check_after_reboot(
    disk: Path, scratch: Path, ledger: Ledger, checked: Checked, spec: CheckpointSpec
) -> list[int]:
    """Opens a copy of what the disk holds after the cut with a real store; checks every
    promise; returns the steps listed, newest first. The disk itself is left as it is."""
    before = files_of(disk)
    predicted = inspect_directory(disk)
    if files_of(disk) != before:
        checked.notes.append("inspect_directory changed the directory")
        checked.mispredicted += 1
    directory = copy_tree(disk, scratch)
    buffer = memoryview(bytearray(BUFFER_BYTES))
    with DurableStore(directory, spec, run_id=RUN_ID) as store:
        found = store.recovery
        if (
            list(found.adopted_files) != list(predicted.recovery.adopted_files)
            or list(found.removed_files) != list(predicted.recovery.removed_files)
            or list(found.damaged_files) != list(predicted.recovery.damaged_files)
        ):
            checked.mispredicted += 1
            checked.notes.append(f"predicted {predicted.recovery} found {found}")
        checked.damaged += len(found.damaged_files)
        try:
            record, manifest, length = store.load_latest(buffer)
            restored: int | None = record.global_step
            if record.global_step not in ledger.candidates or (
                manifest,
                bytes(buffer[:length]),
            ) != content(SEED, record.global_step):
                checked.torn += 1
        except NoCheckpoint:
            restored = None
        kept: set[int] = set()
        for each in store.committed():
            got_manifest, got_length = store.load(each, buffer)
            kept.add(each.global_step)
            checked.max_sequence = max(checked.max_sequence, each.sequence)
            whole = (got_manifest, bytes(buffer[:got_length])) == content(SEED, each.global_step)
            if each.global_step not in ledger.candidates or not whole:
                checked.torn += 1
        listed = [(r.sequence, r.global_step) for r in store.committed()]
    newest_done = max(ledger.done, default=None)
    if newest_done is not None and (restored is None or restored < newest_done):
        checked.lost += 1
    ledger.settle(kept)
    checked.lost += len(set(sorted(ledger.done)[-spec.keep :]) - kept)
    with DurableStore(directory, spec, run_id=RUN_ID) as again:
        found = again.recovery
        if (
            found.adopted_files
            or found.removed_files
            or found.damaged_files
            or found.torn_tail
            or found.damaged_bytes
            or [(r.sequence, r.global_step) for r in again.committed()] != listed
        ):
            checked.not_idempotent += 1
            checked.notes.append(f"second open found {found}")
    return [step for _, step in listed]


def run_cut(
    directory: Path,
    cut_at: int | None,
    rng: random.Random,
    body: Body,
    *,
    spec: CheckpointSpec = SPEC,
) -> tuple[PowerLossFileSystem, str | None]:
    """Opens a store on `directory` through a power-loss file system cut at `cut_at` and runs
    `body`; returns the file system and where the power went (None: it did not)."""
    where = Where()
    fs = PowerLossFileSystem(
        directory,
        cut_at=cut_at,
        rng=rng,
        torn_appends=rng.random() < 0.7,
        names_prefix=rng.random() < 0.7,
        label=where.label,
    )
    try:
        where.enter("open")
        store = DurableStore(directory, spec, run_id=RUN_ID, faults=where, fs=fs)
        body(store, where, fs)
        where.enter("close")
        store.close()
    except PowerLost as lost:
        return fs, lost.label
    finally:
        fs.release()
    return fs, None


def operations_of(
    template: Path,
    scratch: Path,
    body: Body,
) -> int:
    """How many file-system operations `body` (after an open) takes on a copy of `template`."""
    fs, _ = run_cut(copy_tree(template, scratch), None, random.Random(0), body)
    return fs.ops


def only_open(store: DurableStore, where: Where, fs: PowerLossFileSystem) -> None:
    """Recovery at open is the whole operation."""


# -- the model ------------------------------------------------------------------------------------


@pytest.mark.req("R6.3")
def test_the_double_keeps_only_what_was_synced_and_named(tmp_path: Path) -> None:
    synced, unsynced, unnamed = (tmp_path / n for n in ("synced", "unsynced", "unnamed"))
    (tmp_path / "old").write_bytes(b"before")
    fs = PowerLossFileSystem(tmp_path, cut_at=12, torn_appends=False, names_prefix=False)
    fd = fs.open(synced, os.O_WRONLY | os.O_CREAT)  # 1
    fs.write(fd, b"kept")  # 2
    fs.fdatasync(fd)  # 3
    fs.fsync_directory(tmp_path)  # 4: the name is durable too
    fs.write(fd, b" + lost")  # 5
    other = fs.open(unsynced, os.O_WRONLY | os.O_CREAT)  # 6
    fs.write(other, b"never synced")  # 7
    fs.fsync_directory(tmp_path)  # 8: named, but its data never synced
    third = fs.open(unnamed, os.O_WRONLY | os.O_CREAT)  # 9
    fs.write(third, b"synced, never named")  # 10
    fs.fsync(third)  # 11
    with pytest.raises(PowerLost):
        fs.unlink(tmp_path / "old")  # 12: the power goes before it
    assert files_of(tmp_path) == {"old": b"before", "synced": b"kept", "unsynced": b""}
    with pytest.raises(PowerLost):
        fs.exists(synced)


@pytest.mark.req("R6.3")
def test_the_double_keeps_a_prefix_of_pending_renames_in_order(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"A")
    outcomes = set()
    for seed in range(40):
        for name in list(os.listdir(tmp_path)):
            os.unlink(tmp_path / name)
        (tmp_path / "a").write_bytes(b"A")
        fs = PowerLossFileSystem(tmp_path, cut_at=3, rng=random.Random(seed))
        fs.rename(tmp_path / "a", tmp_path / "b")
        fs.rename(tmp_path / "b", tmp_path / "c")
        with pytest.raises(PowerLost):
            fs.fsync_directory(tmp_path)
        outcomes.add(tuple(sorted(files_of(tmp_path))))
    assert outcomes == {("a",), ("b",), ("c",)}


@pytest.mark.req("R6.3")
def test_the_double_may_keep_a_torn_prefix_of_an_unsynced_append(tmp_path: Path) -> None:
    (tmp_path / "log").write_bytes(b"durable|")
    lengths = set()
    for seed in range(40):
        (tmp_path / "log").write_bytes(b"durable|")
        fs = PowerLossFileSystem(tmp_path, cut_at=3, rng=random.Random(seed))
        fd = fs.open(tmp_path / "log", os.O_WRONLY | os.O_APPEND)
        fs.write(fd, b"appended")
        with pytest.raises(PowerLost):
            fs.fdatasync(fd)
        kept = (tmp_path / "log").read_bytes()
        assert b"durable|appended".startswith(kept) and kept.startswith(b"durable|")
        lengths.add(len(kept))
    assert min(lengths) == len(b"durable|") and len(lengths) > 3


# -- a cut at every operation -------------------------------------------------------------------


@pytest.fixture
def seeded(tmp_path: Path) -> Path:
    """Epochs 4, 5, 6 committed and a WAL due compaction: writing epoch 7 retires and
    compacts."""
    directory = tmp_path / "seeded"
    seed_full_write(directory, SEED)
    return directory


def write_new_epoch(store: DurableStore, where: Where, fs: PowerLossFileSystem) -> None:
    where.enter("write")
    write_index(store, SEED, NEW_EPOCH)


@pytest.mark.req("R6.3")
def test_a_power_cut_at_any_operation_of_a_write_retention_and_compaction_keeps_a_whole_state(
    seeded: Path, tmp_path: Path
) -> None:
    total = operations_of(seeded, tmp_path / "count", write_new_epoch)
    rng = random.Random(7)
    labels: Counter[str] = Counter()
    for cut_at in range(1, total + 1):
        for _ in range(2):  # each cut with two draws of what the disk kept
            disk = copy_tree(seeded, tmp_path / "disk")
            _, label = run_cut(disk, cut_at, rng, write_new_epoch)
            assert label is not None
            labels[label] += 1
            ledger = Ledger(done={4, 5, 6}, in_flight=NEW_EPOCH)
            checked = Checked()
            steps = check_after_reboot(disk, tmp_path / "check", ledger, checked, SPEC)
            assert tuple(steps) in WHOLE_OUTCOMES, (cut_at, label, steps)
            assert not any(checked.violations().values()), (cut_at, label, checked)
    assert {
        "write: BEGIN append",
        "write: checkpoint file",
        "write: rename + directory fsync",
        "write: COMMIT append",
        "write: retention",
        "write: compaction",
    } <= set(labels), labels


def torn_commit(directory: Path) -> None:
    """The last write's COMMIT cut in half: recovery adopts its file and rewrites the log."""
    wal = directory / WAL_NAME
    os.truncate(wal, wal.stat().st_size - 300)


def flipped_mid_log(directory: Path) -> None:
    """A byte of an early record flipped: recovery keeps a copy and rewrites the log."""
    raw = bytearray((directory / WAL_NAME).read_bytes())
    raw[300] ^= 0x40
    (directory / WAL_NAME).write_bytes(raw)


def missing_log(directory: Path) -> None:
    (directory / WAL_NAME).unlink()


def leftovers(directory: Path) -> None:
    """A write that crashed after its rename (BEGIN, file, no COMMIT) and a temp file of it:
    recovery removes both."""
    faults = Faults()
    faults.crash_at("checkpoint.after_dir_fsync")
    store = DurableStore(directory, SPEC, run_id=RUN_ID, faults=faults)
    with pytest.raises(InjectedCrash):
        write_index(store, SEED, 4)
    store.close()
    (in_doubt,) = store.wal.in_doubt()
    (directory / f"ckpt-{in_doubt.sequence:010d}.tmp").write_bytes(b"half a checkpoint")


DAMAGE = {
    "torn COMMIT": torn_commit,
    "mid-log flip": flipped_mid_log,
    "missing log": missing_log,
    "leftovers": leftovers,
}


@pytest.mark.req("R6.3")
@pytest.mark.parametrize("damage", DAMAGE)
def test_a_power_cut_at_any_operation_of_recovery_leaves_the_same_live_set(
    tmp_path: Path, damage: str
) -> None:
    template = tmp_path / "template"
    with DurableStore(template, SPEC, run_id=RUN_ID) as store:
        for index in (1, 2, 3):
            write_index(store, SEED, index)
    DAMAGE[damage](template)
    expected = check_after_reboot(
        template, tmp_path / "expected", Ledger(done={1, 2}, in_flight=3), Checked(), SPEC
    )
    assert expected == [3, 2, 1]
    total = operations_of(template, tmp_path / "count", only_open)
    rng = random.Random(11)
    for cut_at in range(1, total + 1):
        for _ in range(2):
            disk = copy_tree(template, tmp_path / "disk")
            _, label = run_cut(disk, cut_at, rng, only_open)
            assert label is not None and label.startswith(("open", "close"))
            checked = Checked()
            ledger = Ledger(done={1, 2}, in_flight=3)
            steps = check_after_reboot(disk, tmp_path / "check", ledger, checked, SPEC)
            assert steps == expected, (cut_at, label, steps)
            assert not any(checked.violations().values()), (cut_at, label, checked)
            # The disk recovers in place too, and that is idempotent.
            _, again = run_cut(disk, None, rng, only_open)
            assert again is None
            ledger = Ledger(done={1, 2, 3})
            assert check_after_reboot(disk, tmp_path / "check", ledger, checked, SPEC) == expected
            assert not any(checked.violations().values()), (cut_at, label, checked)


def load_latest(store: DurableStore, where: Where, fs: PowerLossFileSystem) -> None:
    where.enter("load")
    store.load_latest(memoryview(bytearray(BUFFER_BYTES)))


@pytest.mark.req("R6.3")
def test_a_power_cut_during_a_load_changes_nothing(seeded: Path, tmp_path: Path) -> None:
    with DurableStore(seeded, SPEC, run_id=RUN_ID) as store:
        write_index(store, SEED, NEW_EPOCH)
    before = files_of(seeded)
    total = operations_of(seeded, tmp_path / "count", load_latest)
    for cut_at in range(1, total + 1):
        disk = copy_tree(seeded, tmp_path / "disk")
        _, label = run_cut(disk, cut_at, random.Random(cut_at), load_latest)
        assert label is not None
        assert files_of(disk) == before, (cut_at, label)


# -- random cuts over a long history ------------------------------------------------------------


@dataclass
class Trials:
    """The random harness's state across trials."""

    ledger: Ledger = field(default_factory=Ledger)
    checked: Checked = field(default_factory=Checked)
    cuts: Counter[str] = field(default_factory=Counter)
    uncut: int = 0
    longest: int = 40
    """Operations in the longest uncut trial so far: the range cuts are drawn from."""


def trial_body(trials: Trials, rng: random.Random) -> Body:
    def body(store: DurableStore, where: Where, fs: PowerLossFileSystem) -> None:
        ledger, checked = trials.ledger, trials.checked
        for _ in range(rng.randint(1, 3)):
            index = ledger.next_index
            ledger.record(ANNOUNCE, index)
            where.enter("write")
            record = write_index(store, SEED, index)
            if record.sequence <= checked.max_sequence:
                checked.sequence_reuse += 1
            checked.max_sequence = record.sequence
            ledger.record(DONE, index)
        where.enter("load")
        buffer = memoryview(bytearray(BUFFER_BYTES))
        record, manifest, length = store.load_latest(buffer)
        if (manifest, bytes(buffer[:length])) != content(SEED, record.global_step):
            checked.torn += 1

    return body


def cut_table(cuts: Counter[str], total: int) -> Iterator[str]:
    yield f"{'where the power went':<44} {'cuts':>6} {'share':>7}"
    for label, count in sorted(cuts.items(), key=lambda item: (-item[1], item[0])):
        yield f"{label:<44} {count:>6} {count / total:>7.1%}"


@pytest.mark.req("R6.3")
@pytest.mark.timeout(120 + TRIALS)
def test_random_power_cuts_never_tear_a_restore_or_lose_a_commit(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    disk = tmp_path / "checkpoints"
    disk.mkdir()  # the directory itself is not what these cuts are about
    rng = random.Random(20240614)
    trials = Trials()
    for number in range(TRIALS):
        # One trial in ten runs to the end: it measures how long a trial is, so the cuts of
        # the others are drawn over the whole of one.
        cut_at = None if number % 10 == 0 else rng.randint(1, trials.longest)
        fs, label = run_cut(disk, cut_at, rng, trial_body(trials, rng), spec=HARNESS_SPEC)
        if label is None:
            trials.uncut += 1
            trials.longest = max(trials.longest, fs.ops)
        else:
            trials.cuts[label] += 1
        check_after_reboot(disk, tmp_path / "check", trials.ledger, trials.checked, HARNESS_SPEC)
    cut = sum(trials.cuts.values())
    lines = [
        f"power-loss: {TRIALS} trials, {cut} cut, {trials.uncut} ran to the end; "
        f"{len(trials.ledger.done)} commits, {trials.ledger.in_flight_survived} in-flight "
        "writes survived whole",
        *cut_table(trials.cuts, cut),
        "violations: " + ", ".join(f"{k} {v}" for k, v in trials.checked.violations().items()),
    ]
    print("\n".join(lines))
    record_property("power_loss_trials", TRIALS)
    record_property("power_loss_cuts", cut)
    record_property("power_loss_commits", len(trials.ledger.done))
    for label, count in sorted(trials.cuts.items()):
        record_property(f"power_loss_cut_share[{label}]", round(count / cut, 4))
    for name, count in trials.checked.violations().items():
        record_property(f"power_loss_{name.replace(' ', '_')}", count)
    assert not any(trials.checked.violations().values()), "\n".join(
        lines + trials.checked.notes[:5]
    )
    assert len(trials.ledger.done) > TRIALS // 2
    phases = {label.split(":")[0] for label in trials.cuts}
    assert {"open", "write", "load"} <= phases, trials.cuts
    assert {
        "write: checkpoint file",
        "write: COMMIT append",
        "write: retention",
        "write: compaction",
    } <= set(trials.cuts), trials.cuts
