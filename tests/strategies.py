"""Shared Hypothesis strategies and the test data they draw from (cf. attrs' `tests/strategies.py`).

Keep every example small: these feed property tests that must stay fast on a loaded 2-core box.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from leyline import OptimizerKind
from leyline.spec import OptimizerSpec

Shape = tuple[int, ...]


@dataclass(frozen=True)
class OptimizerVariant:
    """An optimizer kind plus per-group torch options `OptimizerSpec` has no field for.

    RMSprop's `centered` and Adam's `amsgrad` add state (`grad_avg`, `max_exp_avg_sq`) that a
    rebuild must carry, so they are set on the built optimizer's groups before its first step.
    """

    kind: OptimizerKind.ValueType
    group_options: tuple[tuple[str, bool], ...] = ()

    @property
    def id(self) -> str:
        flags = [name for name, on in self.group_options if on]
        return "-".join([OptimizerKind.Name(self.kind), *flags])

    def spec(self) -> OptimizerSpec:
        return OptimizerSpec.model_validate({"kind": OptimizerKind.Name(self.kind)})

    def configure(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            group.update(self.group_options)


OPTIMIZER_VARIANTS = (
    OptimizerVariant(OptimizerKind.sgd),
    OptimizerVariant(OptimizerKind.adam),
    OptimizerVariant(OptimizerKind.adam, (("amsgrad", True),)),
    OptimizerVariant(OptimizerKind.adamw),
    OptimizerVariant(OptimizerKind.rmsprop, (("centered", False),)),
    OptimizerVariant(OptimizerKind.rmsprop, (("centered", True),)),
)
"""SGD(momentum), Adam (with and without AMSGrad), AdamW, RMSprop(momentum) centered or not."""


def optimizer_variants() -> st.SearchStrategy[OptimizerVariant]:
    return st.sampled_from(OPTIMIZER_VARIANTS)


def tensor_shapes(*, max_dims: int = 3, max_side: int = 4) -> st.SearchStrategy[Shape]:
    """Non-empty shapes of rank 1..max_dims."""
    return st.lists(st.integers(1, max_side), min_size=1, max_size=max_dims).map(tuple)


@st.composite
def reshapes(
    draw: st.DrawFn,
    *,
    grow: bool = True,
    shrink: bool = True,
    max_dims: int = 3,
    max_side: int = 4,
    max_growth: int = 3,
) -> tuple[Shape, Shape]:
    """(old, new) shapes of the same rank that differ; `grow`/`shrink` say which way dims may go.

    Needs `grow` or `shrink`. Built, not filtered, so no example is thrown away.
    """
    if not (grow or shrink):
        raise ValueError("reshapes: a shape that may neither grow nor shrink cannot change")
    min_side = 1 if grow else 2  # shrink-only needs room to shrink
    old = draw(st.lists(st.integers(min_side, max_side), min_size=1, max_size=max_dims).map(tuple))
    new = list(
        draw(
            st.tuples(
                *(
                    st.integers(1 if shrink else side, side + max_growth if grow else side)
                    for side in old
                )
            )
        )
    )
    if tuple(new) == old:
        dim = draw(st.integers(0, len(old) - 1))
        new[dim] = old[dim] + 1 if grow else old[dim] - 1
    return old, tuple(new)
