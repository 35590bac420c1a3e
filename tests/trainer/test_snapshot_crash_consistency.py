"""SIGKILL at every write point of the production snapshot writer (R6.2, R13.2).

A child (`snapshot_crash_child`) captures state after state into real shared-memory slots
with the production `SnapshotWriter`, reporting every step it starts, every write point it
reaches and every capture committed. The parent kills it at a random moment, then restores
with the production `Restorer` into a freshly built state, exactly as a restarted trainer
does, and checks:

* torn: the restored state is not, tensor for tensor and byte for byte (RNG and documents
  included), the content of a committed or the in-flight step;
* lost: the restored step is older than the newest committed one (the writer only ever
  overwrites the least recent slot, so the newest commit must survive a kill).

Both must be 0. The share of kills per write point is printed and recorded, so the harness
shows it covers them all. `TOLARIA_SLOW=1` runs 1000 trials instead of 200.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter as Tally
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.context import ForkServerContext
from pathlib import Path

import pytest
import torch

from leyline.shm import ControlBlock, Slot, control_name, slot_name
from tests.forkserver import forkserver_context
from tests.trainer import snapshot_crash_child as child
from tolaria_trainer.recovery.restore import NothingToRestore, Restorer
from tolaria_trainer.recovery.snapshots import WRITE_POINTS

SLOW = os.environ.get("TOLARIA_SLOW") == "1"
TRIALS = int(os.environ.get("TOLARIA_SNAPSHOT_TRIALS", "0")) or (1000 if SLOW else 200)
REPORT_DEADLINE_S = 60.0
"""Only a bound that turns a hung child into a failure, never a timing assertion."""
MAX_MESSAGES_BEFORE_KILL = 24
KILL_JITTER_S = 0.002
"""Past the last seen report: spans a whole small capture, so kills land everywhere in it."""
BEFORE_ANY_POINT = "(before the first write point of a capture)"


@dataclass
class Ledger:
    done: set[int] = field(default_factory=set)
    in_flight: int | None = None
    next_step: int = 1
    last_point: str = BEFORE_ANY_POINT
    landed: Tally[str] = field(default_factory=Tally)
    trials: int = 0
    torn: int = 0
    lost: int = 0
    in_flight_survived: int = 0

    def record(self, kind: int, value: int) -> None:
        if kind == child.ANNOUNCE:
            self.in_flight = value
            self.next_step = max(self.next_step, value + 1)
            self.last_point = BEFORE_ANY_POINT
        elif kind == child.POINT:
            self.last_point = WRITE_POINTS[value]
        elif kind == child.DONE:
            self.done.add(value)
            self.in_flight = None
            self.last_point = "(between captures)"


@pytest.fixture
def forkserver() -> ForkServerContext:
    """Children forked from a server that has already imported what they need (ms, not s)."""
    return forkserver_context()


def kill_at_random(
    context: ForkServerContext, directory: Path, ledger: Ledger, rng: random.Random
) -> None:
    """Half the trials: the child SIGKILLs itself at a chosen write point (its 1st-3rd
    arrival there). The other half: the parent SIGKILLs it at a random moment."""
    aimed = rng.random() < 0.5
    point, nth = (rng.choice(WRITE_POINTS), rng.randint(1, 3)) if aimed else ("", 0)
    reader, writer = context.Pipe(duplex=False)
    proc = context.Process(
        target=child.capture_forever,
        args=(str(directory), ledger.next_step, point, nth, writer),
        daemon=True,
    )
    proc.start()
    writer.close()
    if aimed:
        proc.join(REPORT_DEADLINE_S)  # it kills itself; its reports stay in the pipe
        if proc.exitcode is None:
            proc.kill()
            raise AssertionError(f"the child never reached {point} #{nth}")
    else:
        for _ in range(rng.randrange(MAX_MESSAGES_BEFORE_KILL + 1)):
            if not reader.poll(REPORT_DEADLINE_S):
                proc.kill()
                raise AssertionError(f"no report within {REPORT_DEADLINE_S} s")
            ledger.record(*child.MESSAGE.unpack(reader.recv_bytes()))
        time.sleep(rng.uniform(0, KILL_JITTER_S))  # where the kill lands; nothing waits on it
        proc.kill()
    proc.join(REPORT_DEADLINE_S)
    assert proc.exitcode == -signal.SIGKILL, f"child ended by itself: {proc.exitcode}"
    while reader.poll(0):
        try:
            ledger.record(*child.MESSAGE.unpack(reader.recv_bytes()))
        except EOFError:
            break
    reader.close()
    ledger.landed[ledger.last_point] += 1
    ledger.trials += 1


def check_restore(directory: Path, ledger: Ledger) -> None:
    model, opt, counter, state = child.build()
    control = ControlBlock.attach(
        directory / control_name(child.INSTANCE), instance_id=child.INSTANCE
    )
    slots = [
        Slot.attach(directory / slot_name(child.INSTANCE, i), instance_id=child.INSTANCE)
        for i in range(child.SLOTS)
    ]
    try:
        try:
            restored = Restorer(state=state, control=control).restore(
                slots, max_step=None, budgets_ms=(1e5, 1e5, 1e5)
            )
        except NothingToRestore:
            if ledger.done:
                ledger.lost += 1
            return
        step = restored.global_step
        candidates = ledger.done | ({ledger.in_flight} if ledger.in_flight is not None else set())
        got = [t.clone() for t in child.tensors(model, opt)]
        rng = torch.get_rng_state()
        want_model, want_opt, want_counter, _ = child.build()
        child.write_step(want_model, want_opt, want_counter, step)
        whole = (
            all(
                torch.equal(a, b)
                for a, b in zip(got, child.tensors(want_model, want_opt), strict=True)
            )
            and torch.equal(rng, torch.get_rng_state())
            and counter.value == step
        )
        if step not in candidates or not whole:
            ledger.torn += 1
        if ledger.done and step < max(ledger.done):
            ledger.lost += 1
        if step == ledger.in_flight:
            ledger.done.add(step)
            ledger.in_flight_survived += 1
        ledger.in_flight = None
    finally:
        for segment in (*slots, control):
            segment.close()


@pytest.mark.req("R6.2")
@pytest.mark.timeout(180 + 2 * TRIALS)
def test_a_snapshot_writer_killed_at_any_point_never_serves_a_torn_or_loses_a_committed_state(
    forkserver: ForkServerContext,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    record_property: Callable[[str, object], None],
) -> None:
    monkeypatch.setenv("TOLARIA_SHM_DIR", str(tmp_path))
    ControlBlock.create(
        tmp_path / control_name(child.INSTANCE), child.SLOTS, instance_id=child.INSTANCE
    ).close()
    for index in range(child.SLOTS):
        Slot.create(
            tmp_path / slot_name(child.INSTANCE, index),
            index,
            child.SLOT_CAPACITY,
            child.MANIFEST_CAPACITY,
            prefault=True,
            instance_id=child.INSTANCE,
        ).close()
    rng = random.Random(20261203)
    ledger = Ledger()
    for _ in range(TRIALS):
        kill_at_random(forkserver, tmp_path, ledger, rng)
        check_restore(tmp_path, ledger)
    shares = ", ".join(
        f"{point}: {100 * n / ledger.trials:.0f}%" for point, n in sorted(ledger.landed.items())
    )
    print(
        f"snapshots: {ledger.trials} SIGKILL trials, {len(ledger.done)} commits, "
        f"{ledger.in_flight_survived} in-flight captures survived whole; kills landed: {shares}; "
        f"torn restores {ledger.torn}, lost commits {ledger.lost}"
    )
    for point, n in ledger.landed.items():
        record_property(f"snapshot_kills_{point}", n)
    record_property("snapshot_trials", ledger.trials)
    record_property("snapshot_torn_restores", ledger.torn)
    record_property("snapshot_lost_commits", ledger.lost)
    assert (ledger.torn, ledger.lost) == (0, 0)
    assert set(WRITE_POINTS) <= set(ledger.landed), f"some write points never saw a kill: {shares}"
    assert len(ledger.done) > TRIALS // 4
