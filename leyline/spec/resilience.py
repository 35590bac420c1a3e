"""`spec.snapshots`, `spec.rollback`, `spec.detection`, `spec.emergency`, `spec.checkpoints`,
`spec.restarts`: the two rollback tiers and the emergency protocol (R6, R7, R12)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from leyline.spec.base import ProtoEnum, Rule, SpecModel
from leyline.v1.resilience_pb2 import ReplayPolicy

_REPLAY = ProtoEnum(ReplayPolicy, strip="REPLAY_POLICY_")


class SnapshotSpec(SpecModel):
    """`spec.snapshots`: the fast tier's shared-memory snapshots (R6.1, R6.2)."""

    every_steps: int = Field(default=50, ge=0, le=10_000_000)
    """Snapshot every N optimizer steps (0: only at epoch ends). The copy runs in the
    background and is fenced by the next optimizer step, so it never sits in the hook."""
    at_epoch_end: bool = True
    """Also snapshot after the last step of every epoch."""
    slots: int = Field(default=5, ge=2, le=32)
    """Snapshot slots kept by the sidecar, newest first (LRU, R12: 5)."""
    max_bytes: int = Field(default=0, ge=0)
    """Byte budget for all slots (0: no budget beyond `slots`); fewer slots are made if needed."""
    headroom_ratio: float = Field(default=0.25, ge=0.0, le=10.0)
    """Spare capacity per slot over the declared state size, so seeds can add parameters."""
    enabled: bool = True
    """Off: no fast tier; SEVERE anomalies go straight to the full tier."""


class RollbackSpec(SpecModel):
    """`spec.rollback`: budgets and policy of both tiers (R6.1, R6.1a, R6.3)."""

    fast_ms: float = Field(default=500.0, gt=0.0, le=600_000.0)
    """Fast rollback end to end (R6.1)."""
    prepare_ms: float = Field(default=150.0, gt=0.0, le=600_000.0)
    """Pick and verify the newest valid snapshot older than the anomaly."""
    commit_ms: float = Field(default=250.0, gt=0.0, le=600_000.0)
    """Copy the snapshot into the live tensors and restore every component."""
    confirm_ms: float = Field(default=100.0, gt=0.0, le=600_000.0)
    """Verify the restored state and resume."""
    full_deadline_seconds: float = Field(default=12.0, gt=0.0, le=86_400.0)
    """Full rollback from the last durable checkpoint (R6.3); a miss escalates (R6.5)."""
    replay_policy: Annotated[int, _REPLAY] = ReplayPolicy.REPLAY_POLICY_SKIP
    """Batches between the restored snapshot and a data-dependent anomaly: skip them (the
    large-model practice), replay them, or reshuffle the rest of the epoch (R6.1a). The same
    window failing again is skipped whatever this says, then halts."""
    max_per_epoch: int = Field(default=3, ge=1, le=1000)
    """Rollbacks, of every tier and cause, for anomalies of one epoch; one more halts the run
    (R13.3: no rollback loops)."""
    max_without_progress: int = Field(default=6, ge=1, le=100_000)
    """Rollbacks since the last epoch that trained and validated cleanly; one more halts the
    run. Twice `maxPerEpoch`: a fault that follows the run from epoch to epoch (skipping its
    data does not help) ends within two epochs' budgets."""
    max_per_run: int = Field(default=100, ge=1, le=1_000_000)
    """Rollbacks in the whole run (every tier and cause); one more halts it. Generous: a long
    run survives occasional spikes for weeks; a run needing more is not converging."""

    rules = (
        Rule(
            field="fastMs",
            message="must be >= prepareMs + commitMs + confirmMs",
            cel="self.fastMs >= self.prepareMs + self.commitMs + self.confirmMs",
            holds=lambda s: s.fast_ms + 1e-9 >= s.prepare_ms + s.commit_ms + s.confirm_ms,
        ),
    )


class DetectionSpec(SpecModel):
    """`spec.detection`: when an anomaly becomes an emergency (R7.2)."""

    loss_explosion_factor: float = Field(default=15.0, gt=1.0, le=1e9)
    """SEVERE when a step's loss exceeds this multiple of the running median (R12: 15x)."""
    median_window: int = Field(default=50, ge=3, le=100_000)
    """Steps in the running median."""
    warmup_steps: int = Field(default=4, ge=1, le=10_000_000)
    """Losses seen before the explosion check starts: the median of the first 4 is already a
    fair reference, so an explosion is caught from step 5 on (R13.4)."""
    accuracy_collapse_ratio: float = Field(default=0.5, gt=0.0, lt=1.0)
    """MAJOR when validation accuracy falls below this fraction of the best so far."""
    stall_seconds: float = Field(default=120.0, gt=0.0, le=86_400.0)
    """CRITICAL when the trainer's heartbeat (every step and validation batch) stops this long."""
    breaker_storm_trips: int = Field(default=5, ge=1, le=10_000)
    """CRITICAL when this many breakers trip within one epoch."""
    sustained_breach_epochs: int = Field(default=3, ge=1, le=10_000)
    """MINOR when the hook breaches its budget this many epochs in a row."""
    check_gradients: bool = True
    """Also check every step's gradients for inf/NaN (one fused norm pass over the gradients)."""


class EmergencySpec(SpecModel):
    """`spec.emergency`: response budgets of the four levels and the halt (R7.1, R7.4)."""

    minor_ms: float = Field(default=5000.0, gt=0.0, le=3_600_000.0)
    """MINOR: log and adjust; acknowledged within this."""
    major_ms: float = Field(default=2000.0, gt=0.0, le=3_600_000.0)
    """MAJOR: full rollback and checkpoint; acknowledged within this."""
    severe_ms: float = Field(default=500.0, gt=0.0, le=3_600_000.0)
    """SEVERE: fast rollback and alert; acknowledged within this."""
    critical_ms: float = Field(default=100.0, gt=0.0, le=3_600_000.0)
    """CRITICAL: freeze and signal every participant; acknowledged within this."""
    halt_after_seconds: float = Field(default=30.0, gt=0.0, le=86_400.0)
    """An unresolved CRITICAL halts the run after this: last snapshot kept, durable checkpoint
    attempted, exit code 3 (R7.4)."""

    rules = (
        Rule(
            field="criticalMs",
            message="must be <= severeMs <= majorMs <= minorMs",
            cel="self.criticalMs <= self.severeMs && self.severeMs <= self.majorMs"
            " && self.majorMs <= self.minorMs",
            holds=lambda s: s.critical_ms <= s.severe_ms <= s.major_ms <= s.minor_ms,
        ),
    )


class CheckpointSpec(SpecModel):
    """`spec.checkpoints`: durable checkpoints written by the sidecar (R6.3)."""

    every_epochs: int = Field(default=1, ge=0, le=1_000_000)
    """Persist the epoch-end snapshot every N epochs (0: only on request, halt and suspend)."""
    keep: int = Field(default=3, ge=1, le=1000)
    """Committed checkpoints kept; older ones are deleted after a newer one commits."""
    wal_append_ms: float = Field(default=10.0, gt=0.0, le=600_000.0)
    """Budget of one WAL record append (R12)."""
    wal_rotate_bytes: int = Field(default=100 * 1024 * 1024, ge=64 * 1024)
    """The WAL is compacted to its live records past this size."""
    directory: str = Field(default="", max_length=4096)
    """Where checkpoints and the WAL live; empty: `<workdir>/<run>/checkpoints` locally, the
    checkpoint volume in a pod."""


class RestartSpec(SpecModel):
    """`spec.restarts`: how often a crashed trainer is restarted (R10.2)."""

    limit: int = Field(default=3, ge=0, le=1000)
    """Trainer restarts (crashes, kills) before the run fails; preemption does not count."""
