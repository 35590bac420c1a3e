"""Real crashes (R6.3): checkpoint writers SIGKILLed at random moments serve nothing torn, lose
nothing. (Shared-memory snapshots have their own harness, driving the production writer and
restorer: `tests/trainer/test_snapshot_crash_consistency.py`.)

A child process writes checkpoints of random content in a loop and reports over a pipe each
index it is about to write and each it has committed. The parent kills it with SIGKILL at a
random moment, then restores what the store offers and checks it, bit for bit, against the
content the child reported:

* torn: something restorable that is not exactly a reported commit or the announced in-flight
  write;
* lost: the newest restorable is older than the newest reported commit, or one of the last
  `keep` commits is gone.

Both counts must be 0. `TOLARIA_SLOW=1` runs 1000 trials instead of 200.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from pathlib import Path
from typing import Any

import pytest

from tests.forkserver import forkserver_context
from tests.sidecar import crash_child
from tests.sidecar.crash_child import (
    MESSAGE,
    write_checkpoints,
)
from tests.sidecar.scenarios import (
    NEW_EPOCH,
    RUN_ID,
    SPEC,
    WHOLE_OUTCOMES,
    Ledger,
    content,
    reopen_and_inspect,
    seed_full_write,
)
from tolaria_sidecar import checkpoints, wal
from tolaria_sidecar.checkpoints import DurableStore
from tolaria_sidecar.errors import NoCheckpoint
from tolaria_sidecar.faults import EXIT_STATUS

SLOW = os.environ.get("TOLARIA_SLOW") == "1"
TRIALS = 1000 if SLOW else 200
REPORT_DEADLINE_S = 60.0
"""Generous: a child on a loaded 2-core machine may take long to report; it is never a timing
assertion, only a bound that turns a hung child into a failure."""
MAX_EVENTS_BEFORE_KILL = 6
KILL_JITTER_S = 0.004
"""How far past the last seen report the kill lands: spans a whole small write, so kills fall
before, inside and after every step of it."""


@pytest.fixture
def forkserver() -> ForkServerContext:
    """Children forked from a server that has already imported what they need (ms, not s)."""
    return forkserver_context()


def run_until_killed(
    context: ForkServerContext,
    target: Callable[..., None],
    args: tuple[Any, ...],
    ledger: Ledger,
    rng: random.Random,
) -> None:
    """Starts a child, lets it report a random number of events, SIGKILLs it, drains reports."""
    reader, writer = context.Pipe(duplex=False)
    child = context.Process(target=target, args=(*args, writer), daemon=True)
    child.start()
    writer.close()
    wanted = rng.randrange(MAX_EVENTS_BEFORE_KILL + 1)
    if wanted == 0:
        ledger.killed_before_first_report += 1
    for _ in range(wanted):
        if not reader.poll(REPORT_DEADLINE_S):
            child.kill()
            raise AssertionError(f"no report within {REPORT_DEADLINE_S} s")
        try:
            ledger.record(*MESSAGE.unpack(reader.recv_bytes()))
        except EOFError:
            child.join(REPORT_DEADLINE_S)
            raise AssertionError(f"child died by itself: exit code {child.exitcode}") from None
    time.sleep(rng.uniform(0, KILL_JITTER_S))  # where the kill lands; nothing waits on this
    child.kill()
    child.join(REPORT_DEADLINE_S)
    assert child.exitcode == -signal.SIGKILL, f"child ended by itself: {child.exitcode}"
    drain(reader, ledger)
    ledger.trials += 1


def drain(reader: Connection, ledger: Ledger) -> None:
    """Reports the child sent before it died (it is dead: no wait, EOF ends the loop)."""
    while reader.poll(0):
        try:
            ledger.record(*MESSAGE.unpack(reader.recv_bytes()))
        except EOFError:
            break
    reader.close()


# -- durable checkpoints -------------------------------------------------------------------------


def check_checkpoints(directory: Path, seed: int, ledger: Ledger) -> None:
    buffer = memoryview(bytearray(64 * 1024))
    with DurableStore(directory, SPEC, run_id=RUN_ID) as store:
        try:
            record, manifest, length = store.load_latest(buffer)
            restored: int | None = record.global_step
            if record.global_step not in ledger.candidates or (
                manifest,
                bytes(buffer[:length]),
            ) != content(seed, record.global_step):
                ledger.torn += 1
        except NoCheckpoint:
            restored = None
        kept: set[int] = set()
        for each in store.committed():
            got_manifest, got_length = store.load(each, buffer)
            kept.add(each.global_step)
            whole = (got_manifest, bytes(buffer[:got_length])) == content(seed, each.global_step)
            if each.global_step not in ledger.candidates or not whole:
                ledger.torn += 1
    newest_done = max(ledger.done, default=None)
    if newest_done is not None and (restored is None or restored < newest_done):
        ledger.lost += 1
    ledger.settle(kept)
    ledger.lost += len(set(sorted(ledger.done)[-SPEC.keep :]) - kept)


@pytest.mark.req("R6.3")
@pytest.mark.timeout(120 + TRIALS)
def test_sigkilled_checkpoint_writers_never_serve_a_torn_or_lose_a_committed_checkpoint(
    forkserver: ForkServerContext, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    directory = tmp_path / "checkpoints"
    rng = random.Random(20240611)
    ledger = Ledger()
    for _ in range(TRIALS):
        args = (str(directory), 7, ledger.next_index)
        run_until_killed(forkserver, write_checkpoints, args, ledger, rng)
        check_checkpoints(directory, 7, ledger)
    print(ledger.summary("checkpoints"))
    record_property("checkpoint_trials", ledger.trials)
    record_property("checkpoint_torn_restores", ledger.torn)
    record_property("checkpoint_lost_commits", ledger.lost)
    assert ledger.trials == TRIALS and len(ledger.done) > TRIALS // 2
    assert (ledger.torn, ledger.lost) == (0, 0), ledger.summary("checkpoints")


# -- a real process exit at every write point ----------------------------------------------------


@pytest.mark.req("R6.3")
@pytest.mark.parametrize("point", wal.WRITE_POINTS + checkpoints.WRITE_POINTS)
def test_a_process_exiting_at_any_write_point_leaves_a_whole_checkpoint(
    forkserver: ForkServerContext, tmp_path: Path, point: str
) -> None:
    directory = tmp_path / "checkpoints"
    seed_full_write(directory, 3)
    child = forkserver.Process(
        target=crash_child.write_new_epoch_exiting_at, args=(str(directory), 3, point, 1)
    )
    child.start()
    child.join(REPORT_DEADLINE_S)
    assert child.exitcode == EXIT_STATUS
    reopened = reopen_and_inspect(directory, 3)
    assert reopened.restored_ok and reopened.restored_epoch in (6, NEW_EPOCH)
    assert reopened.committed_epochs in WHOLE_OUTCOMES and reopened.all_committed_verify
    assert reopened.leftover_files == ()
    shutil.rmtree(directory)
