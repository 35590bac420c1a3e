"""The `Faults` the sidecar hands its durable store: the check, right after a persist has
copied a slot into the checkpoint file, that the trainer did not overwrite the slot meanwhile,
with the `checkpoint-io-error@epoch=N` drills armed at the same point.

Built once by the `Sidecar` and given to `checkpoints.DurableStore` (as its `faults`) and to
`persistence.CheckpointWriter` (which wraps each write in `guarding`). A changed slot raises
`Overwritten` inside the store's write, so the store abandons that checkpoint (WAL ABORT) and
the previous one stays the latest. The guard never reads or writes a slot itself and never
makes anything durable: the check is a callable the writer supplies.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from tolaria_sidecar.checkpoints import WRITE_POINTS as CHECKPOINT_WRITE_POINTS
from tolaria_sidecar.config import CheckpointDrill
from tolaria_sidecar.faults import Faults

AFTER_COPY_POINT = "checkpoint.after_data_write"
"""The store's write point right after the data is copied into the file: where the slot's
generation is checked again before anything is made durable."""
if AFTER_COPY_POINT not in CHECKPOINT_WRITE_POINTS:
    raise ImportError(f"checkpoints.WRITE_POINTS no longer has {AFTER_COPY_POINT!r}")


class Overwritten(OSError):
    """Raised inside the store's write so that it abandons the checkpoint (WAL ABORT)."""


class PersistGuard(Faults):
    """The `Faults` handed to the `DurableStore`: runs the writer's overwrite check at
    `AFTER_COPY_POINT`, and arms the `checkpoint-io-error@epoch=N` drills."""

    def __init__(self, drills: Sequence[CheckpointDrill] = ()) -> None:
        super().__init__()
        self._drills = tuple(drills)
        self._check: Callable[[], None] | None = None
        self.drills_armed: list[CheckpointDrill] = []

    def hit(self, point: str) -> None:
        if point == AFTER_COPY_POINT and self._check is not None:
            self._check()
        super().hit(point)

    @contextmanager
    def guarding(self, check: Callable[[], None], *, epoch: int) -> Iterator[None]:
        """Runs `check` after the copy of the write made inside the block; arms the drills
        of `epoch`."""
        for drill in self._drills:
            if drill.epoch == epoch:
                self.drills_armed.append(drill)
                self.fail_at(
                    AFTER_COPY_POINT,
                    OSError(errno.ENOSPC, f"{drill.raw}: injected {errno.errorcode[errno.ENOSPC]}"),
                )
        self._check = check
        try:
            yield
        finally:
            self._check = None
            self._fail.pop(AFTER_COPY_POINT, None)  # a drill the write never reached
