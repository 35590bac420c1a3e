"""The rollback budget's memory: what recovery has done so far, per epoch, window and run.

`RecoveryLedger` is the planner's history (R13.3): rollbacks per anomaly epoch, in the run and
since the last clean epoch; every data window an anomaly was blamed on, how often and whether it
was skipped; and the window the last rollback replayed. It is a JSON document in every snapshot
(so a crash-resumed trainer keeps its budget) and, like the run history, survives rollbacks: a
rollback never undoes the fact that it happened. Bounded, so snapshots stay small.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from leyline import ReplayPolicy
from tolaria_trainer.protocols import JsonDict
from tolaria_trainer.recovery.planner import WHOLE_EPOCH, Window, WindowRecord

LEDGER_DOCUMENT = "recovery"
WINDOWS_KEPT = 256
"""Epoch windows remembered; an anomaly in an epoch older than these is treated as new (it
was hundreds of anomalies ago), which keeps every snapshot's document small."""
SUSPECT_STEPS = 8
"""Failing steps whose samples are remembered: a later failing step sharing samples with one
of them blames those samples (a poisoned sample seen again in another batch)."""
SUSPECT_SAMPLES = 16_384
"""At most this many suspect sample indexes are kept (oldest steps dropped first), bounding
the snapshot document whatever the batch size."""
QUARANTINE_LIMIT = 4_096
"""Samples recovery may take out of training; a run needing more is not failing on a few
bad samples, and the planner halts it instead (R13.3)."""


@dataclass(frozen=True)
class ReplayedWindow:
    """The batches the last rollback will run again (replay or reshuffle policy)."""

    epoch: int
    first_batch: int
    last_batch: int

    def holds(self, epoch: int, batch: int) -> bool:
        return epoch == self.epoch and self.first_batch <= batch <= self.last_batch


@dataclass
class RecoveryLedger:
    """See the module docstring."""

    rollbacks_by_epoch: dict[int, int] = field(default_factory=dict)
    rollbacks_in_run: int = 0
    rollbacks_without_progress: int = 0
    windows: dict[int, WindowRecord] = field(default_factory=dict)
    """Epoch-level windows by epoch."""
    suspects: list[list[int]] = field(default_factory=list)
    """Samples of the last failing steps, oldest first."""
    quarantine: dict[int, int] = field(default_factory=dict)
    """Sample index -> first epoch it is left out of."""
    replayed: ReplayedWindow | None = None

    def _suspect_set(self) -> set[int]:
        return {i for step in self.suspects for i in step}

    def window_record(self, window: Window | None) -> WindowRecord:
        if window is None:
            return WindowRecord()
        if window.batch == WHOLE_EPOCH:
            return self.windows.get(window.epoch, WindowRecord())
        shared = window.samples & self._suspect_set()
        return WindowRecord(failures=1 if shared else 0)

    def inside_replayed(self, window: Window | None) -> bool:
        """A different window inside the batches the last rollback replays."""
        if window is None or self.replayed is None or window.batch == WHOLE_EPOCH:
            return False
        first_failure = not (window.samples & self._suspect_set())
        return first_failure and self.replayed.holds(window.epoch, window.batch)

    def can_quarantine(self, window: Window | None) -> bool:
        """Whether the samples this window shares with earlier failures still fit the limit."""
        if window is None or window.batch == WHOLE_EPOCH:
            return True
        shared = window.samples & self._suspect_set()
        return len(set(self.quarantine) | shared) <= QUARANTINE_LIMIT

    def quarantined(self, epoch: int) -> frozenset[int]:
        """Samples left out of training in `epoch`."""
        return frozenset(i for i, first in self.quarantine.items() if first <= epoch)

    def rolled_back(
        self,
        *,
        epoch: int,
        window: Window | None,
        policy: ReplayPolicy.ValueType,
        replayed: ReplayedWindow | None,
    ) -> None:
        """Counts one successful rollback for an anomaly of `epoch` blamed on `window`."""
        self.rollbacks_by_epoch[epoch] = self.rollbacks_by_epoch.get(epoch, 0) + 1
        self.rollbacks_in_run += 1
        self.rollbacks_without_progress += 1
        if window is not None and window.batch == WHOLE_EPOCH:
            before = self.windows.pop(window.epoch, WindowRecord())
            self.windows[window.epoch] = WindowRecord(
                failures=before.failures + 1,
                skipped=before.skipped or policy == ReplayPolicy.REPLAY_POLICY_SKIP,
            )
            while len(self.windows) > WINDOWS_KEPT:
                del self.windows[next(iter(self.windows))]
        elif window is not None and window.samples:
            for sample in window.samples & self._suspect_set():
                self.quarantine.setdefault(sample, epoch + 1)  # from the next epoch on
            self.suspects.append(sorted(window.samples))
            while len(self.suspects) > SUSPECT_STEPS or (
                len(self.suspects) > 1 and sum(map(len, self.suspects)) > SUSPECT_SAMPLES
            ):
                del self.suspects[0]
        self.replayed = replayed if policy != ReplayPolicy.REPLAY_POLICY_SKIP else None

    def epoch_completed(self, *, trained_steps: int) -> None:
        """An epoch validated without an anomaly: progress when it trained at least a step."""
        if trained_steps > 0:
            self.rollbacks_without_progress = 0
            self.replayed = None

    def state_dict(self) -> JsonDict:
        """Checkpoint behavior: every counter and window, so a resumed trainer keeps its
        budget."""
        return {
            "by_epoch": {str(k): v for k, v in self.rollbacks_by_epoch.items()},
            "in_run": self.rollbacks_in_run,
            "without_progress": self.rollbacks_without_progress,
            "windows": [[e, r.failures, int(r.skipped)] for e, r in self.windows.items()],
            "suspects": self.suspects,
            "quarantine": [[i, e] for i, e in sorted(self.quarantine.items())],
            "replayed": None
            if self.replayed is None
            else [self.replayed.epoch, self.replayed.first_batch, self.replayed.last_batch],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rollbacks_by_epoch = {int(k): int(v) for k, v in state["by_epoch"].items()}
        self.rollbacks_in_run = int(state["in_run"])
        self.rollbacks_without_progress = int(state["without_progress"])
        self.windows = {int(e): WindowRecord(int(f), bool(s)) for e, f, s in state["windows"]}
        self.suspects = [[int(i) for i in step] for step in state["suspects"]]
        self.quarantine = {int(i): int(e) for i, e in state["quarantine"]}
        replayed = state["replayed"]
        self.replayed = None if replayed is None else ReplayedWindow(*(int(v) for v in replayed))
