"""The task contract: built-ins, user `module:function` tasks, and every refusal of the loader."""

from __future__ import annotations

from importlib import resources

import pytest
import torch

from leyline.spec import BUILTIN_TASKS, DataSpec, ModelSpec, TrainingSpec
from tolaria_trainer.data import BatchPlan
from tolaria_trainer.errors import TaskInvalid
from tolaria_trainer.tasks import BUILTIN_FACTORIES, HOST_GROUP, Task, char_lm, load_task

SMALL = DataSpec(train_samples=128, validation_samples=32, sequence_length=16)
"""Small enough that building and one batch of each built-in take milliseconds."""

USER = "tests.trainer.user_task_example"


def spec(task: str, seed: int = 0, **changes: object) -> TrainingSpec:
    fields: dict[str, object] = {"task": task, "seed": seed, "data": SMALL} | changes
    return TrainingSpec(**fields)  # type: ignore[arg-type]


def first_batch(task: Task, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    plan = BatchPlan(task.train_set, batch_size, seed=0, shuffle=False, device=torch.device("cpu"))
    batch = next(iter(plan.batches(0)))
    return batch.inputs, batch.targets


def test_builtin_registry_names_exactly_the_builtin_tasks_of_the_spec() -> None:
    assert set(BUILTIN_FACTORIES) == set(BUILTIN_TASKS)


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_builtin_task_loads_with_the_spec_sizes(name: str) -> None:
    task = load_task(spec(name))
    assert len(task.train_set) == 128  # type: ignore[arg-type]
    assert len(task.validation_set) == 32  # type: ignore[arg-type]
    assert task.description.startswith(name)


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_builtin_task_puts_every_trainable_parameter_in_the_host_group(name: str) -> None:
    task = load_task(spec(name))
    ((group_id, params),) = task.resolved_param_groups()
    assert group_id == HOST_GROUP
    assert {id(p) for p in params} == {id(p) for p in task.model.parameters()}


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_builtin_forward_backward_on_one_batch_reaches_every_parameter(name: str) -> None:
    task = load_task(spec(name))
    inputs, targets = first_batch(task)
    loss = task.loss_fn(task.model(inputs), targets)
    torch.autograd.backward(loss)
    assert loss.dim() == 0
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in task.model.parameters())


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_builtin_accuracy_counts_every_target(name: str) -> None:
    task = load_task(spec(name))
    inputs, targets = first_batch(task)
    assert task.accuracy_fn is not None
    correct, count = task.accuracy_fn(task.model(inputs), targets)
    assert count == targets.numel()
    assert 0 <= correct <= count


def test_synthetic_mlp_gives_one_logit_per_class_for_each_example() -> None:
    task = load_task(
        spec(
            "synthetic-mlp",
            data=DataSpec(features=5, classes=3, train_samples=16, validation_samples=8),
        )
    )
    inputs, targets = first_batch(task)
    assert inputs.shape == (8, 5)
    assert inputs.dtype == torch.float32
    assert targets.shape == (8,)
    assert task.model(inputs).shape == (8, 3)
    assert set(task.train_set.tensors[1].tolist()) <= {0, 1, 2}  # type: ignore[attr-defined]


def test_synthetic_mlp_has_the_hidden_layers_the_model_spec_asks_for() -> None:
    model = load_task(
        spec("synthetic-mlp", model=ModelSpec(hidden_size=16, layers=3, dropout=0.1))
    ).model
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [16, 16, 16, 10]
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) == 3


def test_char_lm_has_the_recurrent_layers_the_model_spec_asks_for() -> None:
    model = load_task(spec("char-lm", model=ModelSpec(hidden_size=24, layers=3))).model
    assert isinstance(model, char_lm.CharGRU)
    assert (model.rnn.num_layers, model.rnn.hidden_size, model.embedding.embedding_dim) == (
        3,
        24,
        24,
    )


def test_char_lm_targets_are_the_inputs_shifted_by_one_character() -> None:
    task = load_task(spec("char-lm"))
    inputs, targets = first_batch(task)
    assert inputs.shape == targets.shape == (8, 16)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert task.model(inputs).shape == (8, 16, len(set(char_lm.corpus_text())))


def test_char_lm_validation_text_is_held_out_from_training() -> None:
    encoded = torch.arange(10 * char_lm.BLOCK_CHARS)
    train, validation = char_lm.split(encoded)
    assert len(validation) == char_lm.BLOCK_CHARS
    assert set(train.tolist()).isdisjoint(validation.tolist())
    assert len(train) + len(validation) == len(encoded)


def test_char_lm_corpus_is_shipped_public_domain_text_of_40_to_80_kb() -> None:
    raw = (resources.files("tolaria_trainer.tasks") / "data" / "corpus.txt").read_bytes()
    first_line = raw.split(b"\n", 1)[0].decode()
    assert 40_000 <= len(raw) <= 80_000
    assert "public domain" in first_line
    assert first_line not in char_lm.corpus_text()


def test_char_lm_window_longer_than_the_validation_text_is_refused_naming_the_field(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(char_lm, "corpus_text", lambda: "to be or not to be. " * 1100)
    with pytest.raises(TaskInvalid) as refused:
        load_task(spec("char-lm", data=DataSpec(sequence_length=4096)))
    assert refused.value.field == "spec.training.data.sequenceLength"
    assert "2048-character validation text" in refused.value.rule


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_same_seed_gives_identical_data_and_initial_weights(name: str) -> None:
    first, second = load_task(spec(name, seed=3)), load_task(spec(name, seed=3))
    for a, b in zip(first.train_set.tensors, second.train_set.tensors, strict=True):  # type: ignore[attr-defined]
        assert torch.equal(a, b)
    for a, b in zip(first.validation_set.tensors, second.validation_set.tensors, strict=True):  # type: ignore[attr-defined]
        assert torch.equal(a, b)
    first_weights, second_weights = first.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(first_weights[k], second_weights[k]) for k in first_weights)


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_another_seed_gives_other_data_and_weights(name: str) -> None:
    first, second = load_task(spec(name, seed=3)), load_task(spec(name, seed=4))
    assert not torch.equal(first.train_set.tensors[0], second.train_set.tensors[0])  # type: ignore[attr-defined]
    assert not all(
        torch.equal(a, b)
        for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True)
    )


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_building_a_builtin_leaves_the_global_rng_untouched(name: str) -> None:
    torch.manual_seed(11)
    state = torch.get_rng_state()
    load_task(spec(name))
    assert torch.equal(torch.get_rng_state(), state)


def test_synthetic_mlp_loss_falls_over_two_short_epochs() -> None:
    training = TrainingSpec(
        task="synthetic-mlp", data=DataSpec(train_samples=4096, validation_samples=256)
    )
    task = load_task(training)
    cpu = torch.device("cpu")
    train = BatchPlan(task.train_set, 64, seed=0, shuffle=True, device=cpu)
    validation = BatchPlan(task.validation_set, 256, seed=0, shuffle=False, device=cpu)
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=training.optimizer.lr)

    def validation_loss() -> float:
        with torch.no_grad():
            batch = next(iter(validation.batches(0)))
            return float(task.loss_fn(task.model(batch.inputs), batch.targets))

    before = validation_loss()
    for epoch in range(2):
        for batch in train.batches(epoch):
            optimizer.zero_grad()
            torch.autograd.backward(task.loss_fn(task.model(batch.inputs), batch.targets))
            optimizer.step()
    assert validation_loss() < 0.8 * before  # measured ~0.6 for seeds 0-2


def test_user_task_loads_from_module_and_function() -> None:
    task = load_task(spec(f"{USER}:build_task"))
    assert task.description == "user example: sum of four inputs"
    assert [group_id for group_id, _ in task.resolved_param_groups()] == ["body", "head"]


def test_user_task_receives_the_training_spec() -> None:
    first, second = (
        load_task(spec(f"{USER}:build_task", seed=1)),
        load_task(spec(f"{USER}:build_task", seed=2)),
    )
    assert not torch.equal(first.train_set.tensors[0], second.train_set.tensors[0])  # type: ignore[attr-defined]


def test_unknown_module_is_refused_naming_the_task_field() -> None:
    with pytest.raises(TaskInvalid) as refused:
        load_task(spec("tests.trainer.no_such_module:build_task"))
    assert refused.value.field == "spec.training.task"
    assert "tests.trainer.no_such_module" in refused.value.rule
    assert isinstance(refused.value.__cause__, ImportError)


def test_missing_function_is_refused_naming_the_module_and_function() -> None:
    with pytest.raises(TaskInvalid) as refused:
        load_task(spec(f"{USER}:no_such_function"))
    assert refused.value.field == "spec.training.task"
    assert f"{USER!r} has no attribute 'no_such_function'" in refused.value.rule
    assert isinstance(refused.value.__cause__, AttributeError)


def test_attribute_that_is_not_callable_is_refused() -> None:
    with pytest.raises(TaskInvalid, match=rf"{USER}:NOT_CALLABLE is a int, not a function"):
        load_task(spec(f"{USER}:NOT_CALLABLE"))


def test_error_raised_inside_the_task_function_is_refused_with_its_cause() -> None:
    with pytest.raises(TaskInvalid) as refused:
        load_task(spec(f"{USER}:broken_raises"))
    assert refused.value.field == "spec.training.task"
    assert "raised RuntimeError" in refused.value.rule
    assert "the data bucket is unreachable" in refused.value.rule
    assert isinstance(refused.value.__cause__, RuntimeError)


def test_name_that_is_neither_builtin_nor_module_function_is_refused() -> None:
    unchecked = TrainingSpec.model_construct(task="no-colon-here")
    with pytest.raises(TaskInvalid, match="neither a built-in task"):
        load_task(unchecked)


@pytest.mark.parametrize(
    ("function", "rule"),
    [
        ("broken_returns_model", "returned a TwoLayer, expected a tolaria_trainer.tasks.Task"),
        ("broken_model_not_module", "model must be a torch.nn.Module, got function"),
        ("broken_model_without_trainable_parameters", "model has no trainable parameters"),
        ("broken_empty_train_set", "train_set is empty"),
        ("broken_iterable_validation_set", "validation_set must be a map-style dataset"),
        ("broken_items_not_pairs", "train_set[0] must be an (input, target) pair, got Tensor"),
        ("broken_loss_not_callable", "loss_fn must be callable, got str"),
        (
            "broken_group_misses_a_parameter",
            "leave trainable parameters out: head.weight, head.bias",
        ),
        ("broken_group_repeats_a_parameter", "parameter 'body.weight' appears twice"),
        ("broken_group_holds_a_foreign_parameter", "shape (3,) that is not in the model"),
        ("broken_group_id_reserved_for_seeds", "'seed:mine' starts with 'seed:'"),
        ("broken_group_id_empty", "group id '' must be a non-empty string"),
        ("broken_group_ids_repeat", "group id 'same' is declared twice"),
        ("broken_group_params_a_generator", "must list its parameters in a list or tuple"),
    ],
)
def test_unusable_user_task_is_refused_naming_the_function_and_the_rule(
    function: str, rule: str
) -> None:
    with pytest.raises(TaskInvalid) as refused:
        load_task(spec(f"{USER}:{function}"))
    assert refused.value.field == "spec.training.task"
    assert f"{USER}:{function}" in refused.value.rule
    assert rule in refused.value.rule
