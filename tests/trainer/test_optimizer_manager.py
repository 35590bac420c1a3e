"""The optimizer manager builds the host optimizer and rebuilds it without losing state (R4)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from leyline import (
    BreakerId,
    CircuitBreakerState,
    MessagePriority,
    OptimizerKind,
    RebuildOutcome,
    TelemetryLevel,
)
from leyline.spec import OptimizerSpec, RebuildSpec
from tests.fakes import FakeClock, RecordingEvents
from tests.strategies import OPTIMIZER_VARIANTS, OptimizerVariant
from tolaria_trainer.errors import OptimizerInvalid
from tolaria_trainer.guards import Guards
from tolaria_trainer.optimizer_manager import (
    EVENT_OPTIMIZER_REBUILD,
    GROUP_ID_KEY,
    LR_OPTIMIZER_NAME,
    MOMENT_KEYS,
    MOMENTUM_KEYS,
    OptimizerManager,
    ParamGroup,
    bitwise_equal,
    resize_state_tensor,
)

BREAKER = BreakerId.BREAKER_OPTIMIZER_REBUILD
SUCCEEDED = RebuildOutcome.REBUILD_OUTCOME_SUCCEEDED
FAILED_RESTORED = RebuildOutcome.REBUILD_OUTCOME_FAILED_RESTORED
SKIPPED_STORM_GUARD = RebuildOutcome.REBUILD_OUTCOME_SKIPPED_STORM_GUARD
SKIPPED_BREAKER_OPEN = RebuildOutcome.REBUILD_OUTCOME_SKIPPED_BREAKER_OPEN

variants = pytest.mark.parametrize("variant", OPTIMIZER_VARIANTS, ids=lambda v: v.id)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

State = dict[str, dict[str, torch.Tensor]]


def variant_of(kind: OptimizerKind.ValueType) -> OptimizerVariant:
    """The plain variant of `kind` (no extra torch options)."""
    return next(v for v in OPTIMIZER_VARIANTS if v.kind == kind and not v.group_options)


class RecordingRebinder:
    """An `LRRebinder` that records each call and runs `on_call` (e.g. to advance the clock)."""

    def __init__(self, on_call: Callable[[], None] | None = None) -> None:
        self.calls: list[tuple[str, torch.optim.Optimizer]] = []
        self._on_call = on_call

    def rebind_optimizer(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        self.calls.append((name, optimizer))
        if self._on_call is not None:
            self._on_call()


class RefusingRebinder(RecordingRebinder):
    """An `LRRebinder` whose first call raises, as an LR controller refusing the new optimizer."""

    def rebind_optimizer(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        super().rebind_optimizer(name, optimizer)
        if len(self.calls) == 1:
            raise RuntimeError("LR controller refused the optimizer")


def make_manager(
    guards: Guards,
    clock: FakeClock,
    events: RecordingEvents,
    variant: OptimizerVariant | None = None,
    rebuild: RebuildSpec | None = None,
) -> OptimizerManager:
    optimizer = variant if variant is not None else variant_of(OptimizerKind.adam)
    spec = rebuild if rebuild is not None else RebuildSpec()
    return OptimizerManager(optimizer.spec(), spec, guards, clock, events)


def parameter(*shape: int, seed: int = 0) -> torch.nn.Parameter:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(*shape, generator=generator))


def host(**params: torch.nn.Parameter) -> list[ParamGroup]:
    return [ParamGroup("host", tuple(params.items()))]


def reshaped(param: torch.nn.Parameter, *shape: int) -> torch.nn.Parameter:
    """A new parameter of `shape` holding `param`'s overlapping values (a widened layer)."""
    data = torch.zeros(shape)
    overlap = tuple(slice(0, min(o, n)) for o, n in zip(param.shape, shape, strict=True))
    data[overlap] = param.detach()[overlap]
    return torch.nn.Parameter(data)


def build(manager: OptimizerManager, variant: OptimizerVariant, groups: list[ParamGroup]) -> None:
    variant.configure(manager.build(groups))


def train(optimizer: torch.optim.Optimizer, steps: int = 3, seed: int = 1) -> None:
    """Steps with random gradients so every state entry is populated and non-trivial."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.randn(p.shape, generator=generator).to(p)
        optimizer.step()


def state_by_name(manager: OptimizerManager) -> State:
    """A deep copy of the live optimizer's state keyed by stable name."""
    optimizer = manager.optimizer
    return {
        name: {k: v.clone() for k, v in optimizer.state[p].items()}
        for name, p in manager.parameters.items()
        if p in optimizer.state
    }


def assert_state_equal(manager: OptimizerManager, expected: State) -> None:
    assert state_by_name(manager).keys() == expected.keys()
    for name, entries in expected.items():
        live = manager.optimizer.state[manager.parameters[name]]
        assert live.keys() == entries.keys()
        for key, value in entries.items():
            assert bitwise_equal(live[key], value), (name, key)


def fill_scale(key: str) -> float:
    if key in MOMENTUM_KEYS:
        return RebuildSpec().momentum_fill_scale
    assert key in MOMENT_KEYS
    return 1.0


def per_element_keys(state: dict[str, torch.Tensor]) -> list[str]:
    keys = [k for k in state if k in MOMENT_KEYS | MOMENTUM_KEYS]
    assert keys, f"optimizer kept no per-element state: {sorted(state)}"
    return keys


# --- build --------------------------------------------------------------------------------------


@pytest.mark.req("R4.1")
@pytest.mark.parametrize(
    ("kind", "cls"),
    [
        (OptimizerKind.sgd, torch.optim.SGD),
        (OptimizerKind.adam, torch.optim.Adam),
        (OptimizerKind.adamw, torch.optim.AdamW),
        (OptimizerKind.rmsprop, torch.optim.RMSprop),
    ],
)
def test_build_makes_the_optimizer_the_spec_names(
    kind: OptimizerKind.ValueType,
    cls: type[torch.optim.Optimizer],
    guards: Guards,
    clock: FakeClock,
    events: RecordingEvents,
) -> None:
    spec = OptimizerSpec.model_validate(
        {"kind": OptimizerKind.Name(kind), "lr": 0.02, "weight_decay": 0.1, "eps": 1e-6}
    )
    manager = OptimizerManager(spec, RebuildSpec(), guards, clock, events)

    optimizer = manager.build(host(w=parameter(2, 2)))

    assert type(optimizer) is cls
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.02, 0.1)
    if kind in (OptimizerKind.adam, OptimizerKind.adamw):
        assert group["betas"] == (spec.beta1, spec.beta2)
    else:
        assert group["momentum"] == spec.momentum
    if kind != OptimizerKind.sgd:
        assert group["eps"] == 1e-6


@pytest.mark.req("R4.1")
def test_every_param_group_carries_its_group_id(
    guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events)

    optimizer = manager.build(
        [
            ParamGroup("host", (("w", parameter(2)),)),
            ParamGroup("seed-1", (("s", parameter(3)),)),
        ]
    )

    assert [g[GROUP_ID_KEY] for g in optimizer.param_groups] == ["host", "seed-1"]


@pytest.mark.req("R4.1")
@pytest.mark.parametrize(
    "groups",
    [
        [ParamGroup("host", (("w", parameter(2)),)), ParamGroup("host", (("v", parameter(2)),))],
        [ParamGroup("host", (("w", parameter(2)), ("w", parameter(3))))],
    ],
    ids=["group-id-twice", "name-twice"],
)
def test_build_refuses_clashing_group_ids_or_names(
    groups: list[ParamGroup], guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events)

    with pytest.raises(OptimizerInvalid, match="used twice"):
        manager.build(groups)


@pytest.mark.req("R4.1")
def test_build_refuses_one_tensor_under_two_names(
    guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events)
    shared = parameter(2)

    with pytest.raises(OptimizerInvalid, match="same tensor"):
        manager.build(host(a=shared, b=shared))


# --- state mapping (R4.1) -----------------------------------------------------------------------


@pytest.mark.req("R4.1")
@variants
def test_identical_parameters_keep_their_state_bit_for_bit(
    variant: OptimizerVariant, guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events, variant)
    w, b = parameter(4, 3), parameter(4, seed=1)
    build(manager, variant, host(w=w, b=b))
    train(manager.optimizer)
    before = state_by_name(manager)

    record = manager.rebuild(
        host(w=w, b=b, extra=parameter(2)), lr=RecordingRebinder(), epoch=1, step=10, reason="r"
    )

    assert record.outcome == SUCCEEDED
    assert record.parameters_identical == 2
    assert_state_equal(manager, before)


@pytest.mark.req("R4.1")
@variants
def test_state_is_matched_by_name_not_by_tensor_object(
    variant: OptimizerVariant, guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events, variant)
    w = parameter(4, 3)
    build(manager, variant, host(w=w))
    train(manager.optimizer)
    before = state_by_name(manager)
    w_copy = torch.nn.Parameter(w.detach().clone())  # a rebuilt module: same name, new object

    manager.rebuild(host(w=w_copy), lr=RecordingRebinder(), epoch=1, step=10, reason="r")

    assert manager.parameters["w"] is w_copy
    assert_state_equal(manager, before)


@pytest.mark.req("R4.1")
@variants
def test_expanded_parameter_keeps_the_old_region_exactly(
    variant: OptimizerVariant, guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events, variant)
    w = parameter(4, 3)
    build(manager, variant, host(w=w))
    train(manager.optimizer)
    old = state_by_name(manager)["w"]

    record = manager.rebuild(
        host(w=reshaped(w, 6, 5)), lr=RecordingRebinder(), epoch=1, step=10, reason="widen"
    )

    assert record.outcome == SUCCEEDED
    assert record.parameters_expanded == 1
    new = manager.optimizer.state[manager.parameters["w"]]
    for key in per_element_keys(old):
        assert new[key].shape == (6, 5)
        assert bitwise_equal(new[key][:4, :3], old[key]), key


@pytest.mark.req("R4.1")
@variants
def test_expanded_rows_are_filled_with_the_per_dim_mean_scaled_for_momentum(
    variant: OptimizerVariant, guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events, variant)
    w = parameter(4, 3)
    build(manager, variant, host(w=w))
    train(manager.optimizer)
    old = state_by_name(manager)["w"]

    manager.rebuild(host(w=reshaped(w, 6, 3)), lr=RecordingRebinder(), epoch=1, step=10, reason="r")

    new = manager.optimizer.state[manager.parameters["w"]]
    for key in per_element_keys(old):
        expected = old[key].mean(dim=0) * fill_scale(key)
        torch.testing.assert_close(new[key][4:], expected.expand(2, 3), msg=key)


@pytest.mark.req("R4.1")
def test_momentum_buffers_start_new_slices_at_a_tenth_of_the_mean(
    guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    variant = variant_of(OptimizerKind.sgd)
    manager = make_manager(guards, clock, events, variant)
    w = parameter(4)
    build(manager, variant, host(w=w))
    train(manager.optimizer)
    old = state_by_name(manager)["w"]["momentum_buffer"]

    manager.rebuild(host(w=reshaped(w, 5)), lr=RecordingRebinder(), epoch=1, step=10, reason="r")

    new = manager.optimizer.state[manager.parameters["w"]]["momentum_buffer"]
    torch.testing.assert_close(new[4], 0.1 * old.mean())


@pytest.mark.req("R4.1")
def test_a_corner_grown_in_two_dims_gets_the_mean_of_the_whole_old_tensor() -> None:
    old = torch.arange(6, dtype=torch.float32).reshape(2, 3)

    new = resize_state_tensor(old, (3, 4), fill_scale=1.0)

    assert torch.equal(new[:2, :3], old)
    torch.testing.assert_close(new[2, :3], old.mean(dim=0))
    torch.testing.assert_close(new[:2, 3], old.mean(dim=1))
    torch.testing.assert_close(new[2, 3], old.mean())


@pytest.mark.req("R4.1")
def test_fill_scale_applies_only_to_the_new_region() -> None:
    old = torch.arange(4, dtype=torch.float32).reshape(2, 2)

    new = resize_state_tensor(old, (3, 3), fill_scale=0.1)

    assert torch.equal(new[:2, :2], old)
    torch.testing.assert_close(new[2, 2], 0.1 * old.mean())


@pytest.mark.req("R4.1")
@variants
def test_contracted_parameter_state_is_the_slice(
    variant: OptimizerVariant, guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events, variant)
    w = parameter(4, 3)
    build(manager, variant, host(w=w))
    train(manager.optimizer)
    old = state_by_name(manager)["w"]

    record = manager.rebuild(
        host(w=reshaped(w, 2, 3)), lr=RecordingRebinder(), epoch=1, step=10, reason="prune"
    )

    assert record.parameters_contracted == 1
    new = manager.optimizer.state[manager.parameters["w"]]
    for key in per_element_keys(old):
        assert bitwise_equal(new[key], old[key][:2].contiguous()), key


@pytest.mark.req("R4.1")
@variants
def test_grown_and_shrunk_parameter_keeps_the_overlap_exactly(
    variant: OptimizerVariant, guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events, variant)
    w = parameter(4, 3)
    build(manager, variant, host(w=w))
    train(manager.optimizer)
    old = state_by_name(manager)["w"]

    record = manager.rebuild(
        host(w=reshaped(w, 2, 5)), lr=RecordingRebinder(), epoch=1, step=10, reason="r"
    )

    assert (record.parameters_expanded, record.parameters_contracted) == (1, 1)
    new = manager.optimizer.state[manager.parameters["w"]]
    for key in per_element_keys(old):
        assert bitwise_equal(new[key][:, :3], old[key][:2].contiguous()), key


@pytest.mark.req("R4.1")
@pytest.mark.parametrize("variant", [v for v in OPTIMIZER_VARIANTS if v.kind != OptimizerKind.sgd])
def test_step_counters_are_kept_across_a_reshape(
    variant: OptimizerVariant, guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events, variant)
    w = parameter(4)
    build(manager, variant, host(w=w))
    train(manager.optimizer, steps=3)

    manager.rebuild(host(w=reshaped(w, 6)), lr=RecordingRebinder(), epoch=1, step=10, reason="r")

    assert manager.optimizer.state[manager.parameters["w"]]["step"].item() == 3


@pytest.mark.req("R4.1")
@variants
def test_added_parameters_start_with_fresh_state(
    variant: OptimizerVariant, guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events, variant)
    w = parameter(3)
    build(manager, variant, host(w=w))
    train(manager.optimizer)
    seed_w = parameter(2, seed=5)

    record = manager.rebuild(
        [*host(w=w), ParamGroup("seed-1", (("seed.w", seed_w),))],
        lr=RecordingRebinder(),
        epoch=1,
        step=10,
        reason="seed germinated",
    )

    assert record.parameters_added == 1
    assert manager.parameters["seed.w"] is seed_w
    assert seed_w not in manager.optimizer.state


@pytest.mark.req("R4.1")
@variants
def test_removed_parameters_leave_the_optimizer(
    variant: OptimizerVariant, guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events, variant)
    w, culled = parameter(3), parameter(2, seed=5)
    build(manager, variant, host(w=w, culled=culled))
    train(manager.optimizer)

    record = manager.rebuild(host(w=w), lr=RecordingRebinder(), epoch=1, step=10, reason="culled")

    assert record.parameters_removed == 1
    assert "culled" not in manager.parameters
    live = [p for g in manager.optimizer.param_groups for p in g["params"]]
    assert all(p is not culled for p in live)
    assert culled not in manager.optimizer.state


@pytest.mark.req("R4.1")
def test_a_parameter_moving_between_groups_keeps_its_state(
    guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events)
    w, s = parameter(3), parameter(2, seed=5)
    manager.build([ParamGroup("host", (("w", w),)), ParamGroup("seed-1", (("s", s),))])
    train(manager.optimizer)
    before = state_by_name(manager)

    manager.rebuild(host(w=w, s=s), lr=RecordingRebinder(), epoch=1, step=10, reason="fossilized")

    assert_state_equal(manager, before)


@pytest.mark.req("R4.1")
def test_rebuild_record_counts_each_kind_of_change(
    guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events)
    same, wide, narrow, gone = parameter(2), parameter(3), parameter(4), parameter(5)
    manager.build(host(same=same, wide=wide, narrow=narrow, gone=gone))
    train(manager.optimizer)

    record = manager.rebuild(
        host(same=same, wide=reshaped(wide, 5), narrow=reshaped(narrow, 2), new=parameter(1)),
        lr=RecordingRebinder(),
        epoch=2,
        step=40,
        reason="seed grew",
    )

    counts = (
        record.parameters_identical,
        record.parameters_expanded,
        record.parameters_contracted,
        record.parameters_added,
        record.parameters_removed,
    )
    assert counts == (1, 1, 1, 1, 1)
    assert (record.epoch, record.step, record.reason) == (2, 40, "seed grew")


@pytest.mark.req("R4.2")
@variants
def test_training_the_rebuilt_optimizer_leaves_the_old_state_untouched(
    variant: OptimizerVariant, guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events, variant)
    w = parameter(4, 3)
    build(manager, variant, host(w=w))
    train(manager.optimizer)
    old = manager.optimizer
    before = {k: v.clone() for k, v in old.state[w].items()}

    manager.rebuild(host(w=w), lr=RecordingRebinder(), epoch=1, step=10, reason="r")
    train(manager.optimizer, seed=7)

    assert all(bitwise_equal(old.state[w][k], v) for k, v in before.items())


@pytest.mark.req("R4.1")
@pytest.mark.parametrize(
    ("device", "dtype"),
    [("cpu", torch.float64), pytest.param("cuda", torch.float32, marks=needs_cuda)],
)
@variants
def test_state_follows_its_parameter_to_a_new_device_or_dtype(
    device: str,
    dtype: torch.dtype,
    variant: OptimizerVariant,
    guards: Guards,
    clock: FakeClock,
    events: RecordingEvents,
) -> None:
    manager = make_manager(guards, clock, events, variant)
    w = parameter(4, 3)
    build(manager, variant, host(w=w))
    train(manager.optimizer)
    old = state_by_name(manager)["w"]
    moved = torch.nn.Parameter(w.detach().to(device=device, dtype=dtype))

    record = manager.rebuild(host(w=moved), lr=RecordingRebinder(), epoch=1, step=10, reason="r")

    assert record.outcome == SUCCEEDED
    new = manager.optimizer.state[moved]
    for key in per_element_keys(old):
        assert (new[key].device, new[key].dtype) == (moved.device, dtype)
        assert torch.equal(new[key].cpu(), old[key].to(dtype))
    train(manager.optimizer)
    assert bool(torch.isfinite(moved).all())


# --- hyperparameters and the LR controller (R4.2) -----------------------------------------------


@pytest.mark.req("R4.2")
@variants
def test_rebuild_keeps_the_class_and_each_groups_current_hyperparameters(
    variant: OptimizerVariant, guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events, variant)
    w = parameter(3)
    build(manager, variant, host(w=w))
    old = manager.optimizer
    old.param_groups[0]["lr"] = 0.0123  # as the LR controller left it
    expected = {k: v for k, v in old.param_groups[0].items() if k != "params"}

    manager.rebuild(host(w=w), lr=RecordingRebinder(), epoch=1, step=10, reason="r")

    new = manager.optimizer
    assert new is not old
    assert type(new) is type(old)
    assert {k: v for k, v in new.param_groups[0].items() if k != "params"} == expected


@pytest.mark.req("R4.2")
def test_a_new_group_gets_the_spec_hyperparameters(
    guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events)
    w = parameter(3)
    manager.build(host(w=w))
    manager.optimizer.param_groups[0]["lr"] = 0.0123

    manager.rebuild(
        [*host(w=w), ParamGroup("seed-1", (("s", parameter(2)),))],
        lr=RecordingRebinder(),
        epoch=1,
        step=10,
        reason="r",
    )

    seed_group = manager.optimizer.param_groups[1]
    assert seed_group[GROUP_ID_KEY] == "seed-1"
    assert seed_group["lr"] == OptimizerSpec().lr


@pytest.mark.req("R4.2")
def test_successful_rebuild_rebinds_the_lr_controller_then_swaps(
    guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events)
    w = parameter(3)
    old = manager.build(host(w=w))
    seen: list[torch.optim.Optimizer] = []
    rebinder = RecordingRebinder(on_call=lambda: seen.append(manager.optimizer))

    record = manager.rebuild(host(w=w), lr=rebinder, epoch=1, step=10, reason="r")

    assert record.outcome == SUCCEEDED
    assert rebinder.calls == [(LR_OPTIMIZER_NAME, manager.optimizer)]
    assert seen == [old]  # the old optimizer was still live while the controller rebound
    assert guards.breakers[BREAKER].successes == 1


# --- two-phase failure handling (R4.2) ----------------------------------------------------------


@pytest.mark.req("R4.2")
@variants
def test_failure_during_transform_keeps_the_old_optimizer_intact(
    variant: OptimizerVariant, guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events, variant)
    w, b = parameter(4, 3), parameter(4, seed=1)
    build(manager, variant, host(w=w, b=b))
    train(manager.optimizer)
    old = manager.optimizer
    old.param_groups[0]["lr"] = 0.0123
    before = state_by_name(manager)
    rebinder = RecordingRebinder()

    record = manager.rebuild(
        host(w=torch.nn.Parameter(torch.zeros(12)), b=b),  # a rank change cannot be mapped
        lr=rebinder,
        epoch=1,
        step=10,
        reason="r",
    )

    assert record.outcome == FAILED_RESTORED
    assert "changes rank" in record.error
    assert manager.optimizer is old
    assert old.param_groups[0]["lr"] == 0.0123
    assert_state_equal(manager, before)
    assert len(old.state) == 2
    assert rebinder.calls == []
    assert guards.breakers[BREAKER].failures == 1


@pytest.mark.req("R4.2")
@variants
def test_failure_in_rebind_restores_the_old_optimizer_and_rebinds_it(
    variant: OptimizerVariant, guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events, variant)
    w = parameter(4, 3)
    build(manager, variant, host(w=w))
    train(manager.optimizer)
    old = manager.optimizer
    old.param_groups[0]["lr"] = 0.0123
    before = state_by_name(manager)
    rebinder = RefusingRebinder()

    record = manager.rebuild(host(w=reshaped(w, 6, 3)), lr=rebinder, epoch=1, step=10, reason="r")

    assert record.outcome == FAILED_RESTORED
    assert "LR controller refused" in record.error
    assert manager.optimizer is old
    assert manager.parameters["w"] is w
    assert old.param_groups[0]["lr"] == 0.0123
    assert_state_equal(manager, before)
    assert [name for name, _ in rebinder.calls] == [LR_OPTIMIZER_NAME, LR_OPTIMIZER_NAME]
    assert rebinder.calls[0][1] is not old
    assert rebinder.calls[1][1] is old
    assert guards.breakers[BREAKER].failures == 1


@pytest.mark.req("R4.2")
def test_non_finite_state_fails_validation_and_keeps_the_old_optimizer(
    guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events)
    w = parameter(3)
    manager.build(host(w=w))
    train(manager.optimizer)
    old = manager.optimizer
    old.state[w]["exp_avg"][0] = float("inf")

    record = manager.rebuild(host(w=w), lr=RecordingRebinder(), epoch=1, step=10, reason="r")

    assert record.outcome == FAILED_RESTORED
    assert "RebuildFailed" in record.error
    assert "not finite" in record.error
    assert manager.optimizer is old


@pytest.mark.req("R4.2")
def test_a_failed_rebuild_enters_conservative_mode(
    guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events)
    w = parameter(3)
    manager.build(host(w=w))

    manager.rebuild(host(w=w), lr=RefusingRebinder(), epoch=1, step=10, reason="r")

    assert guards.conservative.active


@pytest.mark.req("R4.2")
def test_rebuild_before_build_fails_without_raising(
    guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events)

    record = manager.rebuild(
        host(w=parameter(3)), lr=RecordingRebinder(), epoch=0, step=0, reason="r"
    )

    assert record.outcome == FAILED_RESTORED
    assert "build() must be called first" in record.error


# --- guards (R4.2) ------------------------------------------------------------------------------


@pytest.mark.req("R4.2")
def test_storm_guard_skips_a_rebuild_too_soon_after_the_last(
    guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events, rebuild=RebuildSpec(min_steps_between=50))
    w = parameter(3)
    manager.build(host(w=w))
    manager.rebuild(host(w=w), lr=RecordingRebinder(), epoch=1, step=100, reason="first")
    live = manager.optimizer
    rebinder = RecordingRebinder()

    record = manager.rebuild(host(w=reshaped(w, 5)), lr=rebinder, epoch=1, step=149, reason="r")

    assert record.outcome == SKIPPED_STORM_GUARD
    assert manager.optimizer is live
    assert manager.parameters["w"] is w
    assert rebinder.calls == []
    assert guards.breakers[BREAKER].failures == 0


@pytest.mark.req("R4.2")
def test_storm_guard_admits_a_rebuild_once_enough_steps_passed(
    guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events, rebuild=RebuildSpec(min_steps_between=50))
    w = parameter(3)
    manager.build(host(w=w))
    manager.rebuild(host(w=w), lr=RecordingRebinder(), epoch=1, step=100, reason="first")

    record = manager.rebuild(host(w=w), lr=RecordingRebinder(), epoch=1, step=150, reason="r")

    assert record.outcome == SUCCEEDED


@pytest.mark.req("R4.2")
def test_storm_guard_counts_only_from_a_successful_rebuild(
    guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events, rebuild=RebuildSpec(min_steps_between=50))
    w = parameter(3)
    manager.build(host(w=w))
    manager.rebuild(host(w=w), lr=RefusingRebinder(), epoch=1, step=100, reason="failed")

    record = manager.rebuild(host(w=w), lr=RecordingRebinder(), epoch=1, step=101, reason="r")

    assert record.outcome == SUCCEEDED


@pytest.mark.req("R4.2")
def test_open_breaker_skips_the_rebuild(
    guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events)
    w = parameter(3)
    old = manager.build(host(w=w))
    for _ in range(3):
        guards.failure(BREAKER, "earlier rebuild failed")
    rebinder = RecordingRebinder()

    record = manager.rebuild(host(w=w), lr=rebinder, epoch=1, step=10, reason="r")

    assert record.outcome == SKIPPED_BREAKER_OPEN
    assert manager.optimizer is old
    assert rebinder.calls == []
    assert guards.breakers[BREAKER].failures == 3


@pytest.mark.req("R4.2")
def test_half_open_breaker_admits_a_rebuild_that_closes_it(
    guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events)
    w = parameter(3)
    manager.build(host(w=w))
    for _ in range(3):
        guards.failure(BREAKER, "earlier rebuild failed")
    clock.advance_s(30)

    record = manager.rebuild(host(w=w), lr=RecordingRebinder(), epoch=1, step=10, reason="r")

    assert record.outcome == SUCCEEDED
    assert guards.breakers[BREAKER].state == CircuitBreakerState.CIRCUIT_STATE_CLOSED


@pytest.mark.req("R4.2")
def test_slow_rebuild_stands_but_counts_as_a_breaker_failure(
    guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    budget_ms = RebuildSpec().budget_ms
    manager = make_manager(guards, clock, events)
    w = parameter(3)
    old = manager.build(host(w=w))
    slow = RecordingRebinder(on_call=lambda: clock.advance_ms(budget_ms + 1))

    record = manager.rebuild(host(w=w), lr=slow, epoch=1, step=10, reason="r")

    assert record.outcome == SUCCEEDED
    assert manager.optimizer is not old
    assert record.elapsed_ms == pytest.approx(budget_ms + 1)
    assert "BudgetBreached" in record.error
    assert guards.breakers[BREAKER].failures == 1
    assert guards.breakers[BREAKER].successes == 0


@pytest.mark.req("R4.2")
def test_elapsed_time_is_measured_with_the_injected_clock(
    guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events)
    w = parameter(3)
    manager.build(host(w=w))

    record = manager.rebuild(
        host(w=w),
        lr=RecordingRebinder(on_call=lambda: clock.advance_ms(7)),
        epoch=1,
        step=10,
        reason="r",
    )

    assert record.elapsed_ms == pytest.approx(7.0)
    assert record.error == ""
    assert guards.breakers[BREAKER].successes == 1


# --- telemetry and records (R4.2) ---------------------------------------------------------------


@pytest.mark.req("R4.2")
def test_successful_rebuild_emits_an_info_event_with_outcome_and_counts(
    guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events)
    w = parameter(3)
    manager.build(host(w=w))

    manager.rebuild(
        host(w=w, s=parameter(2)),
        lr=RecordingRebinder(on_call=lambda: clock.advance_ms(2.5)),
        epoch=1,
        step=10,
        reason="seed germinated",
    )

    (event,) = events.named(EVENT_OPTIMIZER_REBUILD)
    assert event.level == TelemetryLevel.TELEMETRY_LEVEL_INFO
    assert event.priority == MessagePriority.MESSAGE_PRIORITY_NORMAL
    assert event.attributes["outcome"] == RebuildOutcome.Name(SUCCEEDED)
    assert float(event.attributes["elapsed_ms"]) == pytest.approx(2.5)
    assert (event.attributes["identical"], event.attributes["added"]) == ("1", "1")
    assert event.attributes["reason"] == "seed germinated"


@pytest.mark.req("R4.2")
def test_failed_rebuild_emits_a_high_priority_warning(
    guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events)
    w = parameter(3)
    manager.build(host(w=w))

    manager.rebuild(host(w=w), lr=RefusingRebinder(), epoch=1, step=10, reason="r")

    (event,) = events.named(EVENT_OPTIMIZER_REBUILD)
    assert event.level == TelemetryLevel.TELEMETRY_LEVEL_WARNING
    assert event.priority == MessagePriority.MESSAGE_PRIORITY_HIGH
    assert event.attributes["outcome"] == RebuildOutcome.Name(FAILED_RESTORED)
    assert "LR controller refused" in event.attributes["error"]


@pytest.mark.req("R4.2")
def test_skipped_rebuild_emits_a_warning(
    guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events, rebuild=RebuildSpec(min_steps_between=50))
    w = parameter(3)
    manager.build(host(w=w))
    manager.rebuild(host(w=w), lr=RecordingRebinder(), epoch=1, step=100, reason="first")

    manager.rebuild(host(w=w), lr=RecordingRebinder(), epoch=1, step=101, reason="r")

    last = events.named(EVENT_OPTIMIZER_REBUILD)[-1]
    assert last.level == TelemetryLevel.TELEMETRY_LEVEL_WARNING
    assert last.attributes["outcome"] == RebuildOutcome.Name(SKIPPED_STORM_GUARD)


@pytest.mark.req("R4.2")
def test_every_attempt_is_recorded_in_order(
    guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events, rebuild=RebuildSpec(min_steps_between=50))
    w = parameter(3)
    manager.build(host(w=w))

    manager.rebuild(host(w=w), lr=RefusingRebinder(), epoch=1, step=100, reason="a")
    manager.rebuild(host(w=w), lr=RecordingRebinder(), epoch=1, step=101, reason="b")
    manager.rebuild(host(w=w), lr=RecordingRebinder(), epoch=1, step=102, reason="c")

    assert [(r.reason, r.outcome) for r in manager.rebuilds] == [
        ("a", FAILED_RESTORED),
        ("b", SUCCEEDED),
        ("c", SKIPPED_STORM_GUARD),
    ]


# --- training continues (R4.1) ------------------------------------------------------------------


@pytest.mark.req("R4.1")
@variants
def test_a_rebuilt_optimizer_keeps_training(
    variant: OptimizerVariant, guards: Guards, clock: FakeClock, events: RecordingEvents
) -> None:
    manager = make_manager(guards, clock, events, variant)
    w, b = parameter(4, 3), parameter(4, seed=1)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))

    def step(w: torch.Tensor, b: torch.Tensor) -> float:
        manager.optimizer.zero_grad()
        loss = (x @ w.T + b).pow(2).mean()
        torch.autograd.backward(loss)
        manager.optimizer.step()
        return loss.item()

    build(manager, variant, host(w=w, b=b))
    for _ in range(3):
        step(w, b)
    wide_w, wide_b = reshaped(w, 6, 3), reshaped(b, 6)
    manager.rebuild(host(w=wide_w, b=wide_b), lr=RecordingRebinder(), epoch=1, step=3, reason="r")
    before = wide_w.detach().clone()

    losses = [step(wide_w, wide_b) for _ in range(3)]

    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(wide_w.detach(), before)
    state = manager.optimizer.state[wide_w]
    assert all(state[k].shape == (6, 3) for k in per_element_keys(state))
