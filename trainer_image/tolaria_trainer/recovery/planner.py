"""The recovery planner: the facts of one anomaly in, one decision out (R6.1a, R7.1, R13.3).

A pure function, so one table of tests proves the whole escalation ladder. Everything the
decision depends on is in `Facts`: the anomaly, the run's rollback budget so far, what happened
to the same data window before, which tiers have a restore target, and which tiers already
failed for this anomaly. The caller (`recovery.facade.Recovery`) executes the decision and,
when a rollback fails, asks again with that tier added to `failed_tiers`; the ladder ends in
a successful rollback or a HALT with its reason, never in a loop.

The ladder:

1. MINOR is logged (LOG). CRITICAL freezes every participant until someone resolves it
   (FREEZE), or halts at once when nobody can coordinate it.
2. A rollback (SEVERE, MAJOR) first spends budget: one budget covers every tier and cause.
   More than `maxPerEpoch` rollbacks for anomalies of one epoch, more than
   `maxWithoutProgress` since the last epoch that trained and validated cleanly, or more than
   `maxPerRun` in the run halts (ROLLBACK_LOOP) instead of rolling back again.
3. The data window of the anomaly (the step's samples, or the whole epoch for an epoch-level
   anomaly): the first failure rolls back with the configured replay policy; the same data
   failing again (a replayed batch, or a later step sharing samples with an earlier failing
   one: a poisoned sample in another epoch's batch) rolls back and SKIPS it, whatever the
   policy, and the shared samples are quarantined for the rest of the run; an epoch that
   fails again after it was skipped halts. A different, data-dependent anomaly inside the
   window just replayed escalates SEVERE to MAJOR (R6.1a).
4. The tier: SEVERE tries the fast tier (shared memory), then the full tier (durable
   checkpoint); MAJOR the full tier, then the fast tier. A tier is used only if it has a
   target at or before the anomaly and has not failed for this anomaly. With no target left
   the run halts now (NO_ROLLBACK_TARGET), not after the CRITICAL timeout (R13.4).

Never does I/O, reads a clock or mutates its input.
"""

from __future__ import annotations

from dataclasses import dataclass

from leyline import AnomalyKind, EmergencyLevel, RecoveryAction, ReplayPolicy, RollbackTier

FAST = RollbackTier.ROLLBACK_TIER_FAST
FULL = RollbackTier.ROLLBACK_TIER_FULL
SEVERE = EmergencyLevel.EMERGENCY_LEVEL_SEVERE
MAJOR = EmergencyLevel.EMERGENCY_LEVEL_MAJOR
CRITICAL = EmergencyLevel.EMERGENCY_LEVEL_CRITICAL
MINOR = EmergencyLevel.EMERGENCY_LEVEL_MINOR
SKIP = ReplayPolicy.REPLAY_POLICY_SKIP
REPLAY = ReplayPolicy.REPLAY_POLICY_REPLAY
WHOLE_EPOCH = -1
"""`Window.batch` of an epoch-level anomaly (accuracy collapse): the epoch's every batch."""


@dataclass(frozen=True)
class Limits:
    """The budgets from `spec.rollback` (their defaults live in the spec, nowhere else)."""

    max_per_epoch: int
    max_without_progress: int
    max_per_run: int
    replay_policy: ReplayPolicy.ValueType


@dataclass(frozen=True)
class Window:
    """The data an anomaly is blamed on: the samples of one step (at a batch position of an
    epoch), or the whole epoch (an epoch-level anomaly such as an accuracy collapse)."""

    epoch: int
    batch: int
    samples: frozenset[int] = frozenset()

    def describe(self) -> str:
        if self.batch == WHOLE_EPOCH:
            return f"epoch {self.epoch}"
        return f"the samples of epoch {self.epoch} batch {self.batch}"


@dataclass(frozen=True)
class WindowRecord:
    """What happened to one window before: failures blamed on it (for samples: earlier failing
    steps that shared some of them), and whether it was skipped already."""

    failures: int = 0
    skipped: bool = False


@dataclass(frozen=True)
class Facts:
    """Everything one decision depends on."""

    level: EmergencyLevel.ValueType
    kind: AnomalyKind.ValueType
    detail: str
    step: int
    epoch: int
    data_dependent: bool
    window: Window | None
    """None for an anomaly no data window is to blame for (an operator's request)."""
    window_record: WindowRecord
    inside_replayed_window: bool
    """A different anomaly inside the window the last rollback replayed (R6.1a)."""
    can_quarantine: bool
    """The samples to quarantine for a repeat still fit the quarantine limit."""
    rollbacks_in_epoch: int
    rollbacks_without_progress: int
    rollbacks_in_run: int
    fast_target: int | None
    """Step of the newest unrejected snapshot a fast rollback would restore, or None."""
    full_target: int | None
    """Step of the newest committed checkpoint a full rollback would load, or None."""
    failed_tiers: frozenset[RollbackTier.ValueType]
    coordinated: bool
    """A sidecar can broadcast a CRITICAL freeze and have it resolved or halted."""
    limits: Limits


@dataclass(frozen=True)
class Decision:
    """What to do, at which level, and why (becomes a Leyline `RecoveryDecision`)."""

    action: RecoveryAction.ValueType
    level: EmergencyLevel.ValueType
    kind: AnomalyKind.ValueType
    reason: str
    tier: RollbackTier.ValueType = RollbackTier.ROLLBACK_TIER_UNSPECIFIED
    window_policy: ReplayPolicy.ValueType = ReplayPolicy.REPLAY_POLICY_UNSPECIFIED


def _halt(kind: AnomalyKind.ValueType, reason: str) -> Decision:
    return Decision(RecoveryAction.RECOVERY_ACTION_HALT, CRITICAL, kind, reason)


def plan(facts: Facts) -> Decision:
    """The decision for `facts`; see the module docstring for the ladder."""
    if facts.level <= MINOR:
        return Decision(RecoveryAction.RECOVERY_ACTION_LOG, MINOR, facts.kind, facts.detail)
    if facts.level >= CRITICAL:
        if facts.coordinated:
            return Decision(
                RecoveryAction.RECOVERY_ACTION_FREEZE, CRITICAL, facts.kind, facts.detail
            )
        return _halt(facts.kind, f"CRITICAL with no sidecar to coordinate it: {facts.detail}")
    if (budget := _over_budget(facts)) is not None:
        return budget
    level = facts.level
    reason = facts.detail
    policy = facts.limits.replay_policy if facts.data_dependent else REPLAY
    window = facts.window
    if window is not None:
        if facts.window_record.skipped:
            return _halt(
                AnomalyKind.ANOMALY_KIND_ROLLBACK_LOOP,
                f"{window.describe()} failed again after it was skipped: {facts.detail}",
            )
        if facts.window_record.failures:
            if not facts.can_quarantine:
                return _halt(
                    AnomalyKind.ANOMALY_KIND_ROLLBACK_LOOP,
                    f"{window.describe()} failed again and the quarantine of bad samples is "
                    f"full: {facts.detail}",
                )
            policy = SKIP
            reason = f"{window.describe()} failed again, so it is skipped: {facts.detail}"
        elif facts.inside_replayed_window and facts.data_dependent and level == SEVERE:
            level = MAJOR
            reason = f"second anomaly inside the replayed window: {facts.detail}"
    order = (FAST, FULL) if level == SEVERE else (FULL, FAST)
    for tier in order:
        if tier in facts.failed_tiers:
            continue
        target = facts.fast_target if tier == FAST else facts.full_target
        if target is None:
            continue
        # the full tier is MAJOR's action (R7.1): a SEVERE anomaly that needs it escalates
        effective = MAJOR if tier == FULL else level
        kind = (
            AnomalyKind.ANOMALY_KIND_FAST_ROLLBACK_FAILED
            if tier == FULL and FAST in facts.failed_tiers
            else facts.kind
        )
        return Decision(
            RecoveryAction.RECOVERY_ACTION_ROLL_BACK,
            effective,
            kind,
            f"{reason} (restoring step {target})",
            tier=tier,
            window_policy=policy,
        )
    return _halt(AnomalyKind.ANOMALY_KIND_NO_ROLLBACK_TARGET, _no_target(facts))


def _over_budget(facts: Facts) -> Decision | None:
    limits = facts.limits
    loop = AnomalyKind.ANOMALY_KIND_ROLLBACK_LOOP
    if facts.rollbacks_in_epoch >= limits.max_per_epoch:
        return _halt(
            loop,
            f"rollback budget used up: {facts.rollbacks_in_epoch} rollbacks for anomalies of "
            f"epoch {facts.epoch} (maxPerEpoch {limits.max_per_epoch}): {facts.detail}",
        )
    if facts.rollbacks_without_progress >= limits.max_without_progress:
        return _halt(
            loop,
            f"rollback budget used up: {facts.rollbacks_without_progress} rollbacks since the "
            f"last epoch that trained and validated cleanly (maxWithoutProgress "
            f"{limits.max_without_progress}): {facts.detail}",
        )
    if facts.rollbacks_in_run >= limits.max_per_run:
        return _halt(
            loop,
            f"rollback budget used up: {facts.rollbacks_in_run} rollbacks in this run "
            f"(maxPerRun {limits.max_per_run}): {facts.detail}",
        )
    return None


def _no_target(facts: Facts) -> str:
    tiers = []
    for tier, target, name in (
        (FAST, facts.fast_target, "shared memory"),
        (FULL, facts.full_target, "durable checkpoints"),
    ):
        if tier in facts.failed_tiers:
            tiers.append(f"{name}: restore failed")
        elif target is None:
            tiers.append(f"{name}: none")
    return (
        f"no valid state before step {facts.step} to roll back to ({'; '.join(tiers)}): "
        f"{facts.detail}"
    )
