"""The escalation ladder as a table: facts in, one decision out (R6.1a, R7.1, R13.3, R13.4)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from leyline import AnomalyKind, EmergencyLevel, RecoveryAction, ReplayPolicy
from tolaria_trainer.recovery.planner import (
    FAST,
    FULL,
    WHOLE_EPOCH,
    Facts,
    Limits,
    Window,
    WindowRecord,
    plan,
)

MINOR = EmergencyLevel.EMERGENCY_LEVEL_MINOR
MAJOR = EmergencyLevel.EMERGENCY_LEVEL_MAJOR
SEVERE = EmergencyLevel.EMERGENCY_LEVEL_SEVERE
CRITICAL = EmergencyLevel.EMERGENCY_LEVEL_CRITICAL
ROLL_BACK = RecoveryAction.RECOVERY_ACTION_ROLL_BACK
HALT = RecoveryAction.RECOVERY_ACTION_HALT
SKIP = ReplayPolicy.REPLAY_POLICY_SKIP
REPLAY = ReplayPolicy.REPLAY_POLICY_REPLAY
SPIKE = AnomalyKind.ANOMALY_KIND_LOSS_EXPLOSION
COLLAPSE = AnomalyKind.ANOMALY_KIND_ACCURACY_COLLAPSE
LIMITS = Limits(max_per_epoch=3, max_without_progress=6, max_per_run=100, replay_policy=SKIP)


def facts(**changes: object) -> Facts:
    """A loss spike at step 40 (epoch 1, batch 7) with both tiers able to restore."""
    base = Facts(
        level=SEVERE,
        kind=SPIKE,
        detail="loss 2302 > 15 x running median 2.3",
        step=40,
        epoch=1,
        data_dependent=True,
        window=Window(1, 7, frozenset({3, 9})),
        window_record=WindowRecord(),
        inside_replayed_window=False,
        can_quarantine=True,
        rollbacks_in_epoch=0,
        rollbacks_without_progress=0,
        rollbacks_in_run=0,
        fast_target=32,
        full_target=16,
        failed_tiers=frozenset(),
        coordinated=True,
        limits=LIMITS,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.mark.req("R7.1")
def test_a_minor_anomaly_is_logged() -> None:
    decision = plan(facts(level=MINOR, kind=AnomalyKind.ANOMALY_KIND_BUDGET_BREACHES))
    assert decision.action == RecoveryAction.RECOVERY_ACTION_LOG


@pytest.mark.req("R7.4")
def test_a_critical_anomaly_freezes_when_a_sidecar_coordinates_it() -> None:
    decision = plan(facts(level=CRITICAL, kind=AnomalyKind.ANOMALY_KIND_BREAKER_STORM))
    assert decision.action == RecoveryAction.RECOVERY_ACTION_FREEZE


@pytest.mark.req("R7.4")
def test_a_critical_anomaly_halts_at_once_when_nobody_can_coordinate_it() -> None:
    decision = plan(facts(level=CRITICAL, coordinated=False))
    assert decision.action == HALT and "no sidecar" in decision.reason


@pytest.mark.req("R6.1")
def test_a_loss_spike_rolls_back_on_the_fast_tier_with_the_configured_policy() -> None:
    decision = plan(facts())
    assert (decision.action, decision.tier, decision.level) == (ROLL_BACK, FAST, SEVERE)
    assert decision.window_policy == SKIP and "step 32" in decision.reason


@pytest.mark.req("R7.2")
def test_a_failed_fast_rollback_escalates_to_the_full_tier_at_major() -> None:
    decision = plan(facts(failed_tiers=frozenset({FAST})))
    assert (decision.action, decision.tier, decision.level) == (ROLL_BACK, FULL, MAJOR)
    assert decision.kind == AnomalyKind.ANOMALY_KIND_FAST_ROLLBACK_FAILED


@pytest.mark.req("R6.1")
def test_without_a_snapshot_a_loss_spike_uses_a_durable_checkpoint() -> None:
    decision = plan(facts(fast_target=None))
    assert (decision.tier, decision.level, decision.kind) == (FULL, MAJOR, SPIKE)


@pytest.mark.req("R13.4")
def test_with_no_target_on_any_tier_the_run_halts_at_once_naming_both_tiers() -> None:
    decision = plan(facts(fast_target=None, failed_tiers=frozenset({FULL})))
    assert decision.action == HALT
    assert decision.kind == AnomalyKind.ANOMALY_KIND_NO_ROLLBACK_TARGET
    assert "shared memory: none" in decision.reason
    assert "durable checkpoints: restore failed" in decision.reason


@pytest.mark.req("R6.3")
def test_an_accuracy_collapse_prefers_the_full_tier_then_the_fast_tier() -> None:
    collapse = facts(
        level=MAJOR, kind=COLLAPSE, data_dependent=False, window=Window(1, WHOLE_EPOCH)
    )
    assert plan(collapse).tier == FULL
    assert plan(replace(collapse, full_target=None)).tier == FAST
    assert plan(replace(collapse, failed_tiers=frozenset({FULL}))).tier == FAST


@pytest.mark.req("R13.3")
def test_an_epoch_level_anomaly_replays_its_epoch_the_first_time() -> None:
    collapse = facts(
        level=MAJOR, kind=COLLAPSE, data_dependent=False, window=Window(2, WHOLE_EPOCH)
    )
    assert plan(collapse).window_policy == REPLAY


@pytest.mark.req("R13.3")
@pytest.mark.parametrize("policy", list(ReplayPolicy.values())[1:])
def test_the_same_data_failing_again_is_skipped_whatever_the_policy(policy: int) -> None:
    limits = replace(LIMITS, replay_policy=policy)
    decision = plan(facts(limits=limits, window_record=WindowRecord(failures=1)))
    assert (decision.action, decision.window_policy) == (ROLL_BACK, SKIP)
    assert "failed again" in decision.reason


@pytest.mark.req("R13.3")
def test_an_epoch_that_fails_again_after_it_was_skipped_halts() -> None:
    decision = plan(
        facts(
            level=MAJOR,
            kind=COLLAPSE,
            data_dependent=False,
            window=Window(2, WHOLE_EPOCH),
            window_record=WindowRecord(failures=2, skipped=True),
        )
    )
    assert decision.action == HALT and decision.kind == AnomalyKind.ANOMALY_KIND_ROLLBACK_LOOP
    assert "epoch 2 failed again after it was skipped" in decision.reason


@pytest.mark.req("R13.3")
def test_a_repeat_that_would_overflow_the_quarantine_halts() -> None:
    decision = plan(facts(window_record=WindowRecord(failures=1), can_quarantine=False))
    assert decision.action == HALT and "quarantine" in decision.reason


@pytest.mark.req("R6.1a")
def test_a_second_anomaly_inside_the_replayed_window_escalates_to_major() -> None:
    decision = plan(facts(inside_replayed_window=True))
    assert (decision.tier, decision.level) == (FULL, MAJOR)
    assert "inside the replayed window" in decision.reason


@pytest.mark.req("R13.3")
@pytest.mark.parametrize(
    ("counter", "value", "names"),
    [
        ("rollbacks_in_epoch", 3, "maxPerEpoch 3"),
        ("rollbacks_without_progress", 6, "maxWithoutProgress 6"),
        ("rollbacks_in_run", 100, "maxPerRun 100"),
    ],
)
def test_a_spent_rollback_budget_halts_naming_the_limit(
    counter: str, value: int, names: str
) -> None:
    decision = plan(facts(**{counter: value}))
    assert decision.action == HALT and decision.kind == AnomalyKind.ANOMALY_KIND_ROLLBACK_LOOP
    assert names in decision.reason


@pytest.mark.req("R13.3")
def test_the_budget_covers_every_tier_and_cause() -> None:
    for kind, level in ((COLLAPSE, MAJOR), (SPIKE, SEVERE)):
        for tier in (FAST, FULL):
            spent = facts(
                kind=kind, level=level, rollbacks_in_epoch=3, failed_tiers=frozenset({tier})
            )
            assert plan(spent).action == HALT


@pytest.mark.req("R13.3")
def test_a_request_from_outside_has_no_window_to_skip() -> None:
    decision = plan(
        facts(
            kind=AnomalyKind.ANOMALY_KIND_CLUSTER_INCIDENT,
            data_dependent=False,
            window=None,
            window_record=WindowRecord(),
        )
    )
    assert (decision.action, decision.window_policy) == (ROLL_BACK, REPLAY)


levels = st.sampled_from([MINOR, SEVERE, MAJOR, CRITICAL])
targets = st.one_of(st.none(), st.integers(0, 100))
tiers = st.frozensets(st.sampled_from([FAST, FULL]))


@pytest.mark.req("R13.3")
@given(
    level=levels,
    fast=targets,
    full=targets,
    failed=tiers,
    in_epoch=st.integers(0, 5),
    without=st.integers(0, 10),
    failures=st.integers(0, 3),
    skipped=st.booleans(),
    coordinated=st.booleans(),
)
def test_a_decision_never_uses_a_failed_tier_a_missing_target_or_a_spent_budget(
    level: int,
    fast: int | None,
    full: int | None,
    failed: frozenset[int],
    in_epoch: int,
    without: int,
    failures: int,
    skipped: bool,
    coordinated: bool,
) -> None:
    f = facts(
        level=level,
        fast_target=fast,
        full_target=full,
        failed_tiers=failed,
        rollbacks_in_epoch=in_epoch,
        rollbacks_without_progress=without,
        window_record=WindowRecord(failures, skipped),
        coordinated=coordinated,
    )
    decision = plan(f)
    if decision.action == ROLL_BACK:
        assert decision.tier not in failed
        assert (fast if decision.tier == FAST else full) is not None
        assert in_epoch < LIMITS.max_per_epoch and without < LIMITS.max_without_progress
        assert not skipped
        # the full tier is MAJOR's action (R7.1, R7.2); the fast tier keeps the anomaly's level
        assert decision.level == (MAJOR if decision.tier == FULL else level)
        if failures:
            assert decision.window_policy == SKIP
    if level in (SEVERE, MAJOR):
        assert decision.action in (ROLL_BACK, HALT)


@pytest.mark.req("R13.3")
@given(tier_fails=st.lists(st.booleans(), min_size=1, max_size=40))
def test_a_run_whose_every_rollback_keeps_failing_ends_within_the_budget(
    tier_fails: list[bool],
) -> None:
    """An adversary chooses, decision after decision, whether a rollback fails; the anomaly
    recurs at once after every successful one, without progress. The ladder must end in a
    HALT within maxWithoutProgress successful rollbacks and two failures per anomaly."""
    rolled_back = 0
    decisions = 0
    failed: set[int] = set()
    record = WindowRecord()
    outcomes = iter(tier_fails)
    while True:
        decisions += 1
        assert decisions <= 3 * (LIMITS.max_without_progress + 1), "the ladder loops"
        decision = plan(
            facts(
                failed_tiers=frozenset(failed),
                rollbacks_without_progress=rolled_back,
                rollbacks_in_epoch=0,
                window_record=record,
            )
        )
        if decision.action == HALT:
            break
        assert decision.action == ROLL_BACK
        if next(outcomes, False):
            failed.add(decision.tier)
            continue
        rolled_back += 1
        failed = set()
        record = WindowRecord(failures=record.failures + 1)
    assert rolled_back <= LIMITS.max_without_progress
