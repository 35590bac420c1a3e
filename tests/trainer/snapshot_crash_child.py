"""The child of the snapshot crash harness: the production writer, capturing until killed.

It maps real shared-memory slots, builds a small model and Adam state, and for step after
step overwrites every tensor (and a JSON document) with content that is a pure function of the
step, captures it with the production `SnapshotWriter` and fences it. Over a pipe it reports
each step it starts (ANNOUNCE), each write point it reaches (POINT) and each step whose
capture is committed (DONE), so the parent knows exactly what may be in the slots and where
its SIGKILL landed.
"""

from __future__ import annotations

import os
import signal
import struct
from collections.abc import Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from leyline import StateComponent
from leyline.shm import ControlBlock, Slot, control_name, slot_name
from leyline.spec import SnapshotSpec
from tolaria_trainer.recovery.snapshots import WRITE_POINTS, SnapshotWriter
from tolaria_trainer.state import TrainingState

INSTANCE = "snapshot-crash-harness"
SLOTS = 3
SLOT_CAPACITY = 256 * 1024
MANIFEST_CAPACITY = 64 * 1024
MESSAGE = struct.Struct("<II")
ANNOUNCE, POINT, DONE = 1, 2, 3
MAX_STEPS = 1_000_000


class Counter:
    """A JSON document: the step the state was last written for."""

    def __init__(self) -> None:
        self.value = 0

    def save(self) -> dict[str, Any]:
        return {"value": self.value}

    def load(self, doc: Mapping[str, Any]) -> None:
        self.value = int(doc["value"])


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer, Counter, TrainingState]:
    """The same model, optimizer (with Adam state) and document in parent and child."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.ones(2, 16)).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    names = dict(model.named_parameters())
    counter = Counter()
    state = TrainingState(
        model=model,
        optimizer=lambda: opt,
        parameter_names=lambda: names,
        documents={"counter": (StateComponent.STATE_COMPONENT_DATA, (counter.save, counter.load))},
    )
    return model, opt, counter, state


def tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every captured tensor but the RNG, in a fixed order."""
    out = [t for t in model.state_dict(keep_vars=True).values()]
    for p in model.parameters():
        out += [v for _, v in sorted(opt.state[p].items())]
    return [t.detach() for t in out]


def write_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, counter: Counter, step: int
) -> None:
    """Overwrites the state with the content of `step` (a pure function of the step)."""
    generator = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for t in tensors(model, opt):
            t.copy_(torch.rand(t.shape, generator=generator, dtype=torch.float64).to(t.dtype))
    torch.manual_seed(step)  # the RNG state is captured too
    counter.value = step


class _Reporting:
    """Faults that report each write point to the parent before passing it, and SIGKILL this
    process at the `nth` arrival at `kill_point` (a kill that lands exactly there)."""

    def __init__(self, conn: Connection, kill_point: str, nth: int) -> None:
        self._conn = conn
        self._kill_point = kill_point
        self._left = nth

    def hit(self, point: str) -> None:
        self._conn.send_bytes(MESSAGE.pack(POINT, WRITE_POINTS.index(point)))
        if point == self._kill_point:
            self._left -= 1
            if self._left == 0:
                os.kill(os.getpid(), signal.SIGKILL)


def capture_forever(
    directory: str, start: int, kill_point: str, kill_nth: int, conn: Connection
) -> None:
    """Captures step after step from `start` until killed (by the parent, or by itself at the
    `kill_nth` arrival at `kill_point`; "" for none)."""
    os.environ["TOLARIA_SHM_DIR"] = directory
    base = Path(directory)
    control = ControlBlock.attach(base / control_name(INSTANCE), instance_id=INSTANCE)
    slots = [Slot.attach(base / slot_name(INSTANCE, i), instance_id=INSTANCE) for i in range(SLOTS)]
    model, opt, counter, state = build()
    writer = SnapshotWriter(
        state=state,
        slots=slots,
        control=control,
        spec=SnapshotSpec(),
        commit=lambda slot, generation: "",
        run_id="harness",
        window=8,
        faults=_Reporting(conn, kill_point, kill_nth),
    )
    for step in range(start, start + MAX_STEPS):
        write_step(model, opt, counter, step)
        conn.send_bytes(MESSAGE.pack(ANNOUNCE, step))
        writer.capture(global_step=step, epoch=0, batch_index=step, epoch_end=False)
        writer.fence()
        conn.send_bytes(MESSAGE.pack(DONE, step))
