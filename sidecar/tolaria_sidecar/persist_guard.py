"""The `Faults` the sidecar hands its durable store: the check, right after a persist has
copied a slot into the checkpoint file, that the trainer did not overwrite the slot meanwhile,
with the checkpoint drills (`checkpoint-io-error`, `slow-checkpoint`, `corrupt-checkpoint`)
armed at the same writes.

Built once by the `Sidecar` and given to `checkpoints.DurableStore` (as its `faults`) and to
`persistence.CheckpointWriter` (which wraps each write in `guarding`). A changed slot raises
`Overwritten` inside the store's write, so the store abandons that checkpoint (WAL ABORT) and
the previous one stays the latest. The guard never reads or writes a slot itself and never
makes anything durable: the check is a callable the writer supplies.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tolaria_sidecar.checkpoints import WRITE_POINTS as CHECKPOINT_WRITE_POINTS
from tolaria_sidecar.config import CORRUPT_CHECKPOINT, SLOW_CHECKPOINT, CheckpointDrill
from tolaria_sidecar.faults import Faults

logger = logging.getLogger(__name__)

AFTER_COPY_POINT = "checkpoint.after_data_write"
"""The store's write point right after the data is copied into the file: where the slot's
generation is checked again before anything is made durable."""
DAMAGE_POINT = "checkpoint.after_dir_fsync"
"""Where the corrupt-checkpoint drill damages the file: renamed and durable, not yet committed
in the WAL, so no load can see it whole."""
for _point in (AFTER_COPY_POINT, DAMAGE_POINT):
    if _point not in CHECKPOINT_WRITE_POINTS:
        raise ImportError(f"checkpoints.WRITE_POINTS no longer has {_point!r}")


class Overwritten(OSError):
    """Raised inside the store's write so that it abandons the checkpoint (WAL ABORT)."""


class PersistGuard(Faults):
    """The `Faults` handed to the `DurableStore`: runs the writer's overwrite check at
    `AFTER_COPY_POINT`, arms the `checkpoint-io-error@epoch=N` drills and runs the
    `slow-checkpoint@epoch=N` and `corrupt-checkpoint@epoch=N` ones (on the persister thread,
    never a servicer's)."""

    def __init__(
        self, drills: Sequence[CheckpointDrill] = (), directory: Path | None = None
    ) -> None:
        """`directory`: where the checkpoint files are (for `corrupt-checkpoint`)."""
        super().__init__()
        self._drills = tuple(drills)
        self._directory = directory
        self._check: Callable[[], None] | None = None
        self._damage_epoch: int | None = None
        self.drills_armed: list[CheckpointDrill] = []

    def hit(self, point: str) -> None:
        if point == AFTER_COPY_POINT and self._check is not None:
            self._check()
        if point == DAMAGE_POINT and self._damage_epoch is not None:
            self._damage(self._damage_epoch)
            self._damage_epoch = None
        super().hit(point)

    @contextmanager
    def guarding(self, check: Callable[[], None], *, epoch: int) -> Iterator[None]:
        """Runs `check` after the copy of the write made inside the block; arms the drills
        of `epoch`."""
        for drill in self._drills:
            if drill.epoch == epoch and drill.name == CORRUPT_CHECKPOINT:
                self.drills_armed.append(drill)
                self._damage_epoch = epoch
            elif drill.epoch == epoch and drill.name == SLOW_CHECKPOINT:
                self.drills_armed.append(drill)
                logger.warning("drill %s: checkpoint write waits %.1f s", drill.raw, drill.seconds)
                time.sleep(drill.seconds)
            elif drill.epoch == epoch:
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
            self._damage_epoch = None
            self._fail.pop(AFTER_COPY_POINT, None)  # a drill the write never reached

    def _damage(self, epoch: int) -> None:
        """The `corrupt-checkpoint` drill: flips bytes at the end of the file just written for
        `epoch` (its data), after its rename and before its WAL commit, as bit rot would; the
        checkpoint commits, and a load rejects it by its checksum."""
        if self._directory is None:
            return
        written = sorted(self._directory.glob(f"ckpt-*-e{epoch}.bin"))
        if not written:
            return
        path = written[-1]  # the highest sequence: this write's
        with path.open("r+b") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - 64))
            damaged = bytes(b ^ 0xFF for b in f.read(4))
            f.seek(max(0, size - 64))
            f.write(damaged)
        logger.warning("drill corrupt-checkpoint@epoch=%d: damaged %s", epoch, path.name)
