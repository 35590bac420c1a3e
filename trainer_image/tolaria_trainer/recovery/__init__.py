"""The trainer's recovery wing (R6, R7, R13): snapshots, both rollback tiers, crash resume,
emergencies and halts, decided by one pure planner.

The loop meets only `Recovery` (the facade) and its `Response`. Inside: `planner` (facts in,
decision out), `ledger` (the rollback budget's memory), `tiers` (fast: shared memory; full:
durable checkpoints), `restore` (all-or-nothing restores), `snapshots` (the background
snapshot writer), `slotio` (bytes in and out of slots), `reports` (one rollback report
builder), `emergencies`, `participant` (the emergency watcher), `link` (the sidecar client).
"""

from tolaria_trainer.recovery.facade import Recovery, Response, ResumeImpossible
from tolaria_trainer.recovery.ledger import LEDGER_DOCUMENT, RecoveryLedger
from tolaria_trainer.recovery.link import SidecarLink, SidecarUnavailable

__all__ = [
    "LEDGER_DOCUMENT",
    "Recovery",
    "RecoveryLedger",
    "Response",
    "ResumeImpossible",
    "SidecarLink",
    "SidecarUnavailable",
]
