"""Tasks whose faults are deterministic, for the rollback-loop tests (R13.3).

They wrap the built-in synthetic-mlp task (`spec.training.task:
tests.integration.recovery_tasks:<name>`, imported by the trainer subprocess from
PYTHONPATH) and break it in a way that repeats exactly on every replay:

* `poisoned`: one training sample's features are NaN, so every step that trains on it has a
  NaN loss, in whatever batch the epoch's shuffle puts it.
* `collapsing`: the model counts its own training forwards in a buffer (part of its state,
  so snapshots and rollbacks restore it); right after its second epoch's worth of steps it
  answers garbage at evaluation, so validation accuracy collapses at the end of epoch 2 and
  again whenever training gets that far.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from leyline.spec import TrainingSpec
from tolaria_trainer.tasks import Task
from tolaria_trainer.tasks.synthetic_mlp import build_task

POISONED_SAMPLE = 123


def poisoned(training: TrainingSpec) -> Task:
    task = build_task(training)
    inputs, targets = task.train_set.tensors  # type: ignore[attr-defined]
    inputs = inputs.clone()
    inputs[POISONED_SAMPLE] = math.nan
    task.train_set = torch.utils.data.TensorDataset(inputs, targets)
    return task


class _Collapsing(nn.Module):
    """Garbage at evaluation once it has trained for (2, 3] epochs' worth of steps."""

    def __init__(self, inner: nn.Module, steps_per_epoch: int) -> None:
        super().__init__()
        self.inner = inner
        self.steps_per_epoch = steps_per_epoch
        self.register_buffer("forwards", torch.zeros((), dtype=torch.int64))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.inner(x)
        if self.training:
            self.forwards += 1
            return out
        done = int(self.forwards)
        if 2 * self.steps_per_epoch < done <= 3 * self.steps_per_epoch:
            return -out  # the least likely class: accuracy near 0
        return out


def collapsing(training: TrainingSpec) -> Task:
    task = build_task(training)
    steps = -(-training.data.train_samples // training.batch_size)
    task.model = _Collapsing(task.model, steps)
    return task
