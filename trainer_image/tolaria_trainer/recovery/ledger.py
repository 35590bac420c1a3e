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
from tolaria_trainer.recovery.planner import Window, WindowRecord

LEDGER_DOCUMENT = "recovery"
WINDOWS_KEPT = 256
"""Windows remembered; an anomaly in a window older than these is treated as new (it was
hundreds of anomalies ago), which keeps every snapshot's document small."""


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
    windows: dict[Window, WindowRecord] = field(default_factory=dict)
    replayed: ReplayedWindow | None = None

    def window_record(self, window: Window | None) -> WindowRecord:
        return WindowRecord() if window is None else self.windows.get(window, WindowRecord())

    def inside_replayed(self, window: Window | None) -> bool:
        """A different window inside the batches the last rollback replays."""
        if window is None or self.replayed is None:
            return False
        return window not in self.windows and self.replayed.holds(window.epoch, window.batch)

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
        if window is not None:
            before = self.windows.pop(window, WindowRecord())
            self.windows[window] = WindowRecord(
                failures=before.failures + 1,
                skipped=before.skipped or policy == ReplayPolicy.REPLAY_POLICY_SKIP,
            )
            while len(self.windows) > WINDOWS_KEPT:
                del self.windows[next(iter(self.windows))]
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
            "windows": [
                [w.epoch, w.batch, r.failures, int(r.skipped)] for w, r in self.windows.items()
            ],
            "replayed": None
            if self.replayed is None
            else [self.replayed.epoch, self.replayed.first_batch, self.replayed.last_batch],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rollbacks_by_epoch = {int(k): int(v) for k, v in state["by_epoch"].items()}
        self.rollbacks_in_run = int(state["in_run"])
        self.rollbacks_without_progress = int(state["without_progress"])
        self.windows = {
            Window(int(e), int(b)): WindowRecord(int(f), bool(s)) for e, b, f, s in state["windows"]
        }
        replayed = state["replayed"]
        self.replayed = None if replayed is None else ReplayedWindow(*(int(v) for v in replayed))
