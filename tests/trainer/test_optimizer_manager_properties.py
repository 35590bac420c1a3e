"""Properties of optimizer rebuilds over random shapes and every optimizer kind (R4.1).

Each example builds a real optimizer on tiny tensors, steps it with seeded random gradients, and
rebuilds it; examples stay few and small so the suite is fast on a loaded 2-core machine.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leyline.spec import BreakerSpec, ConservativeSpec, RebuildSpec
from tests.fakes import FakeClock, RecordingEvents
from tests.strategies import (
    OptimizerVariant,
    Shape,
    optimizer_variants,
    reshapes,
    tensor_shapes,
)
from tolaria_trainer.guards import Guards
from tolaria_trainer.optimizer_manager import (
    MOMENT_KEYS,
    MOMENTUM_KEYS,
    OptimizerManager,
    ParamGroup,
    bitwise_equal,
    resize_state_tensor,
)

PER_ELEMENT_KEYS = MOMENT_KEYS | MOMENTUM_KEYS

SMALL_EXAMPLES = settings(max_examples=25, deadline=None)

seeds = st.integers(0, 2**31 - 1)


class NullRebinder:
    def rebind_optimizer(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        pass


def trained_manager(
    variant: OptimizerVariant, shapes: dict[str, Shape], seed: int
) -> OptimizerManager:
    """A manager whose optimizer has taken two steps over parameters of `shapes`."""
    clock, events = FakeClock(), RecordingEvents()
    guards = Guards(BreakerSpec(), ConservativeSpec(), clock, events)
    manager = OptimizerManager(variant.spec(), RebuildSpec(), guards, clock, events)
    generator = torch.Generator().manual_seed(seed)
    params = tuple(
        (name, torch.nn.Parameter(torch.randn(shape, generator=generator)))
        for name, shape in shapes.items()
    )
    optimizer = manager.build([ParamGroup("host", params)])
    variant.configure(optimizer)
    for _ in range(2):
        for _, p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    return manager


def rebuild(manager: OptimizerManager, shapes: dict[str, Shape]) -> None:
    """Rebuilds with parameters of `shapes`; names already known and unchanged keep their tensor."""
    params = tuple(
        (
            name,
            manager.parameters[name]
            if name in manager.parameters and manager.parameters[name].shape == shape
            else torch.nn.Parameter(torch.zeros(shape)),
        )
        for name, shape in shapes.items()
    )
    record = manager.rebuild(
        [ParamGroup("host", params)], lr=NullRebinder(), epoch=1, step=10, reason="property"
    )
    assert record.error == ""


def state_of(manager: OptimizerManager, name: str) -> dict[str, torch.Tensor]:
    state = manager.optimizer.state[manager.parameters[name]]
    return {key: value.clone() for key, value in state.items() if key in PER_ELEMENT_KEYS}


def overlap(a: Shape, b: Shape) -> tuple[slice, ...]:
    return tuple(slice(0, min(x, y)) for x, y in zip(a, b, strict=True))


@pytest.mark.req("R4.1")
@SMALL_EXAMPLES
@given(
    variant=optimizer_variants(),
    shapes=st.lists(tensor_shapes(), min_size=1, max_size=3),
    added=tensor_shapes(),
    seed=seeds,
)
def test_identical_parameters_keep_state_bit_for_bit(
    variant: OptimizerVariant, shapes: list[Shape], added: Shape, seed: int
) -> None:
    named = {f"p{i}": shape for i, shape in enumerate(shapes)}
    manager = trained_manager(variant, named, seed)
    optimizer = manager.optimizer
    before = {
        name: {k: v.clone() for k, v in optimizer.state[p].items()}
        for name, p in manager.parameters.items()
    }

    rebuild(manager, {**named, "added": added})

    for name, entries in before.items():
        live = manager.optimizer.state[manager.parameters[name]]
        assert live.keys() == entries.keys()
        assert all(bitwise_equal(live[k], v) for k, v in entries.items()), name


@pytest.mark.req("R4.1")
@SMALL_EXAMPLES
@given(variant=optimizer_variants(), change=reshapes(shrink=False), seed=seeds)
def test_expanded_state_keeps_the_old_region_exactly(
    variant: OptimizerVariant, change: tuple[Shape, Shape], seed: int
) -> None:
    old_shape, new_shape = change
    manager = trained_manager(variant, {"w": old_shape}, seed)
    old = state_of(manager, "w")

    rebuild(manager, {"w": new_shape})

    new = state_of(manager, "w")
    region = overlap(old_shape, new_shape)
    for key, value in old.items():
        assert new[key].shape == new_shape
        assert bitwise_equal(new[key][region].contiguous(), value), key


@pytest.mark.req("R4.1")
@SMALL_EXAMPLES
@given(variant=optimizer_variants(), change=reshapes(grow=False), seed=seeds)
def test_contracted_state_equals_the_slice(
    variant: OptimizerVariant, change: tuple[Shape, Shape], seed: int
) -> None:
    old_shape, new_shape = change
    manager = trained_manager(variant, {"w": old_shape}, seed)
    old = state_of(manager, "w")

    rebuild(manager, {"w": new_shape})

    new = state_of(manager, "w")
    region = overlap(old_shape, new_shape)
    for key, value in old.items():
        assert bitwise_equal(new[key], value[region].contiguous()), key


@pytest.mark.req("R4.1")
@SMALL_EXAMPLES
@given(variant=optimizer_variants(), change=reshapes(), seed=seeds)
def test_any_reshape_keeps_the_overlap_exactly_and_finite(
    variant: OptimizerVariant, change: tuple[Shape, Shape], seed: int
) -> None:
    old_shape, new_shape = change
    manager = trained_manager(variant, {"w": old_shape}, seed)
    old = state_of(manager, "w")

    rebuild(manager, {"w": new_shape})

    new = state_of(manager, "w")
    region = overlap(old_shape, new_shape)
    for key, value in old.items():
        assert bitwise_equal(new[key][region].contiguous(), value[region].contiguous()), key
        assert bool(torch.isfinite(new[key]).all()), key


@pytest.mark.req("R4.1")
@settings(max_examples=50, deadline=None)
@given(
    shape=tensor_shapes(),
    dim_growth=st.data(),
    fill_scale=st.sampled_from([1.0, RebuildSpec().momentum_fill_scale]),
    seed=seeds,
)
def test_slices_added_along_one_dim_hold_the_scaled_mean_along_it(
    shape: Shape, dim_growth: st.DataObject, fill_scale: float, seed: int
) -> None:
    dim = dim_growth.draw(st.integers(0, len(shape) - 1))
    grow = dim_growth.draw(st.integers(1, 3))
    old = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    new_shape = tuple(side + grow if d == dim else side for d, side in enumerate(shape))

    new = resize_state_tensor(old, new_shape, fill_scale=fill_scale)

    added = new.narrow(dim, shape[dim], grow)
    expected = (old.mean(dim=dim, keepdim=True) * fill_scale).expand_as(added)
    torch.testing.assert_close(added, expected)
    assert bitwise_equal(new.narrow(dim, 0, shape[dim]).contiguous(), old)
