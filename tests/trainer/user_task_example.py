"""A user task as `spec.training.task: tests.trainer.user_task_example:build_task` names it.

`build_task` is what a user writes: a small regression with two parameter
groups. The `broken_*` factories each break one rule of the task contract, for
the loader's refusal tests.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional
from torch.utils.data import IterableDataset, TensorDataset

from leyline.spec import TrainingSpec
from tolaria_trainer.tasks import Task

NOT_CALLABLE = 42


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(torch.relu(self.body(x)))
        return out


def _dataset(seed: int, samples: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, 4, generator=generator)
    return TensorDataset(inputs, inputs.sum(dim=1, keepdim=True))


def build_task(training: TrainingSpec) -> Task:
    return _build(training)[0]


def _build(training: TrainingSpec) -> tuple[Task, TwoLayer]:
    model = TwoLayer()
    task = Task(
        model=model,
        train_set=_dataset(training.seed, 32),
        validation_set=_dataset(training.seed + 1, 8),
        loss_fn=functional.mse_loss,
        param_groups=[
            ("body", list(model.body.parameters())),
            ("head", list(model.head.parameters())),
        ],
        description="user example: sum of four inputs",
    )
    return task, model


def _with(training: TrainingSpec, **changes: Any) -> Task:
    task = build_task(training)
    for name, value in changes.items():
        setattr(task, name, value)
    return task


def broken_raises(training: TrainingSpec) -> Task:
    raise RuntimeError("the data bucket is unreachable")


def broken_returns_model(training: TrainingSpec) -> nn.Module:
    return TwoLayer()


def broken_model_not_module(training: TrainingSpec) -> Task:
    return _with(training, model=lambda x: x)


def broken_model_without_trainable_parameters(training: TrainingSpec) -> Task:
    task = build_task(training)
    task.model.requires_grad_(False)
    task.param_groups = None
    return task


def broken_empty_train_set(training: TrainingSpec) -> Task:
    return _with(training, train_set=TensorDataset(torch.zeros(0, 4), torch.zeros(0, 1)))


class _Stream(IterableDataset[tuple[Tensor, Tensor]]):
    def __iter__(self) -> Any:
        return iter([(torch.zeros(4), torch.zeros(1))])


def broken_iterable_validation_set(training: TrainingSpec) -> Task:
    return _with(training, validation_set=_Stream())


def broken_items_not_pairs(training: TrainingSpec) -> Task:
    return _with(training, train_set=[torch.zeros(4), torch.zeros(4)])


def broken_loss_not_callable(training: TrainingSpec) -> Task:
    return _with(training, loss_fn="mse")


def broken_group_misses_a_parameter(training: TrainingSpec) -> Task:
    task, model = _build(training)
    task.param_groups = [("body", list(model.body.parameters()))]
    return task


def broken_group_repeats_a_parameter(training: TrainingSpec) -> Task:
    task, model = _build(training)
    body = list(model.body.parameters())
    everything = list(task.model.parameters())
    task.param_groups = [("body", body), ("all", everything)]
    return task


def broken_group_holds_a_foreign_parameter(training: TrainingSpec) -> Task:
    task = build_task(training)
    stranger = nn.Parameter(torch.zeros(3))
    task.param_groups = [("all", [*task.model.parameters(), stranger])]
    return task


def broken_group_id_reserved_for_seeds(training: TrainingSpec) -> Task:
    task = build_task(training)
    task.param_groups = [("seed:mine", list(task.model.parameters()))]
    return task


def broken_group_id_empty(training: TrainingSpec) -> Task:
    task = build_task(training)
    task.param_groups = [("", list(task.model.parameters()))]
    return task


def broken_group_ids_repeat(training: TrainingSpec) -> Task:
    task, model = _build(training)
    task.param_groups = [
        ("same", list(model.body.parameters())),
        ("same", list(model.head.parameters())),
    ]
    return task


def broken_group_params_a_generator(training: TrainingSpec) -> Task:
    task = build_task(training)
    task.param_groups = [("all", task.model.parameters())]  # type: ignore[list-item]
    return task
