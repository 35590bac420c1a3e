"""The LR controller as a specification (R3): shapes, guard, seeds, commands, rebinds, state."""

from __future__ import annotations

import json
import math

import pytest
import torch

from leyline import BreakerId, CircuitBreakerState, LrChangeSource
from leyline.spec import BreakerSpec, BudgetsSpec, ConservativeSpec, GroupScheduleSpec, ScheduleSpec
from tests.fakes import FakeClock, RecordingEvents
from tolaria_trainer.errors import StateMismatch
from tolaria_trainer.guards import EVENT_BREAKER_FAILURE, Guards
from tolaria_trainer.lr_controller import HISTORY_LIMIT, LRController
from tolaria_trainer.protocols import Clock

SCHEDULE = LrChangeSource.LR_CHANGE_SOURCE_SCHEDULE
COMMAND = LrChangeSource.LR_CHANGE_SOURCE_COMMAND
JOINED = LrChangeSource.LR_CHANGE_SOURCE_GROUP_JOINED
INTEGRITY_RESTORE = LrChangeSource.LR_CHANGE_SOURCE_INTEGRITY_RESTORE
RESTORE = LrChangeSource.LR_CHANGE_SOURCE_RESTORE


def sgd(*groups: tuple[str, float]) -> torch.optim.SGD:
    """One tiny parameter per group, each group tagged with its id."""
    return torch.optim.SGD(
        [
            {"params": [torch.nn.Parameter(torch.zeros(2))], "group_id": group_id, "lr": lr}
            for group_id, lr in groups
        ],
        lr=1e-3,
    )


def controller(
    guards: Guards,
    clock: Clock,
    *,
    steps_per_epoch: int = 4,
    total_epochs: int = 5,
    window: int = 1,
    **schedule: object,
) -> LRController:
    return LRController(
        ScheduleSpec.model_validate(schedule),
        BudgetsSpec(latency_window=window),
        guards,
        clock,
        steps_per_epoch=steps_per_epoch,
        total_epochs=total_epochs,
    )


def override(**fields: object) -> GroupScheduleSpec:
    """A per-group override written as in a manifest (shape by name)."""
    return GroupScheduleSpec.model_validate(fields)


def train(lr: LRController, optimizer: torch.optim.Optimizer, steps: int) -> list[dict[str, float]]:
    """The loop's order: optimizer step, then the controller; returns the LRs after each step."""
    seen = []
    for _ in range(steps):
        optimizer.step()
        global_step = lr.position + 1
        lr.step(global_step // 4, global_step)
        seen.append(lr.current_lrs())
    return seen


def lrs_of(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {g["group_id"]: g["lr"] for g in optimizer.param_groups}


class StallingClock:
    """A `Clock` over the test's FakeClock that advances it by a scripted amount on each read."""

    def __init__(self, clock: FakeClock, advances_ms: list[float]) -> None:
        self._clock = clock
        self._advances_ms = advances_ms

    def now_ns(self) -> int:
        if self._advances_ms:
            self._clock.advance_ms(self._advances_ms.pop(0))
        return self._clock.now_ns()


# --- R3.1: shapes ---------------------------------------------------------------------------


@pytest.mark.req("R3.1")
def test_constant_shape_keeps_the_base_lr(guards: Guards, clock: FakeClock) -> None:
    lr = controller(guards, clock, shape="constant")
    optimizer = sgd(("host", 0.1))
    lr.register_optimizer("host", optimizer)
    assert [s["host"] for s in train(lr, optimizer, 30)] == [0.1] * 30


@pytest.mark.req("R3.1")
def test_step_shape_multiplies_by_gamma_every_step_epochs(guards: Guards, clock: FakeClock) -> None:
    lr = controller(guards, clock, shape="step", step_epochs=2.0, step_gamma=0.5)
    optimizer = sgd(("host", 0.1))
    lr.register_optimizer("host", optimizer)
    seen = train(lr, optimizer, 20)
    for t, lrs in enumerate(seen, start=1):
        assert lrs["host"] == pytest.approx(0.1 * 0.5 ** (t // 8))


@pytest.mark.req("R3.1")
def test_cosine_shape_follows_its_closed_form_down_to_min_lr_ratio(
    guards: Guards, clock: FakeClock
) -> None:
    lr = controller(guards, clock, shape="cosine", min_lr_ratio=0.1)
    optimizer = sgd(("host", 0.2))
    lr.register_optimizer("host", optimizer)
    seen = train(lr, optimizer, 25)
    total = 20
    for t, lrs in enumerate(seen, start=1):
        progress = min(t, total) / total
        expected = 0.2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        assert lrs["host"] == pytest.approx(expected)
    assert seen[-1]["host"] == pytest.approx(0.02)


@pytest.mark.req("R3.1")
def test_linear_shape_decays_to_min_lr_ratio_over_the_run(guards: Guards, clock: FakeClock) -> None:
    lr = controller(guards, clock, shape="linear", min_lr_ratio=0.25)
    optimizer = sgd(("host", 0.4))
    lr.register_optimizer("host", optimizer)
    seen = train(lr, optimizer, 24)
    for t, lrs in enumerate(seen, start=1):
        assert lrs["host"] == pytest.approx(0.4 * (1 - 0.75 * min(t, 20) / 20))


@pytest.mark.req("R3.1")
def test_warmup_ramps_linearly_from_start_ratio_then_hands_over_to_the_shape(
    guards: Guards, clock: FakeClock
) -> None:
    lr = controller(guards, clock, shape="linear", warmup_epochs=1.0, warmup_start_ratio=0.2)
    optimizer = sgd(("host", 0.1))
    lr.register_optimizer("host", optimizer)
    assert lr.current_lrs()["host"] == pytest.approx(0.02)
    seen = train(lr, optimizer, 8)
    assert [s["host"] for s in seen[:3]] == pytest.approx([0.04, 0.06, 0.08])
    # The shape starts at the warmup's end: linear over the remaining 16 steps.
    assert seen[3]["host"] == pytest.approx(0.1)
    assert seen[7]["host"] == pytest.approx(0.1 * (1 - 0.99 * 4 / 16))


@pytest.mark.req("R3.1")
def test_group_override_sets_shape_and_lr_scale_of_that_group_only(
    guards: Guards, clock: FakeClock
) -> None:
    lr = controller(
        guards,
        clock,
        shape="cosine",
        groups={"head": override(shape="constant", lr_scale=2.0)},
    )
    optimizer = sgd(("host", 0.1), ("head", 0.1))
    lr.register_optimizer("host", optimizer)
    seen = train(lr, optimizer, 10)
    assert [s["head"] for s in seen] == pytest.approx([0.2] * 10)
    assert seen[-1]["host"] < 0.1


@pytest.mark.req("R3.1")
def test_frozen_group_stays_at_zero(guards: Guards, clock: FakeClock) -> None:
    lr = controller(guards, clock, groups={"emb": override(shape="frozen")})
    optimizer = sgd(("host", 0.1), ("emb", 0.1))
    lr.register_optimizer("host", optimizer)
    assert optimizer.param_groups[1]["lr"] == 0.0
    train(lr, optimizer, 12)
    lr.scale(0.5, min_scale=0.0, epoch=3, step=12)
    assert optimizer.param_groups[1]["lr"] == 0.0
    assert lr.current_lrs()["emb"] == 0.0


# --- R3.1: registration ---------------------------------------------------------------------


@pytest.mark.req("R3.1")
def test_registering_an_optimizer_name_twice_is_refused(guards: Guards, clock: FakeClock) -> None:
    lr = controller(guards, clock)
    lr.register_optimizer("host", sgd(("a", 0.1)))
    with pytest.raises(ValueError, match="'host' is already registered"):
        lr.register_optimizer("host", sgd(("b", 0.1)))


@pytest.mark.req("R3.1")
def test_a_param_group_without_group_id_is_refused(guards: Guards, clock: FakeClock) -> None:
    lr = controller(guards, clock)
    optimizer = sgd(("a", 0.1))
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    with pytest.raises(ValueError, match=r"optimizer 'host' param group 1: needs .*'group_id'"):
        lr.register_optimizer("host", optimizer)
    assert lr.current_lrs() == {}


@pytest.mark.req("R3.1")
def test_a_duplicate_group_id_in_one_optimizer_is_refused(guards: Guards, clock: FakeClock) -> None:
    lr = controller(guards, clock)
    with pytest.raises(ValueError, match="optimizer 'host' param group 1: duplicate group_id 'a'"):
        lr.register_optimizer("host", sgd(("a", 0.1), ("a", 0.2)))


@pytest.mark.req("R3.1")
def test_a_group_id_taken_by_another_optimizer_is_refused(guards: Guards, clock: FakeClock) -> None:
    lr = controller(guards, clock)
    lr.register_optimizer("host", sgd(("a", 0.1)))
    with pytest.raises(ValueError, match="'a' already belongs to optimizer 'host'"):
        lr.register_optimizer("aux", sgd(("a", 0.1)))


# --- R3.1: Tamiyo's LR cut ------------------------------------------------------------------


@pytest.mark.req("R3.1")
def test_scale_cuts_host_groups_now_and_records_command_changes(
    guards: Guards, clock: FakeClock
) -> None:
    lr = controller(guards, clock, shape="constant")
    optimizer = sgd(("host", 0.1), ("seed:a", 0.1))
    lr.register_optimizer("host", optimizer)
    seed_before = lr.current_lrs()["seed:a"]
    changes = lr.scale(0.5, min_scale=0.1, epoch=2, step=40)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert [(c.group_id, c.old_lr, c.source) for c in changes] == [("host", 0.1, COMMAND)]
    assert changes[0].new_lr == pytest.approx(0.05)
    assert (changes[0].epoch, changes[0].step) == (2, 40)
    assert lr.changes == changes
    assert lr.current_lrs()["seed:a"] == seed_before


@pytest.mark.req("R3.1")
def test_scale_never_goes_below_min_scale(guards: Guards, clock: FakeClock) -> None:
    lr = controller(guards, clock, shape="constant")
    optimizer = sgd(("host", 0.1))
    lr.register_optimizer("host", optimizer)
    lr.scale(0.5, min_scale=0.3, epoch=0, step=0)
    lr.scale(0.5, min_scale=0.3, epoch=0, step=0)
    assert lr.current_lrs()["host"] == pytest.approx(0.03)
    assert lr.scale(0.5, min_scale=0.3, epoch=0, step=0) == []
    train(lr, optimizer, 3)
    assert lr.current_lrs()["host"] == pytest.approx(0.03)


@pytest.mark.req("R3.1")
@pytest.mark.parametrize(
    ("factor", "min_scale"), [(0.0, 0.1), (-1.0, 0.1), (math.nan, 0.1), (0.5, -1.0)]
)
def test_scale_refuses_a_factor_or_floor_it_cannot_apply(
    guards: Guards, clock: FakeClock, factor: float, min_scale: float
) -> None:
    lr = controller(guards, clock)
    lr.register_optimizer("host", sgd(("host", 0.1)))
    with pytest.raises(ValueError, match="LR"):
        lr.scale(factor, min_scale=min_scale, epoch=0, step=0)


# --- R3.1: epoch-end history ----------------------------------------------------------------


@pytest.mark.req("R3.1")
def test_epoch_end_records_one_schedule_change_per_group_that_moved(
    guards: Guards, clock: FakeClock
) -> None:
    lr = controller(guards, clock, shape="cosine", groups={"emb": override(shape="frozen")})
    optimizer = sgd(("host", 0.1), ("emb", 0.1))
    lr.register_optimizer("host", optimizer)
    start = lr.current_lrs()["host"]
    train(lr, optimizer, 4)
    changes = lr.epoch_end(0, 4)
    assert [(c.group_id, c.old_lr, c.new_lr, c.source) for c in changes] == [
        ("host", start, lr.current_lrs()["host"], SCHEDULE)
    ]
    train(lr, optimizer, 4)
    (second,) = lr.epoch_end(1, 8)
    assert second.old_lr == changes[0].new_lr
    assert len(lr.changes) == 2


@pytest.mark.req("R3.1")
def test_epoch_end_records_nothing_when_no_lr_moved(guards: Guards, clock: FakeClock) -> None:
    lr = controller(guards, clock, shape="constant")
    optimizer = sgd(("host", 0.1))
    lr.register_optimizer("host", optimizer)
    train(lr, optimizer, 4)
    assert lr.epoch_end(0, 4) == []
    assert lr.changes == []


# --- R3.1 / R4.2: rebinding after an optimizer rebuild --------------------------------------


@pytest.mark.req("R3.1")
def test_rebind_keeps_base_scale_and_position_of_matched_groups(
    guards: Guards, clock: FakeClock
) -> None:
    lr = controller(guards, clock, shape="linear", min_lr_ratio=0.0)
    optimizer = sgd(("host", 0.1))
    lr.register_optimizer("host", optimizer)
    train(lr, optimizer, 5)
    lr.scale(0.5, min_scale=0.0, epoch=1, step=5)
    before = lr.current_lrs()["host"]
    rebuilt = sgd(("host", 123.0))  # the rebuild's lr is not a new base
    lr.rebind_optimizer("host", rebuilt)
    assert rebuilt.param_groups[0]["lr"] == before
    assert lr.position == 5
    seen = train(lr, rebuilt, 3)
    assert [s["host"] for s in seen] == pytest.approx([0.1 * 0.5 * (1 - t / 20) for t in (6, 7, 8)])


@pytest.mark.req("R3.3")
def test_rebind_adds_a_seed_group_that_joins_at_the_current_step(
    guards: Guards, clock: FakeClock
) -> None:
    lr = controller(guards, clock, shape="constant")
    optimizer = sgd(("host", 0.2))
    lr.register_optimizer("host", optimizer)
    train(lr, optimizer, 6)
    rebuilt = sgd(("host", 0.2), ("seed:a", 0.2))
    lr.rebind_optimizer("host", rebuilt)
    (joined,) = lr.changes
    assert (joined.group_id, joined.source) == ("seed:a", JOINED)
    assert joined.new_lr == pytest.approx(0.01 * 0.1 * 0.2)
    seen = train(lr, rebuilt, 4)
    ramp = [0.01 + 0.99 * k / 40 for k in (1, 2, 3, 4)]
    assert [s["seed:a"] for s in seen] == pytest.approx([0.02 * r for r in ramp])


@pytest.mark.req("R3.1")
def test_rebind_drops_groups_no_longer_present(guards: Guards, clock: FakeClock) -> None:
    lr = controller(guards, clock)
    lr.register_optimizer("host", sgd(("host", 0.1), ("aux", 0.1)))
    lr.rebind_optimizer("host", sgd(("host", 0.1)))
    assert set(lr.current_lrs()) == {"host"}


@pytest.mark.req("R3.2")
def test_rebind_writes_the_controllers_lrs_so_the_next_guard_passes(
    guards: Guards, clock: FakeClock
) -> None:
    lr = controller(guards, clock)
    optimizer = sgd(("host", 0.1))
    lr.register_optimizer("host", optimizer)
    train(lr, optimizer, 5)
    rebuilt = sgd(("host", 0.1), ("seed:a", 7.0))
    lr.rebind_optimizer("host", rebuilt)
    assert lrs_of(rebuilt) == lr.current_lrs()
    train(lr, rebuilt, 1)
    assert lr.integrity_breaches == 0
    assert guards.breakers[BreakerId.BREAKER_LR_INTEGRITY].failures == 0


@pytest.mark.req("R3.1")
def test_rebinding_an_unknown_optimizer_is_refused(guards: Guards, clock: FakeClock) -> None:
    lr = controller(guards, clock)
    with pytest.raises(ValueError, match="'host' is not registered"):
        lr.rebind_optimizer("host", sgd(("host", 0.1)))


# --- R3.2: integrity guard and budgets ------------------------------------------------------


@pytest.mark.req("R3.2")
def test_lr_written_behind_the_controller_is_counted_restored_and_never_raises(
    guards: Guards, clock: FakeClock
) -> None:
    lr = controller(guards, clock, shape="constant")
    optimizer = sgd(("host", 0.1))
    lr.register_optimizer("host", optimizer)
    optimizer.param_groups[0]["lr"] = 0.5
    optimizer.step()
    lr.step(0, 1)
    assert lr.integrity_breaches == 1
    assert optimizer.param_groups[0]["lr"] == 0.1
    restore = lr.changes[-1]
    assert (restore.group_id, restore.old_lr, restore.new_lr) == ("host", 0.5, 0.1)
    assert (restore.source, restore.epoch, restore.step) == (INTEGRITY_RESTORE, 0, 1)


@pytest.mark.req("R3.2")
def test_integrity_breach_is_a_breaker_failure_naming_expected_and_found(
    guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    lr = controller(guards, clock, shape="constant")
    optimizer = sgd(("host", 0.1))
    lr.register_optimizer("host", optimizer)
    optimizer.param_groups[0]["lr"] = 0.5
    optimizer.step()
    lr.step(0, 1)
    breaker = guards.breakers[BreakerId.BREAKER_LR_INTEGRITY]
    assert breaker.failures == 1
    assert "LR 0.5 != last set 0.1" in breaker.last_failure
    (failure,) = events.named(EVENT_BREAKER_FAILURE)
    assert failure.attributes["breaker"] == "BREAKER_LR_INTEGRITY"


@pytest.mark.req("R3.2")
def test_integrity_breach_enters_conservative_mode(guards: Guards, clock: FakeClock) -> None:
    lr = controller(guards, clock)
    optimizer = sgd(("host", 0.1))
    lr.register_optimizer("host", optimizer)
    optimizer.param_groups[0]["lr"] *= 10
    optimizer.step()
    lr.step(0, 1)
    assert guards.conservative.active


@pytest.mark.req("R3.2")
def test_a_difference_within_the_relative_tolerance_is_not_a_breach(
    guards: Guards, clock: FakeClock
) -> None:
    lr = controller(guards, clock, shape="constant")
    optimizer = sgd(("host", 0.1))
    lr.register_optimizer("host", optimizer)
    optimizer.param_groups[0]["lr"] = 0.1 * (1 + 5e-7)
    optimizer.step()
    lr.step(0, 1)
    assert lr.integrity_breaches == 0
    assert guards.breakers[BreakerId.BREAKER_LR_INTEGRITY].successes == 1


@pytest.mark.req("R3.2")
def test_the_guard_is_skipped_while_its_breaker_is_open_and_the_schedule_still_wins(
    guards: Guards, clock: FakeClock
) -> None:
    lr = controller(guards, clock, shape="constant")
    optimizer = sgd(("host", 0.1))
    lr.register_optimizer("host", optimizer)
    for _ in range(3):
        guards.failure(BreakerId.BREAKER_LR_INTEGRITY, "earlier breach")
    assert (
        guards.breakers[BreakerId.BREAKER_LR_INTEGRITY].state
        == CircuitBreakerState.CIRCUIT_STATE_OPEN
    )
    optimizer.param_groups[0]["lr"] = 0.5
    optimizer.step()
    lr.step(0, 1)
    assert lr.integrity_breaches == 0
    assert optimizer.param_groups[0]["lr"] == 0.1


@pytest.mark.req("R3.2")
def test_a_param_group_added_without_rebind_is_a_breach_not_a_crash(
    guards: Guards, clock: FakeClock
) -> None:
    lr = controller(guards, clock)
    optimizer = sgd(("host", 0.1))
    lr.register_optimizer("host", optimizer)
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "group_id": "x"})
    optimizer.step()
    lr.step(0, 1)
    assert lr.integrity_breaches == 1
    assert "call rebind_optimizer" in guards.breakers[BreakerId.BREAKER_LR_INTEGRITY].last_failure


@pytest.mark.req("R3.2")
def test_a_clean_fast_step_records_successes_and_emits_nothing(
    guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    lr = controller(guards, clock)
    optimizer = sgd(("host", 0.1), ("seed:a", 0.1))
    lr.register_optimizer("host", optimizer)
    train(lr, optimizer, 5)
    assert guards.breakers[BreakerId.BREAKER_LR_STEP].successes == 5
    assert guards.breakers[BreakerId.BREAKER_LR_INTEGRITY].successes == 5
    assert events.events == []


@pytest.mark.req("R3.2")
def test_a_guard_over_its_budget_is_an_lr_step_breaker_failure(
    guards: Guards, clock: FakeClock
) -> None:
    lr = controller(guards, StallingClock(clock, [0.0, 3.0, 0.0]))  # guard 3 ms > 2 ms
    optimizer = sgd(("host", 0.1))
    lr.register_optimizer("host", optimizer)
    train(lr, optimizer, 1)
    breaker = guards.breakers[BreakerId.BREAKER_LR_STEP]
    assert breaker.failures == 1
    assert breaker.last_failure == "LR guard p95: 3.00 ms > budget 2.00 ms"
    assert guards.conservative.active


@pytest.mark.req("R3.2")
def test_a_step_over_its_budget_is_an_lr_step_breaker_failure(
    guards: Guards, clock: FakeClock
) -> None:
    lr = controller(guards, StallingClock(clock, [0.0, 1.0, 5.0]))  # step 6 ms > 5 ms
    optimizer = sgd(("host", 0.1))
    lr.register_optimizer("host", optimizer)
    train(lr, optimizer, 1)
    breaker = guards.breakers[BreakerId.BREAKER_LR_STEP]
    assert breaker.failures == 1
    assert breaker.last_failure == "LR step p95: 6.00 ms > budget 5.00 ms"


@pytest.mark.req("R3.2")
def test_one_slow_step_in_a_window_is_not_a_breach(guards: Guards, clock: FakeClock) -> None:
    stalls = [0.0, 0.0, 0.0] * 99 + [0.0, 3.0, 0.0]  # one 3 ms guard in 100 steps
    lr = controller(guards, StallingClock(clock, stalls), window=100)
    optimizer = sgd(("host", 0.1))
    lr.register_optimizer("host", optimizer)
    train(lr, optimizer, 100)
    breaker = guards.breakers[BreakerId.BREAKER_LR_STEP]
    assert breaker.failures == 0 and breaker.successes == 1
    assert lr.guard_latency.summary().breaches == 1


@pytest.mark.req("R3.2")
def test_a_window_whose_p95_is_over_budget_is_one_failure(guards: Guards, clock: FakeClock) -> None:
    stalls = [0.0, 3.0, 0.0] * 10
    lr = controller(guards, StallingClock(clock, stalls), window=10)
    optimizer = sgd(("host", 0.1))
    lr.register_optimizer("host", optimizer)
    train(lr, optimizer, 10)
    assert guards.breakers[BreakerId.BREAKER_LR_STEP].failures == 1


# --- R3.3: seed groups ----------------------------------------------------------------------


@pytest.mark.req("R3.3")
def test_a_seed_group_starts_at_a_hundredth_of_a_tenth_of_the_host_base(
    guards: Guards, clock: FakeClock
) -> None:
    lr = controller(guards, clock, shape="cosine")
    optimizer = sgd(("host", 0.3), ("seed:a", 5.0))
    lr.register_optimizer("host", optimizer)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.01 * 0.1 * 0.3)


@pytest.mark.req("R3.3")
def test_a_seed_group_reaches_a_tenth_of_the_host_base_after_ten_epochs(
    guards: Guards, clock: FakeClock
) -> None:
    lr = controller(guards, clock, shape="constant", total_epochs=20)
    optimizer = sgd(("host", 0.3), ("seed:a", 0.3))
    lr.register_optimizer("host", optimizer)
    seen = [s["seed:a"] for s in train(lr, optimizer, 40)]
    assert seen == sorted(seen)
    assert seen[19] == pytest.approx(0.03 * (0.01 + 0.99 * 20 / 40))
    assert seen[-1] == pytest.approx(0.03)


@pytest.mark.req("R3.3")
def test_a_seed_group_follows_the_host_shape_after_its_warmup(
    guards: Guards, clock: FakeClock
) -> None:
    lr = controller(
        guards, clock, shape="linear", min_lr_ratio=0.0, steps_per_epoch=1, total_epochs=20
    )
    optimizer = sgd(("host", 0.1), ("seed:a", 0.1))
    lr.register_optimizer("host", optimizer)
    seen = train(lr, optimizer, 15)
    for t in (10, 12, 15):
        assert seen[t - 1]["seed:a"] == pytest.approx(0.01 * (1 - t / 20))
        assert seen[t - 1]["seed:a"] == pytest.approx(0.1 * seen[t - 1]["host"])


@pytest.mark.req("R3.3")
def test_a_seed_group_without_a_host_group_is_refused(guards: Guards, clock: FakeClock) -> None:
    lr = controller(guards, clock)
    with pytest.raises(ValueError, match="optimizer 'seeds': seed group 'seed:a'"):
        lr.register_optimizer("seeds", sgd(("seed:a", 0.1)))


@pytest.mark.req("R3.3")
def test_history_keeps_the_newest_1000_changes(guards: Guards, clock: FakeClock) -> None:
    lr = controller(guards, clock, shape="constant")
    lr.register_optimizer("host", sgd(("host", 0.1)))
    for i in range(HISTORY_LIMIT + 50):
        lr.scale(0.5 if i % 2 == 0 else 2.0, min_scale=0.0, epoch=0, step=i)
    assert HISTORY_LIMIT == 1000
    assert len(lr.changes) == 1000
    assert lr.changes[-1].step == HISTORY_LIMIT + 49
    assert lr.changes[0].step == 50


# --- R3.3: state in snapshots and checkpoints -----------------------------------------------


def trained_controller(guards: Guards, clock: FakeClock) -> tuple[LRController, torch.optim.SGD]:
    lr = controller(guards, clock, shape="cosine", warmup_epochs=1.0)
    optimizer = sgd(("host", 0.1), ("seed:a", 0.1))
    lr.register_optimizer("host", optimizer)
    train(lr, optimizer, 6)
    lr.scale(0.5, min_scale=0.1, epoch=1, step=6)
    train(lr, optimizer, 3)
    lr.epoch_end(2, 9)
    return lr, optimizer


def fresh_guards(clock: FakeClock) -> Guards:
    return Guards(BreakerSpec(), ConservativeSpec(), clock, RecordingEvents())


@pytest.mark.req("R3.3")
def test_state_dict_is_json_serialisable(guards: Guards, clock: FakeClock) -> None:
    lr, _ = trained_controller(guards, clock)
    state = lr.state_dict()
    assert json.loads(json.dumps(state)) == state


@pytest.mark.req("R3.3")
def test_state_round_trips_into_a_fresh_controller_that_continues_identically(
    guards: Guards, clock: FakeClock
) -> None:
    original, optimizer = trained_controller(guards, clock)
    state = json.loads(json.dumps(original.state_dict()))
    resumed = controller(fresh_guards(clock), clock, shape="cosine", warmup_epochs=1.0)
    resumed_optimizer = sgd(("host", 0.1), ("seed:a", 0.1))
    resumed.register_optimizer("host", resumed_optimizer)
    resumed.load_state_dict(state)
    assert lrs_of(resumed_optimizer) == lrs_of(optimizer)
    assert train(resumed, resumed_optimizer, 15) == train(original, optimizer, 15)
    assert resumed.integrity_breaches == original.integrity_breaches == 0
    assert [c for c in resumed.changes if c.source != RESTORE] == original.changes


@pytest.mark.req("R3.3")
def test_loading_state_records_a_restore_change_per_group_it_moves(
    guards: Guards, clock: FakeClock
) -> None:
    original, _ = trained_controller(guards, clock)
    resumed = controller(fresh_guards(clock), clock, shape="cosine", warmup_epochs=1.0)
    resumed.register_optimizer("host", sgd(("host", 0.1), ("seed:a", 0.1)))
    before = resumed.current_lrs()
    resumed.load_state_dict(original.state_dict())
    restores = [c for c in resumed.changes if c.source == RESTORE]
    assert {(c.group_id, c.old_lr, c.new_lr) for c in restores} == {
        (gid, before[gid], original.current_lrs()[gid]) for gid in before
    }


@pytest.mark.req("R3.3")
def test_loading_state_with_other_group_ids_is_refused_naming_them(
    guards: Guards, clock: FakeClock
) -> None:
    original, _ = trained_controller(guards, clock)
    other = controller(fresh_guards(clock), clock)
    other.register_optimizer("host", sgd(("host", 0.1), ("seed:b", 0.1)))
    before = other.state_dict()
    with pytest.raises(StateMismatch, match=r"missing \['seed:b'\], unexpected \['seed:a'\]"):
        other.load_state_dict(original.state_dict())
    assert other.state_dict() == before


@pytest.mark.req("R3.3")
def test_loading_a_malformed_state_is_refused_naming_the_field(
    guards: Guards, clock: FakeClock
) -> None:
    original, _ = trained_controller(guards, clock)
    state = original.state_dict()
    state["optimizers"]["host"][0]["scale"] = "half"
    with pytest.raises(StateMismatch, match=r"optimizers\.host\.host\.scale"):
        original.load_state_dict(state)
