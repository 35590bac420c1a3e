"""Where training is: the data position and step counters (R6.2), a document in every snapshot.

The loop owns it and moves it forward; a restore (rollback, resume) replaces it with the
snapshot's, and the loop simply carries on from there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tolaria_trainer.protocols import JsonDict


@dataclass
class Position:
    """Epoch, next batch within it, optimizer steps taken, epochs completed."""

    epoch: int = 0
    next_batch: int = 0
    global_step: int = 0
    epochs_completed: int = 0

    def state_dict(self) -> JsonDict:
        """Checkpoint behavior: the four counters, restored exactly."""
        return {
            "epoch": self.epoch,
            "next_batch": self.next_batch,
            "global_step": self.global_step,
            "epochs_completed": self.epochs_completed,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.next_batch = int(state["next_batch"])
        self.global_step = int(state["global_step"])
        self.epochs_completed = int(state["epochs_completed"])
