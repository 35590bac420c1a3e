"""The task contract and its loader: what a run trains, apart from how Tolaria trains it.

A task gives the runtime a model, its data and its loss; the runtime owns the
loop, the optimizer, the LR schedule, snapshots and rollback. `load_task` is
called once at start-up (by `runtime.run_training`, after the RNGs are seeded
and before anything is allocated on a device) to turn `spec.training.task` into
a `Task`: a built-in name from `BUILTIN_FACTORIES`, or a user's `module:function`
called with the `TrainingSpec`.

Loading runs user code, so this is a boundary: whatever the import or the call
raises is refused as `TaskInvalid("spec.training.task", ...)` with the cause
chained, and so is a result the runtime could not train. It must never start
training, move anything to a device, or keep state between calls.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from leyline.spec import BUILTIN_TASKS, TrainingSpec
from tolaria_trainer.errors import TaskInvalid

TASK_FIELD = "spec.training.task"
"""The manifest field every loading error names."""

HOST_GROUP = "host"
"""The group id of every trainable parameter when a task declares no groups."""

SEED_GROUP_PREFIX = "seed:"
"""Group ids with this prefix belong to seeds (R3.3); a task may not declare them."""

BUILTIN_FACTORIES: Mapping[str, str] = MappingProxyType(
    {
        "synthetic-mlp": "tolaria_trainer.tasks.synthetic_mlp:build_task",
        "char-lm": "tolaria_trainer.tasks.char_lm:build_task",
    }
)
"""Built-in task name -> the `module:function` that builds it; keys equal `BUILTIN_TASKS`.

Built-ins load through the same path and checks as user tasks, and their
modules are imported only when chosen.
"""


@dataclass
class Task:
    """What a task gives the runtime: model, data, loss; the runtime owns the loop."""

    model: torch.nn.Module
    """On the CPU; the runtime moves it to the run's device (and may compile it)."""
    train_set: Dataset[Any]
    """Map-style: `__len__`, `__getitem__` -> (input, target); a TensorDataset batches fastest."""
    validation_set: Dataset[Any]
    """Evaluated in order after every epoch, outside the hook budget (R1.1)."""
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    """(model output, target) -> scalar mean loss over the batch."""
    accuracy_fn: Callable[[Tensor, Tensor], tuple[float, int]] | None = None
    """(model output, target) -> (correct, count); None reports no accuracy."""
    param_groups: Sequence[tuple[str, Sequence[torch.nn.Parameter]]] | None = None
    """(group id, parameters) covering every trainable parameter once; None = one group "host"."""
    description: str = ""
    """One line for the run report and logs."""

    def resolved_param_groups(self) -> list[tuple[str, list[torch.nn.Parameter]]]:
        """The groups the optimizer gets: `param_groups`, or one "host" group of trainable ones."""
        if self.param_groups is None:
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            return [(HOST_GROUP, trainable)]
        return [(group_id, list(params)) for group_id, params in self.param_groups]


def load_task(training: TrainingSpec) -> Task:
    """Builds the task `training.task` names and checks that the runtime can train it.

    Raises TaskInvalid naming `spec.training.task` (or, from a built-in, the data
    field it cannot honour) with the cause chained. Imports and calls user code;
    call once, at start-up.
    """
    target, factory = _factory(training)
    try:
        task = factory(training)
    except TaskInvalid:
        raise
    except Exception as err:  # user code: anything it raises is a refused task
        raise TaskInvalid(
            TASK_FIELD, f"{target} raised {type(err).__name__} while building the task: {err}"
        ) from err
    return _checked(task, target)


def find_task(training: TrainingSpec) -> str:
    """Imports the module `training.task` names and finds its function; returns the
    `module:function` it resolved to (a built-in's factory for a built-in name).

    The cheap half of `load_task`, for `tolaria validate`: the task's module runs its import,
    but the function is not called, so no model is built and no data is read. Raises
    TaskInvalid naming `spec.training.task` with the cause chained.
    """
    return _factory(training)[0]


def _factory(training: TrainingSpec) -> tuple[str, Callable[[TrainingSpec], Any]]:
    name = training.task
    target = BUILTIN_FACTORIES.get(name, name)
    module_name, _, function_name = target.partition(":")
    if not module_name or not function_name:
        raise TaskInvalid(
            TASK_FIELD,
            f"{name!r} is neither a built-in task ({', '.join(BUILTIN_TASKS)}) "
            "nor an importable module:function",
        )
    return target, _resolve(module_name, function_name)


def _resolve(module_name: str, function_name: str) -> Callable[[TrainingSpec], Any]:
    target = f"{module_name}:{function_name}"
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or anything the module raises at import
        raise TaskInvalid(
            TASK_FIELD,
            f"cannot import module {module_name!r} of {target}: {type(err).__name__}: {err}",
        ) from err
    try:
        factory = getattr(module, function_name)
    except AttributeError as err:
        raise TaskInvalid(
            TASK_FIELD, f"module {module_name!r} has no attribute {function_name!r} ({target})"
        ) from err
    if not callable(factory):
        raise TaskInvalid(
            TASK_FIELD,
            f"{target} is a {type(factory).__name__}, not a function taking the TrainingSpec",
        )
    return factory  # type: ignore[no-any-return]


def _checked(task: object, target: str) -> Task:
    """`task` if the runtime can train it; else TaskInvalid naming `target` and what is wrong."""
    if not isinstance(task, Task):
        raise TaskInvalid(
            TASK_FIELD,
            f"{target} returned a {type(task).__name__}, expected a tolaria_trainer.tasks.Task",
        )
    if not isinstance(task.model, torch.nn.Module):
        raise TaskInvalid(
            TASK_FIELD,
            f"{target}: model must be a torch.nn.Module, got {type(task.model).__name__}",
        )
    if not any(p.requires_grad for p in task.model.parameters()):
        raise TaskInvalid(TASK_FIELD, f"{target}: model has no trainable parameters")
    _check_dataset(task.train_set, "train_set", target)
    _check_dataset(task.validation_set, "validation_set", target)
    if not callable(task.loss_fn):
        raise TaskInvalid(
            TASK_FIELD, f"{target}: loss_fn must be callable, got {type(task.loss_fn).__name__}"
        )
    if task.accuracy_fn is not None and not callable(task.accuracy_fn):
        raise TaskInvalid(
            TASK_FIELD,
            f"{target}: accuracy_fn must be callable or None, got "
            f"{type(task.accuracy_fn).__name__}",
        )
    if not isinstance(task.description, str):
        raise TaskInvalid(TASK_FIELD, f"{target}: description must be a str")
    if task.param_groups is not None:
        _check_param_groups(task.model, task.param_groups, target)
    return task


def _check_dataset(dataset: object, role: str, target: str) -> None:
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TaskInvalid(
            TASK_FIELD,
            f"{target}: {role} must be a map-style dataset (__len__ and __getitem__), "
            f"got {type(dataset).__name__}",
        )
    try:
        length = len(dataset)
        first = dataset[0] if length > 0 else None
    except Exception as err:  # user code: a dataset that cannot report its size or first item
        raise TaskInvalid(
            TASK_FIELD,
            f"{target}: {role} failed to give its length or item 0: {type(err).__name__}: {err}",
        ) from err
    if length == 0:
        raise TaskInvalid(TASK_FIELD, f"{target}: {role} is empty")
    if not (isinstance(first, Sequence) and len(first) == 2):
        raise TaskInvalid(
            TASK_FIELD,
            f"{target}: {role}[0] must be an (input, target) pair, got {type(first).__name__}",
        )


def _check_param_groups(
    model: torch.nn.Module,
    groups: Sequence[tuple[str, Sequence[torch.nn.Parameter]]],
    target: str,
) -> None:
    """Every trainable parameter of the model in exactly one group; ids unique and not seeds'.

    Why so strict: the LR controller keys schedules by group id (R3.1), seed
    groups are added later under `seed:` ids (R3.3), and the optimizer manager
    maps state by parameter name, so a parameter outside the model or in two
    groups could not be rebuilt or restored (R4.1).
    """
    if isinstance(groups, str | bytes) or not isinstance(groups, Sequence):
        raise TaskInvalid(
            TASK_FIELD,
            f"{target}: param_groups must be a list of (group_id, parameters), "
            f"got {type(groups).__name__}",
        )
    names = {param: name for name, param in model.named_parameters()}
    seen: set[torch.nn.Parameter] = set()
    ids: set[str] = set()
    for entry in groups:
        if not (isinstance(entry, Sequence) and len(entry) == 2):
            raise TaskInvalid(
                TASK_FIELD,
                f"{target}: each param_groups entry must be a (group_id, parameters) pair",
            )
        group_id, params = entry
        if not isinstance(group_id, str) or not group_id:
            raise TaskInvalid(
                TASK_FIELD, f"{target}: group id {group_id!r} must be a non-empty string"
            )
        if group_id.startswith(SEED_GROUP_PREFIX):
            raise TaskInvalid(
                TASK_FIELD,
                f"{target}: group id {group_id!r} starts with {SEED_GROUP_PREFIX!r}, "
                "which is reserved for seed groups",
            )
        if group_id in ids:
            raise TaskInvalid(TASK_FIELD, f"{target}: group id {group_id!r} is declared twice")
        ids.add(group_id)
        if isinstance(params, torch.Tensor) or not isinstance(params, Sequence):
            raise TaskInvalid(
                TASK_FIELD,
                f"{target}: group {group_id!r} must list its parameters in a list or tuple "
                f"(e.g. list(module.parameters())), got {type(params).__name__}",
            )
        if not params:
            raise TaskInvalid(TASK_FIELD, f"{target}: group {group_id!r} has no parameters")
        for param in params:
            if not isinstance(param, torch.nn.Parameter):
                raise TaskInvalid(
                    TASK_FIELD,
                    f"{target}: group {group_id!r} holds a {type(param).__name__}, "
                    "not a torch.nn.Parameter",
                )
            if param not in names:
                raise TaskInvalid(
                    TASK_FIELD,
                    f"{target}: group {group_id!r} holds a parameter of shape "
                    f"{tuple(param.shape)} that is not in the model",
                )
            if param in seen:
                raise TaskInvalid(
                    TASK_FIELD,
                    f"{target}: parameter {names[param]!r} appears twice "
                    f"(again in group {group_id!r})",
                )
            seen.add(param)
    missing = [
        name
        for name, param in model.named_parameters()
        if param.requires_grad and param not in seen
    ]
    if missing:
        raise TaskInvalid(
            TASK_FIELD,
            f"{target}: param_groups leave trainable parameters out: {', '.join(missing)}",
        )
