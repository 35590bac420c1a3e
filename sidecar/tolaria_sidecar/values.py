"""Plain values the slot jobs answer with: the fast tier's feasibility, a row of the slot
table, a checkpoint loaded into a slot, the outcome of a durable write.

Made by `bandwidth`, `slot_table`, `loading` and the persister (`workers`); read by the
servicers, the background workers and the seams in `protocols`. Frozen data with no
behaviour beyond unit conversion; imports nothing of the sidecar but its errors, so every
module may name them without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

from leyline import CheckpointRecord, CheckpointRejection, RollbackPhaseTiming
from leyline.v1.sidecar_pb2 import SlotInfo
from tolaria_sidecar.errors import PersistFailed


@dataclass(frozen=True)
class Feasibility:
    """Whether the fast tier can copy the state within its commit budget (R6.1)."""

    fast_tier_feasible: bool
    degraded_reason: str
    copy_bytes_per_second: float

    @property
    def copy_gbps(self) -> float:
        return self.copy_bytes_per_second / 1e9


@dataclass(frozen=True)
class SlotEntry:
    """One committed slot as the table shows it (newest generation first)."""

    index: int
    generation: int
    global_step: int
    epoch: int
    flags: int
    committed_ns: int
    verified: bool
    rejected: bool
    durable: bool
    pinned: bool


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint put into a slot for a full rollback."""

    slot: SlotInfo
    record: CheckpointRecord
    phases: list[RollbackPhaseTiming]
    rejections: list[CheckpointRejection]


PersistOutcome = CheckpointRecord | PersistFailed
"""What one durable write of a slot came to: its WAL record, or why it failed."""
