"""Invariants of the LR controller over any valid schedule and any sequence of calls (R3)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leyline import BreakerId
from leyline.spec import (
    BreakerSpec,
    BudgetsSpec,
    ConservativeSpec,
    GroupScheduleSpec,
    ScheduleSpec,
)
from tests.fakes import FakeClock, RecordingEvents
from tolaria_trainer.guards import Guards
from tolaria_trainer.lr_controller import SEED_LR_RATIO, SEED_WARMUP_EPOCHS, LRController

PROPERTY_SETTINGS = settings(max_examples=40, deadline=None)
"""No deadline: a loaded 2-core box must not turn a slow example into a failure."""

DECAYING_SHAPES = ("step", "cosine", "linear")
HOST_GROUPS = ("host", "emb", "seed:a")
"""A host group, a frozen one (override) and a seed group, all in one optimizer."""


@st.composite
def schedules(
    draw: st.DrawFn, shapes: tuple[str, ...] = ("constant", *DECAYING_SHAPES)
) -> ScheduleSpec:
    return ScheduleSpec.model_validate(
        {
            "shape": draw(st.sampled_from(shapes)),
            "warmup_epochs": draw(st.one_of(st.just(0.0), st.floats(0.1, 3.0))),
            "warmup_start_ratio": draw(st.floats(0.0, 1.0)),
            "min_lr_ratio": draw(st.floats(0.0, 1.0)),
            "step_epochs": draw(st.floats(0.25, 3.0)),
            "step_gamma": draw(st.floats(0.05, 1.0)),
            "groups": {"emb": GroupScheduleSpec.model_validate({"shape": "frozen"})},
        }
    )


@dataclass(frozen=True)
class Run:
    schedule: ScheduleSpec
    steps_per_epoch: int
    total_epochs: int
    host_lr: float

    def controller(self) -> tuple[LRController, Guards]:
        clock = FakeClock()
        guards = Guards(BreakerSpec(), ConservativeSpec(), clock, RecordingEvents())
        lr = LRController(
            self.schedule,
            BudgetsSpec(),
            guards,
            clock,
            steps_per_epoch=self.steps_per_epoch,
            total_epochs=self.total_epochs,
        )
        return lr, guards

    def optimizer(self, group_ids: tuple[str, ...] = HOST_GROUPS) -> torch.optim.SGD:
        return torch.optim.SGD(
            [
                {"params": [torch.nn.Parameter(torch.zeros(1))], "group_id": g, "lr": self.host_lr}
                for g in group_ids
            ],
            lr=self.host_lr,
        )


def runs(shapes: tuple[str, ...] = ("constant", *DECAYING_SHAPES)) -> st.SearchStrategy[Run]:
    return st.builds(
        Run,
        schedule=schedules(shapes),
        steps_per_epoch=st.integers(1, 4),
        total_epochs=st.integers(1, 6),
        host_lr=st.floats(1e-5, 1.0),
    )


def step(lr: LRController, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> None:
    """One iteration in the loop's order: the optimizer first, then the controller."""
    optimizer.step()
    global_step = lr.position + 1
    lr.step(global_step // steps_per_epoch, global_step)


def lrs_of(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {g["group_id"]: g["lr"] for g in optimizer.param_groups}


@pytest.mark.req("R3.1")
@PROPERTY_SETTINGS
@given(
    run=runs(),
    steps=st.integers(0, 40),
    cuts=st.dictionaries(
        st.integers(0, 40), st.tuples(st.floats(0.05, 1.0), st.floats(0.0, 1.0)), max_size=5
    ),
)
def test_lrs_are_finite_non_negative_and_never_above_base_times_scale(
    run: Run, steps: int, cuts: dict[int, tuple[float, float]]
) -> None:
    lr, _ = run.controller()
    optimizer = run.optimizer()
    lr.register_optimizer("host", optimizer)
    scale = 1.0
    for t in range(steps + 1):
        if t in cuts:
            factor, min_scale = cuts[t]
            lr.scale(factor, min_scale=min_scale, epoch=0, step=t)
            scale = max(scale * factor, min(scale, min_scale))
        lrs = lrs_of(optimizer)
        assert all(v >= 0.0 for v in lrs.values())  # also False for NaN
        assert lrs["host"] <= run.host_lr * scale
        assert lrs["seed:a"] <= SEED_LR_RATIO * run.host_lr
        assert lrs["emb"] == 0.0
        step(lr, optimizer, run.steps_per_epoch)


@pytest.mark.req("R3.1")
@PROPERTY_SETTINGS
@given(run=runs(DECAYING_SHAPES))
def test_warmup_never_lowers_and_decay_never_raises_an_lr(run: Run) -> None:
    lr, _ = run.controller()
    optimizer = run.optimizer()
    lr.register_optimizer("host", optimizer)
    seed_warmup_steps = SEED_WARMUP_EPOCHS * run.steps_per_epoch
    horizon = max(run.total_epochs * run.steps_per_epoch, seed_warmup_steps) + 3
    seen = [lrs_of(optimizer)]
    for _ in range(horizon):
        step(lr, optimizer, run.steps_per_epoch)
        seen.append(lrs_of(optimizer))
    host_warmup_steps = run.schedule.warmup_epochs * run.steps_per_epoch
    for t in range(horizon):
        before, after = seen[t], seen[t + 1]
        if t + 1 < host_warmup_steps:
            assert after["host"] >= before["host"]
        if t >= host_warmup_steps:
            assert after["host"] <= before["host"]
        if t + 1 < seed_warmup_steps:
            assert after["seed:a"] >= before["seed:a"]
        if t >= seed_warmup_steps:
            assert after["seed:a"] <= before["seed:a"]


ACTIONS = ("step", "step", "step", "scale", "epoch_end", "rebind", "join_seed", "reload")


@pytest.mark.req("R3.2")
@PROPERTY_SETTINGS
@given(run=runs(), actions=st.lists(st.sampled_from(ACTIONS), max_size=40))
def test_the_integrity_guard_never_fires_when_only_the_controller_writes(
    run: Run, actions: list[str]
) -> None:
    lr, guards = run.controller()
    optimizer = run.optimizer()
    lr.register_optimizer("host", optimizer)
    group_ids: tuple[str, ...] = HOST_GROUPS
    for i, action in enumerate(actions):
        if action == "step":
            step(lr, optimizer, run.steps_per_epoch)
        elif action == "scale":
            lr.scale(0.5, min_scale=0.2, epoch=0, step=lr.position)
        elif action == "epoch_end":
            lr.epoch_end(0, lr.position)
        elif action == "reload":
            lr.load_state_dict(json.loads(json.dumps(lr.state_dict())))
        else:
            if action == "join_seed":
                group_ids = (*group_ids, f"seed:{i}")
            optimizer = run.optimizer(group_ids)
            lr.rebind_optimizer("host", optimizer)
        assert lrs_of(optimizer) == lr.current_lrs()
    step(lr, optimizer, run.steps_per_epoch)
    assert lr.integrity_breaches == 0
    assert guards.breakers[BreakerId.BREAKER_LR_INTEGRITY].failures == 0


@pytest.mark.req("R3.3")
@PROPERTY_SETTINGS
@given(
    run=runs(),
    saved_at=st.integers(0, 30),
    continued=st.integers(1, 20),
    cut_at=st.none() | st.integers(0, 30),
    seed_joins_at=st.none() | st.integers(0, 30),
)
def test_save_and_load_at_any_step_continues_identically(
    run: Run, saved_at: int, continued: int, cut_at: int | None, seed_joins_at: int | None
) -> None:
    original, _ = run.controller()
    optimizer = run.optimizer()
    original.register_optimizer("host", optimizer)
    group_ids: tuple[str, ...] = HOST_GROUPS
    for t in range(saved_at):
        if t == cut_at:
            original.scale(0.5, min_scale=0.1, epoch=0, step=t)
        if t == seed_joins_at:
            group_ids = (*group_ids, "seed:b")
            optimizer = run.optimizer(group_ids)
            original.rebind_optimizer("host", optimizer)
        step(original, optimizer, run.steps_per_epoch)
    original.epoch_end(0, saved_at)
    state = json.loads(json.dumps(original.state_dict()))

    resumed, _ = run.controller()
    resumed_optimizer = run.optimizer(group_ids)
    resumed.register_optimizer("host", resumed_optimizer)
    resumed.load_state_dict(state)

    assert resumed.state_dict()["optimizers"] == state["optimizers"]
    for _ in range(continued):
        step(original, optimizer, run.steps_per_epoch)
        step(resumed, resumed_optimizer, run.steps_per_epoch)
        assert lrs_of(resumed_optimizer) == lrs_of(optimizer)
    assert resumed.state_dict()["optimizers"] == original.state_dict()["optimizers"]
