"""The rollback budget's memory: counts, data windows, quarantine, round trips (R13.3)."""

from __future__ import annotations

import json

import pytest

from leyline import ReplayPolicy
from tolaria_trainer.recovery.ledger import (
    SUSPECT_SAMPLES,
    SUSPECT_STEPS,
    RecoveryLedger,
    ReplayedWindow,
)
from tolaria_trainer.recovery.planner import WHOLE_EPOCH, Window

SKIP = ReplayPolicy.REPLAY_POLICY_SKIP
REPLAY = ReplayPolicy.REPLAY_POLICY_REPLAY


@pytest.mark.req("R13.3")
def test_every_rollback_counts_for_its_epoch_the_run_and_the_streak_without_progress() -> None:
    ledger = RecoveryLedger()
    ledger.rolled_back(epoch=2, window=None, policy=REPLAY, replayed=None)
    ledger.rolled_back(epoch=2, window=None, policy=REPLAY, replayed=None)
    ledger.rolled_back(epoch=3, window=None, policy=REPLAY, replayed=None)
    assert ledger.rollbacks_by_epoch == {2: 2, 3: 1}
    assert (ledger.rollbacks_in_run, ledger.rollbacks_without_progress) == (3, 3)


@pytest.mark.req("R13.3")
def test_only_an_epoch_that_trained_resets_the_streak_without_progress() -> None:
    ledger = RecoveryLedger()
    ledger.rolled_back(epoch=2, window=None, policy=REPLAY, replayed=None)
    ledger.epoch_completed(trained_steps=0)  # a skipped epoch is no progress
    assert ledger.rollbacks_without_progress == 1
    ledger.epoch_completed(trained_steps=5)
    assert ledger.rollbacks_without_progress == 0 and ledger.rollbacks_in_run == 1


@pytest.mark.req("R13.3")
def test_a_poisoned_sample_seen_again_in_another_batch_is_blamed_and_quarantined() -> None:
    ledger = RecoveryLedger()
    first = Window(0, 4, frozenset({11, 12, 99}))
    assert ledger.window_record(first).failures == 0
    ledger.rolled_back(epoch=0, window=first, policy=SKIP, replayed=None)
    later = Window(1, 9, frozenset({7, 8, 99}))  # the same bad sample, shuffled elsewhere
    assert ledger.window_record(later).failures == 1
    ledger.rolled_back(epoch=1, window=later, policy=SKIP, replayed=None)
    assert ledger.quarantined(1) == frozenset()  # batch positions of epoch 1 stay stable
    assert ledger.quarantined(2) == frozenset({99})


@pytest.mark.req("R13.3")
def test_a_replayed_batch_that_fails_again_is_quarantined_whole() -> None:
    ledger = RecoveryLedger()
    window = Window(0, 4, frozenset({1, 2, 3}))
    ledger.rolled_back(epoch=0, window=window, policy=REPLAY, replayed=ReplayedWindow(0, 2, 4))
    assert ledger.window_record(window).failures == 1
    ledger.rolled_back(epoch=0, window=window, policy=SKIP, replayed=None)
    assert ledger.quarantined(1) == frozenset({1, 2, 3})


@pytest.mark.req("R6.1a")
def test_a_new_anomaly_inside_the_replayed_batches_is_inside_the_window() -> None:
    ledger = RecoveryLedger()
    ledger.rolled_back(
        epoch=0,
        window=Window(0, 6, frozenset({1})),
        policy=REPLAY,
        replayed=ReplayedWindow(0, 2, 6),
    )
    assert ledger.inside_replayed(Window(0, 4, frozenset({50})))
    assert not ledger.inside_replayed(Window(0, 7, frozenset({51})))
    assert not ledger.inside_replayed(Window(0, 6, frozenset({1})))  # a repeat, not new


@pytest.mark.req("R13.3")
def test_an_epoch_window_remembers_that_it_was_skipped() -> None:
    ledger = RecoveryLedger()
    epoch = Window(2, WHOLE_EPOCH)
    ledger.rolled_back(epoch=2, window=epoch, policy=REPLAY, replayed=None)
    assert ledger.window_record(epoch).failures == 1
    assert not ledger.window_record(epoch).skipped
    ledger.rolled_back(epoch=2, window=epoch, policy=SKIP, replayed=None)
    assert ledger.window_record(epoch).skipped


@pytest.mark.req("R6.2")
def test_the_ledger_round_trips_through_json() -> None:
    ledger = RecoveryLedger()
    ledger.rolled_back(epoch=0, window=Window(0, 3, frozenset({5, 6})), policy=SKIP, replayed=None)
    ledger.rolled_back(epoch=1, window=Window(1, 3, frozenset({6, 7})), policy=SKIP, replayed=None)
    ledger.rolled_back(
        epoch=2, window=Window(2, WHOLE_EPOCH), policy=REPLAY, replayed=ReplayedWindow(2, 0, 15)
    )
    again = RecoveryLedger()
    again.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert again == ledger


@pytest.mark.req("R13.3")
def test_the_suspects_stay_bounded_whatever_the_batch_size() -> None:
    ledger = RecoveryLedger()
    for step in range(SUSPECT_STEPS + 5):
        big = frozenset(range(step * 10_000, step * 10_000 + SUSPECT_SAMPLES // 2))
        ledger.rolled_back(epoch=step, window=Window(step, 0, big), policy=SKIP, replayed=None)
    assert len(ledger.suspects) <= SUSPECT_STEPS
    assert sum(map(len, ledger.suspects)) <= SUSPECT_SAMPLES
